"""The server's pooling routes, with vLLM's paths and bodies: `/v1/embeddings` (OpenAI's), `/pooling`,
`/score` and `/v1/score`, `/rerank`, `/v1/rerank` and `/v2/rerank` (Jina/Cohere's shape), `/classify`.

`build_pooling_app` serves a pooling model (generation routes answer 400); `refusing_routes` gives a
generative model's app the same paths, answering 400. Request bodies: pooling_protocol.py. Inputs from all
clients are batched together: `PoolingBatcher` gathers what is queued while a step runs and packs it
all into the next run of the engine.
"""

from __future__ import annotations

import asyncio
import base64
import concurrent.futures
import time
import uuid
from contextlib import asynccontextmanager

import numpy as np
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

import jaxllm
from jaxllm.entrypoints.pooling_protocol import (ClassificationRequest, EmbeddingRequest, PoolingRequest,
                                                 RerankRequest, ScoreRequest, TokenizeRequest, parse,
                                                 prompts_of)
from jaxllm.entrypoints import protocol
from jaxllm.entrypoints.metrics import CONTENT_TYPE, PoolingMetrics
from jaxllm.entrypoints.protocol import APIError
from jaxllm.pooling_engine import PoolingEngine
from jaxllm.pooling_params import PoolingParams
from jaxllm.pooling_runner import PoolInput

GENERATION_PATHS = ("/v1/completions", "/v1/chat/completions", "/generate")
POOLING_PATHS = {"/v1/embeddings": "embed", "/pooling": "encode", "/score": "score", "/v1/score": "score",
                 "/rerank": "score", "/v1/rerank": "score", "/v2/rerank": "score", "/classify": "classify"}

class PoolingBatcher:
    """Runs the engine for many requests at once: while one run is on the device, new inputs queue, and
    the next run packs all of them. One worker thread owns the engine."""

    def __init__(self, engine: PoolingEngine):
        self.engine = engine
        self._queue: list[tuple[list[PoolInput], list[PoolingParams], asyncio.Future]] = []
        self._wake: asyncio.Event | None = None
        self._task: asyncio.Task | None = None
        self._pool = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="jaxllm-pooling")
        self.num_runs = 0  # engine runs so far (each packs every request queued when it starts)

    def start(self) -> None:
        self._wake = asyncio.Event()
        self._task = asyncio.ensure_future(self._loop())

    async def shutdown(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
        self._pool.shutdown(wait=False)

    async def pool(self, inputs: list[PoolInput], params: list[PoolingParams]) -> list[np.ndarray]:
        future = asyncio.get_running_loop().create_future()
        self._queue.append((inputs, params, future))
        self._wake.set()
        return await future

    async def _loop(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            await self._wake.wait()
            self._wake.clear()
            batch, self._queue = [p for p in self._queue if not p[2].done()], []
            if not batch:
                continue
            inputs = [x for b in batch for x in b[0]]
            params = [p for b in batch for p in b[1]]
            self.num_runs += 1
            try:
                results = await loop.run_in_executor(self._pool, self.engine.pool, inputs, params)
            except Exception as e:  # a failed run fails its requests only; the server carries on
                for *_, future in batch:
                    if not future.done():
                        future.set_exception(APIError(f"the pooling step failed: {type(e).__name__}: {e}", 500))
                continue
            at = 0
            for inp, _, future in batch:
                if not future.done():
                    future.set_result(results[at:at + len(inp)])
                at += len(inp)


class PoolingServing:
    """The handlers' logic: parse, check, tokenize (every input checked before any work), batch, respond."""

    def __init__(self, engine: PoolingEngine, batcher: PoolingBatcher, names: list[str]):
        self.engine, self.batcher, self.names = engine, batcher, names

    def _model(self, req) -> str:
        if req.model is not None and req.model not in self.names:
            raise APIError(f"The model `{req.model}` does not exist.", status=404, param="model", code="model_not_found")
        return self.names[0]

    def _params(self, req, task: str, **fields) -> PoolingParams:
        try:
            self.engine.check_task(task)
        except ValueError as e:  # the route is fine; the model served is of the other kind, as refusing_routes says
            raise APIError(str(e), param="model", code="model_not_supported") from None
        try:
            params = PoolingParams(truncate_prompt_tokens=req.truncate_prompt_tokens, **fields)
            self.engine.check_params(params, task)
        except ValueError as e:
            param = next((n for n in ("truncate_prompt_tokens", *fields) if n in str(e)), None)
            raise APIError(str(e), param=param) from None
        return params

    def _tokenize(self, prompts: list, params: PoolingParams, places: list[str]) -> list[PoolInput]:
        """Each prompt's input; a refusal names the prompt's place in the request (`input[3]`) and its field."""
        inputs = []
        for prompt, place in zip(prompts, places):
            try:
                inputs.append(self.engine.tokenize(prompt, params))
            except (TypeError, ValueError) as e:
                code = "context_length_exceeded" if "maximum context length" in str(e) else None
                raise APIError(f"{place}: {e}", param=_param_of(e, place.split("[")[0]), code=code) from None
        return inputs

    @staticmethod
    def _usage(inputs: list[PoolInput]) -> dict:
        n = sum(len(x.token_ids) for x in inputs)
        return {"prompt_tokens": n, "total_tokens": n, "completion_tokens": 0}

    @staticmethod
    def _encode(vector: np.ndarray, encoding_format: str):
        if encoding_format == "base64":  # OpenAI's: little-endian float32 bytes
            return base64.b64encode(vector.astype("<f4").tobytes()).decode()
        return vector.tolist()

    async def embeddings(self, body: dict, task: str = "embed") -> dict:
        req = await asyncio.to_thread(parse, EmbeddingRequest if task == "embed" else PoolingRequest, body)
        model = self._model(req)
        params = self._params(req, task, dimensions=req.dimensions, normalize=req.normalize)
        prompts = prompts_of(req.input)
        inputs = await asyncio.to_thread(self._tokenize, prompts, params, [f"input[{i}]" for i in range(len(prompts))])
        vectors = await self.batcher.pool(inputs, [params] * len(inputs))
        kind, key, prefix = ("embedding", "embedding", "embd") if task == "embed" else ("pooling", "data", "pool")
        data = [{"index": i, "object": kind, key: self._encode(v, req.encoding_format)} for i, v in enumerate(vectors)]
        return {"id": f"{prefix}-{uuid.uuid4().hex}", "object": "list", "created": int(time.time()), "model": model,
                "data": data, "usage": self._usage(inputs)}

    async def classify(self, body: dict) -> dict:
        req = await asyncio.to_thread(parse, ClassificationRequest, body)
        model = self._model(req)
        params = self._params(req, "classify", use_activation=req.use_activation)
        prompts = prompts_of(req.input)
        inputs = await asyncio.to_thread(self._tokenize, prompts, params, [f"input[{i}]" for i in range(len(prompts))])
        probs = await self.batcher.pool(inputs, [params] * len(inputs))
        labels = self.engine.id2label
        data = [{"index": i, "label": labels.get(int(np.argmax(p)), str(int(np.argmax(p)))), "probs": p.tolist(),
                 "num_classes": len(p)} for i, p in enumerate(probs)]
        return {"id": f"classify-{uuid.uuid4().hex}", "object": "list", "created": int(time.time()), "model": model,
                "data": data, "usage": self._usage(inputs)}

    async def _scores(self, req, texts_1: list[str], texts_2: list[str],
                      names: tuple[str, str] = ("text_1", "text_2")) -> tuple[list[float], list[PoolInput]]:
        """`names`: the request's fields that hold texts_1 and texts_2, for the errors."""
        if not texts_1 or not texts_2:
            raise APIError("both sides of a score need at least one text", param=names[0] if not texts_1 else names[1])
        # each text is embedded once (bi-encoders); a refusal names where the client put it first
        where = {}
        for name, texts in zip(names, (texts_1, texts_2)):
            for i, text in enumerate(texts):
                where.setdefault(text, f"{name}[{i}]" if len(texts) > 1 else name)
        if len(texts_1) == 1:
            texts_1 = texts_1 * len(texts_2)
        if len(texts_1) != len(texts_2):
            raise APIError(f"{len(texts_1)} texts in {names[0]} against {len(texts_2)} in {names[1]}: give one text, "
                           f"or as many as {names[1]}", param=names[0])
        if self.engine.kind == "classify":
            params = self._params(req, "score", use_activation=req.use_activation)

            def tokenize_pairs() -> list[PoolInput]:
                inputs = []
                for i, (a, b) in enumerate(zip(texts_1, texts_2)):
                    try:
                        inputs.append(self.engine.tokenize_pair(a, b, params))
                    except (TypeError, ValueError) as e:
                        raise APIError(f"pair {i}: {e}", param=_param_of(e, names[1])) from None
                return inputs

            inputs = await asyncio.to_thread(tokenize_pairs)
            return [float(r[0]) for r in await self.batcher.pool(inputs, [params] * len(inputs))], inputs
        params = self._params(req, "score")
        if req.use_activation is not None:
            raise APIError("use_activation applies to cross-encoders; this is an embedding model", param="use_activation")
        unique = list(dict.fromkeys(texts_1 + texts_2))
        inputs = await asyncio.to_thread(self._tokenize, unique, params, [where[t] for t in unique])
        vectors = dict(zip(unique, await self.batcher.pool(inputs, [params] * len(inputs))))
        cos = [float(vectors[a] @ vectors[b] / max(float(np.linalg.norm(vectors[a]) * np.linalg.norm(vectors[b])),
                                                   1e-12)) for a, b in zip(texts_1, texts_2)]
        return cos, inputs

    async def score(self, body: dict) -> dict:
        req = await asyncio.to_thread(parse, ScoreRequest, body)
        model = self._model(req)
        as_list = lambda t: [t] if isinstance(t, str) else list(t)  # noqa: E731
        scores, inputs = await self._scores(req, as_list(req.text_1), as_list(req.text_2))
        data = [{"index": i, "object": "score", "score": s} for i, s in enumerate(scores)]
        return {"id": f"score-{uuid.uuid4().hex}", "object": "list", "created": int(time.time()), "model": model,
                "data": data, "usage": self._usage(inputs)}

    async def rerank(self, body: dict) -> dict:
        req = await asyncio.to_thread(parse, RerankRequest, body)
        model = self._model(req)
        if not req.documents:
            raise APIError("'documents' must not be empty", param="documents")
        scores, inputs = await self._scores(req, [req.query], req.documents, names=("query", "documents"))
        order = sorted(range(len(scores)), key=lambda i: -scores[i])[: req.top_n or None]
        results = [{"index": i, "relevance_score": scores[i],
                    **({"document": {"text": req.documents[i]}} if req.return_documents else {})} for i in order]
        return {"id": f"rerank-{uuid.uuid4().hex}", "model": model, "usage": {"total_tokens": self._usage(inputs)[
            "total_tokens"]}, "results": results}


def _param_of(e: Exception, default: str) -> str:
    """The field an input's refusal is about: the input's own, unless its truncation is what cannot be done."""
    return "truncate_prompt_tokens" if str(e).startswith("truncate_prompt_tokens") else default


def refusing_routes(model_kind: str) -> list[Route]:
    """Routes that answer 400 because the served model is of the other kind ("generate" or "pooling")."""
    if model_kind == "generate":
        paths, what = POOLING_PATHS, "this model generates text; pooling routes need a pooling model (start the " \
                                     "server with --runner pooling, or --task embed / --convert embed)"
    else:
        paths, what = GENERATION_PATHS, "this model is a pooling model (embeddings, scores, classification): it " \
                                        "does not generate text; use /v1/embeddings, /pooling, /score, /rerank or /classify"

    async def refuse(request: Request) -> Response:
        raise APIError(f"{request.url.path}: {what}", param="model", code="model_not_supported")

    return [Route(p, refuse, methods=["POST"]) for p in paths]


def build_pooling_app(engine: PoolingEngine, *, served_model_names: list[str] | None = None,
                      model_path: str | None = None, api_key: str | None = None, max_body_bytes: int | None = None):
    """An ASGI app serving a pooling model: the pooling routes, /v1/models, /health, /version, /tokenize;
    generation routes answer 400."""
    from jaxllm.entrypoints import openai_server as server

    names = list(served_model_names or ["jaxllm"])
    max_body_bytes = max_body_bytes or server.MAX_BODY_BYTES
    batcher = PoolingBatcher(engine)
    serving = PoolingServing(engine, batcher, names)
    metrics = PoolingMetrics(names[0])
    limits = protocol.Limits(vocab_size=engine.config.vocab_size, max_model_len=engine.max_model_len, max_logprobs=0)
    created = int(time.time())

    async def read_json(request: Request) -> dict:
        body = await request.body()
        if len(body) > max_body_bytes:
            raise APIError(f"the request body is over the limit of {max_body_bytes} bytes", 413, code="request_too_large")
        # the generation server's parsing (a lone surrogate can be neither tokenized nor echoed back in an
        # error), like all of a request's host work in a worker thread: a 16 MiB body takes seconds, and the
        # event loop must keep answering (/health, the other requests)
        return await asyncio.to_thread(server.parse_json, body)

    def handler(method):
        async def answer(request: Request) -> dict:
            return await method(await read_json(request))

        async def route(request: Request) -> Response:
            # rendered off the loop too: 3,000 embeddings are 25 MB of JSON
            return await asyncio.to_thread(JSONResponse, await metrics.track(answer(request)))
        return route

    async def pooling(body: dict) -> dict:
        return await serving.embeddings(body, task="encode")

    async def models(request: Request) -> Response:
        data = [{"id": n, "object": "model", "created": created, "owned_by": "jaxllm", "root": model_path or n,
                 "parent": None, "max_model_len": engine.max_model_len, "permission": []} for n in names]
        return JSONResponse({"object": "list", "data": data})

    async def tokenize(request: Request) -> Response:
        req = await asyncio.to_thread(parse, TokenizeRequest, await read_json(request))
        serving._model(req)
        tokens = (await asyncio.to_thread(engine.tokenizer, req.prompt,
                                          add_special_tokens=req.add_special_tokens))["input_ids"]
        return JSONResponse({"count": len(tokens), "tokens": tokens, "max_model_len": engine.max_model_len})

    async def detokenize(request: Request) -> Response:
        req = await asyncio.to_thread(protocol.parse, protocol.DetokenizeRequest, await read_json(request), limits)
        serving._model(req)
        return JSONResponse({"prompt": await asyncio.to_thread(engine.tokenizer.decode, req.tokens)})

    async def health(request: Request) -> Response:
        return Response(status_code=200)

    async def metrics_route(request: Request) -> Response:
        return Response(metrics.render(), media_type=CONTENT_TYPE)

    async def version(request: Request) -> Response:
        return JSONResponse({"version": jaxllm.__version__})

    async def on_api_error(request: Request, exc: APIError) -> Response:
        return server.error_response(exc)

    async def on_http_error(request: Request, exc: HTTPException) -> Response:
        message = {404: f"Not found: {request.method} {request.url.path}",
                   405: f"Method {request.method} is not allowed on {request.url.path}"}.get(exc.status_code,
                                                                                          str(exc.detail))
        return server.error_response(APIError(message, status=exc.status_code))

    async def on_error(request: Request, exc: Exception) -> Response:
        server.logger.exception("unhandled error on %s %s", request.method, request.url.path)
        return server.error_response(APIError(f"internal server error: {type(exc).__name__}: {exc}", status=500))

    @asynccontextmanager
    async def lifespan(app):
        batcher.start()
        try:
            yield
        finally:
            await batcher.shutdown()

    routes = [Route("/v1/embeddings", handler(serving.embeddings), methods=["POST"]),
              Route("/pooling", handler(pooling), methods=["POST"]),
              Route("/classify", handler(serving.classify), methods=["POST"]),
              *[Route(p, handler(serving.score), methods=["POST"]) for p in ("/score", "/v1/score")],
              *[Route(p, handler(serving.rerank), methods=["POST"]) for p in ("/rerank", "/v1/rerank", "/v2/rerank")],
              Route("/v1/models", models, methods=["GET"]), Route("/tokenize", tokenize, methods=["POST"]),
              Route("/detokenize", detokenize, methods=["POST"]), Route("/health", health, methods=["GET"]),
              Route("/ping", health, methods=["GET", "POST"]), Route("/version", version, methods=["GET"]),
              Route("/metrics", metrics_route, methods=["GET"]),
              *refusing_routes("pooling")]
    app = Starlette(routes=routes, lifespan=lifespan,
                    exception_handlers={APIError: on_api_error, HTTPException: on_http_error, Exception: on_error})
    app.state.batcher = batcher
    app.state.metrics = metrics
    app.state.served_model_names = names
    guarded = server._Guard(app, api_key, max_body_bytes)
    guarded.state = app.state
    return guarded
