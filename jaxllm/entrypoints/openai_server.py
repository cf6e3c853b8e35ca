"""The OpenAI-compatible HTTP server: `python server.py --model ...` or `python -m jaxllm.serve`.

`build_app(engine, ...)` wires an LLMEngine into a Starlette app; `main()` is the CLI (the same flag
names as `vllm serve`). HTTP concerns live here: body limits, the API key, JSON errors, SSE, and
client disconnects (which abort the client's engine requests, streaming or not).
"""

from __future__ import annotations

import argparse
import asyncio
import hmac
import json
import logging
import time
from collections.abc import AsyncIterator, Awaitable
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager

from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

import jaxllm
from jaxllm.detokenizer import backend_decoder
from jaxllm.engine import LLMEngine
from jaxllm.entrypoints.async_engine import AsyncLLMEngine, EngineDeadError, EngineError
from jaxllm.entrypoints.metrics import CONTENT_TYPE, ServerMetrics
from jaxllm.entrypoints.protocol import APIError, error_dict, find_lone_surrogate
from jaxllm.entrypoints.pooling_routes import build_pooling_app, refusing_routes
from jaxllm.entrypoints.serving import OpenAIServing, check_chat_template

logger = logging.getLogger("jaxllm.server")

MAX_BODY_BYTES = 16 * 2**20
OPEN_PATHS = ("/health", "/version", "/metrics")  # reachable without the API key


def error_response(error: APIError) -> JSONResponse:
    return JSONResponse(error.to_dict(), status_code=error.status)


def _parse_int(text: str):
    # Python refuses to convert integers of over 4,300 digits (a ValueError deep in json.loads); such a
    # number is past every range anyway, so it becomes infinity and the field's own check refuses it.
    if len(text) <= 4000:
        return int(text)
    return float("-inf") if text.startswith("-") else float("inf")


def parse_json(body: bytes) -> dict:
    """The request body as a JSON object; a 400 for anything else, naming the field of a lone surrogate."""
    try:
        data = json.loads(body, parse_int=_parse_int)
    except (ValueError, RecursionError) as e:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
        raise APIError(f"the request body is not valid JSON: {e}") from None
    if not isinstance(data, dict):
        raise APIError("the request body must be a JSON object")
    field = find_lone_surrogate(data)
    if field is not None:
        raise APIError(f"'{field}' holds a lone surrogate, which is not valid Unicode", param=field)
    return data


def _engine_error(e: EngineError) -> APIError:
    if isinstance(e, EngineDeadError):
        return APIError(str(e), status=503, code="server_shutting_down")
    return APIError(str(e), status=500)


class Lifecycle:
    """Admission and shutdown: on SIGTERM the server stops admitting (503), lets the requests in flight
    run for `shutdown_timeout` seconds, then ends every one still running cleanly (streams with an
    error event and `data: [DONE]`, others with an OpenAI-shaped 503)."""

    def __init__(self, async_engine: AsyncLLMEngine, shutdown_timeout: float):
        self.async_engine, self.shutdown_timeout = async_engine, shutdown_timeout
        self.draining = False
        self._task: asyncio.Task | None = None

    def begin_drain(self) -> None:
        """Called on the event loop when the shutdown signal arrives."""
        if self.draining:
            return
        self.draining = True
        logger.info("shutting down: no new requests; %d in flight get up to %.1f s",
                    self.async_engine.num_in_flight, self.shutdown_timeout)
        self._task = asyncio.get_running_loop().create_task(self._end_after_timeout())

    async def _end_after_timeout(self) -> None:
        deadline = time.monotonic() + self.shutdown_timeout
        while self.async_engine.num_in_flight and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        self.async_engine.end_all(EngineDeadError("the server is shutting down: the request did not finish "
                                                  "within the shutdown timeout"))


class _ClientGone(Exception):
    pass


async def _wait_for_disconnect(request: Request) -> None:
    while (await request.receive())["type"] != "http.disconnect":
        pass


async def _unless_disconnected(request: Request, work: Awaitable):
    """Await `work`, cancelling it (which aborts its engine requests) if the client disconnects first."""
    task = asyncio.ensure_future(work)
    watcher = asyncio.ensure_future(_wait_for_disconnect(request))
    try:
        await asyncio.wait({task, watcher}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for t in (task, watcher):
            if not t.done():
                t.cancel()
        await asyncio.gather(task, watcher, return_exceptions=True)
    if task.cancelled():
        raise _ClientGone()
    return task.result()


class _ClosingStreamingResponse(StreamingResponse):
    """A StreamingResponse that always closes its body iterator (so a disconnect aborts promptly)."""

    async def __call__(self, scope, receive, send):
        try:
            await super().__call__(scope, receive, send)
        finally:
            await self.body_iterator.aclose()


async def _sse(chunks: AsyncIterator[dict]) -> AsyncIterator[str]:
    try:
        async for chunk in chunks:
            yield f"data: {json.dumps(chunk, ensure_ascii=False)}\n\n"
    except EngineError as e:
        error = _engine_error(e)
        yield f"data: {json.dumps(error_dict(error.message, error.status, code=error.code))}\n\n"
    except Exception as e:  # noqa: BLE001 - a stream always ends with an error event and [DONE]
        logger.exception("a stream failed")
        yield f"data: {json.dumps(error_dict(f'internal server error: {type(e).__name__}: {e}', 500))}\n\n"
    finally:
        await chunks.aclose()
    yield "data: [DONE]\n\n"


async def _json_lines(chunks: AsyncIterator[dict]) -> AsyncIterator[str]:
    try:
        async for chunk in chunks:
            yield json.dumps(chunk, ensure_ascii=False) + "\n"
    except EngineError as e:
        error = _engine_error(e)
        yield json.dumps(error_dict(error.message, error.status, code=error.code)) + "\n"
    except Exception as e:  # noqa: BLE001
        logger.exception("a stream failed")
        yield json.dumps(error_dict(f"internal server error: {type(e).__name__}: {e}", 500)) + "\n"
    finally:
        await chunks.aclose()


class _Guard:
    """ASGI middleware: the API key on every route but OPEN_PATHS, and a cap on declared body sizes."""

    def __init__(self, app, api_key: str | None, max_body_bytes: int):
        self.app, self.api_key, self.max_body_bytes = app, api_key, max_body_bytes

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope["headers"]}
        if self.api_key is not None and scope["path"] not in OPEN_PATHS:
            given = headers.get("authorization", "")
            expected = f"Bearer {self.api_key}"
            if not hmac.compare_digest(given.encode(), expected.encode()):
                error = APIError("Incorrect API key provided: pass 'Authorization: Bearer <key>'.", status=401,
                                 code="invalid_api_key")
                return await error_response(error)(scope, receive, send)
        length = headers.get("content-length")
        if length is not None and length.isdigit() and int(length) > self.max_body_bytes:
            error = APIError(f"the request body of {length} bytes is over the limit of {self.max_body_bytes} "
                             "bytes", status=413, code="request_too_large")
            return await error_response(error)(scope, receive, send)
        await self.app(scope, receive, send)


def build_app(engine: LLMEngine, *, served_model_names: list[str] | None = None, model_path: str | None = None,
              api_key: str | None = None, chat_template: str | None = None,
              max_body_bytes: int = MAX_BODY_BYTES, shutdown_timeout: float = 10.0):
    """An ASGI app serving `engine`. The engine loop starts and stops with the app's lifespan; `app.state`
    holds `async_engine` and `metrics`.

    Args:
        served_model_names: the names clients may pass as `model` (the first is listed); default "jaxllm".
        model_path: shown as the model's `root` in /v1/models.
        api_key: when set, every route but /health, /version and /metrics needs `Authorization: Bearer KEY`.
        chat_template: a Jinja chat template (text) that replaces the tokenizer's.
        max_body_bytes: larger request bodies get a 413.
        shutdown_timeout: seconds the requests in flight may run after SIGTERM before they are ended.
    """
    names = list(served_model_names or ["jaxllm"])
    metrics = ServerMetrics(engine, names[0])
    async_engine = AsyncLLMEngine(engine, on_output=metrics.observe, on_abort=metrics.observe_abort)
    serving = OpenAIServing(async_engine, names, chat_template)
    lifecycle = Lifecycle(async_engine, shutdown_timeout)
    # Parsing, validating and tokenizing run here, off the event loop; two workers so that one huge
    # body does not hold up the small requests behind it.
    host_pool = ThreadPoolExecutor(max_workers=2, thread_name_prefix="jaxllm-host")
    created = int(time.time())

    async def read_body(request: Request) -> bytes:
        body = bytearray()
        async for chunk in request.stream():
            body += chunk
            if len(body) > max_body_bytes:
                raise APIError(f"the request body is over the limit of {max_body_bytes} bytes", status=413,
                               code="request_too_large")
        return bytes(body)

    async def prepared(request: Request, prepare):
        """Read the body, then parse, validate and tokenize it in a worker thread: a 15 MiB prompt takes
        seconds of host work, and the event loop must keep serving (/health, the streams in flight)."""
        if lifecycle.draining:
            raise APIError("the server is shutting down and admits no new requests", status=503,
                           code="server_shutting_down")
        body = await read_body(request)
        return await asyncio.get_running_loop().run_in_executor(
            host_pool, lambda: prepare(parse_json(body)))

    async def respond(request: Request, work: Awaitable) -> Response:
        try:
            return JSONResponse(await _unless_disconnected(request, work))
        except _ClientGone:
            return Response(status_code=499)  # nobody is listening; the engine requests are aborted
        except EngineError as e:
            return error_response(_engine_error(e))
        except APIError as e:
            return error_response(e)
        except Exception as e:  # noqa: BLE001 - answered here, so the keep-alive connection stays open
            logger.exception("request failed on %s", request.url.path)
            return error_response(APIError(f"internal server error: {type(e).__name__}: {e}", status=500))

    def stream(chunks: AsyncIterator[dict], sse: bool = True) -> Response:
        if sse:
            return _ClosingStreamingResponse(_sse(chunks), media_type="text/event-stream",
                                             headers={"Cache-Control": "no-cache"})
        return _ClosingStreamingResponse(_json_lines(chunks), media_type="application/x-ndjson")

    async def completions(request: Request) -> Response:
        prep = await prepared(request, serving.prepare_completion)
        if prep.req.stream:
            return stream(serving.completion_stream(prep))
        return await respond(request, serving.completion(prep))

    async def chat_completions(request: Request) -> Response:
        prep = await prepared(request, serving.prepare_chat)
        if prep.req.stream:
            return stream(serving.chat_stream(prep))
        return await respond(request, serving.chat(prep))

    async def generate(request: Request) -> Response:
        prep = await prepared(request, serving.prepare_generate)
        if prep.req.stream:
            return stream(serving.generate_stream(prep), sse=False)
        return await respond(request, serving.generate(prep))

    def model_card(name: str) -> dict:
        return {"id": name, "object": "model", "created": created, "owned_by": "jaxllm",
                "root": model_path or name, "parent": None, "max_model_len": engine.config.max_model_len,
                "permission": []}

    async def models(request: Request) -> Response:
        return JSONResponse({"object": "list", "data": [model_card(name) for name in names]})

    async def model(request: Request) -> Response:
        name = request.path_params["model_id"]
        if name not in names:
            raise APIError(f"The model `{name}` does not exist.", status=404, param="model", code="model_not_found")
        return JSONResponse(model_card(name))

    async def tokenize(request: Request) -> Response:
        return JSONResponse(await prepared(request, serving.tokenize))

    async def detokenize(request: Request) -> Response:
        return JSONResponse(await prepared(request, serving.detokenize))

    async def health(request: Request) -> Response:
        return Response(status_code=503 if async_engine.dead else 200)

    async def version(request: Request) -> Response:
        return JSONResponse({"version": jaxllm.__version__})

    async def metrics_route(request: Request) -> Response:
        return Response(metrics.render(), media_type=CONTENT_TYPE)

    async def on_api_error(request: Request, exc: APIError) -> Response:
        return error_response(exc)

    async def on_http_error(request: Request, exc: HTTPException) -> Response:
        message = {404: f"Not found: {request.method} {request.url.path}",
                   405: f"Method {request.method} is not allowed on {request.url.path}"}.get(exc.status_code,
                                                                                          str(exc.detail))
        return error_response(APIError(message, status=exc.status_code))

    async def on_error(request: Request, exc: Exception) -> Response:
        logger.exception("unhandled error on %s %s", request.method, request.url.path)
        return error_response(APIError(f"internal server error: {type(exc).__name__}: {exc}", status=500))

    @asynccontextmanager
    async def lifespan(app):
        async_engine.start()
        try:
            yield
        finally:
            await async_engine.shutdown()
            host_pool.shutdown(wait=False, cancel_futures=True)

    routes = [
        Route("/v1/models", models, methods=["GET"]),
        Route("/v1/completions", completions, methods=["POST"]),
        Route("/v1/chat/completions", chat_completions, methods=["POST"]),
        Route("/generate", generate, methods=["POST"]),
        Route("/tokenize", tokenize, methods=["POST"]),
        Route("/detokenize", detokenize, methods=["POST"]),
        Route("/v1/models/{model_id:path}", model, methods=["GET"]),
        Route("/health", health, methods=["GET"]),
        Route("/ping", health, methods=["GET", "POST"]),
        Route("/version", version, methods=["GET"]),
        Route("/metrics", metrics_route, methods=["GET"]),
        *refusing_routes("generate"),  # the pooling routes, answering 400 for a generative model
    ]
    app = Starlette(routes=routes, lifespan=lifespan,
                    exception_handlers={APIError: on_api_error, HTTPException: on_http_error, Exception: on_error})
    app.state.async_engine = async_engine
    app.state.metrics = metrics
    app.state.lifecycle = lifecycle
    app.state.served_model_names = names
    guarded = _Guard(app, api_key, max_body_bytes)
    guarded.state = app.state
    return guarded


# -- CLI --------------------------------------------------------------------------------------------
class _HelpFormatter(argparse.HelpFormatter):
    """Shows a flag's default unless it is None or the help already names it."""

    def _get_help_string(self, action):
        text = action.help or ""
        if action.default not in (None, argparse.SUPPRESS) and "default" not in text and action.option_strings:
            text += " (default: %(default)s)"
        return text


def make_arg_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python server.py", description="jaxllm's OpenAI-compatible server (flags named as in `vllm serve`).",
        formatter_class=_HelpFormatter)
    p.add_argument("--model", default=None,
                   help="a Hugging Face model folder or a .gguf file; default: SmolLM2-135M-Instruct (GGUF)")
    p.add_argument("--model-shape", default=None,
                   help="serve random weights at a real model's shape (smollm2-135m, qwen3-0.6b, llama3-8b, ...) "
                        "with the default model's tokenizer (or --tokenizer), for benchmarks; replaces --model")
    p.add_argument("--tokenizer", default=None, help="a tokenizer folder or file; default: the model's")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on")
    p.add_argument("--port", type=int, default=8000, help="port to listen on")
    p.add_argument("--served-model-name", nargs="+", default=None,
                   help="names clients use as `model` (the first is listed by /v1/models); default: --model as given, "
                        f"or {DEFAULT_SERVED_NAME} for the default model")
    p.add_argument("--api-key", default=None,
                   help="require `Authorization: Bearer KEY` on every route but /health, /version and /metrics")
    p.add_argument("--chat-template", default=None, help="a Jinja chat template file replacing the tokenizer's")
    p.add_argument("--max-model-len", type=int, default=None,
                   help="longest prompt + completion in tokens; default: the model's context length")
    p.add_argument("--block-size", type=int, default=16, help="tokens per KV-cache block")
    p.add_argument("--gpu-memory-utilization", type=float, default=0.9,
                   help="share of accelerator memory the engine may use (weights, activations, KV cache)")
    p.add_argument("--num-gpu-blocks-override", type=int, default=None,
                   help="a fixed number of KV-cache blocks instead of sizing from memory")
    p.add_argument("--max-num-seqs", type=int, default=None,
                   help="most sequences in one step; default: vLLM's (1024 on GPUs of 70 GiB or more, else 256; 32 on a CPU)")
    p.add_argument("--max-num-batched-tokens", type=int, default=None,
                   help="most tokens in one step; default: vLLM's server value (8192 on GPUs of 70 GiB or more, else 2048; 512 on a CPU)")
    p.add_argument("--enable-prefix-caching", action=argparse.BooleanOptionalAction, default=True,
                   help="reuse the KV blocks of prompts that share a prefix")
    p.add_argument("--dtype", default="auto", choices=["auto", "float32", "float", "bfloat16", "float16", "half"],
                   help="weight and compute dtype; auto: the checkpoint's")
    p.add_argument("--seed", type=int, default=0, help="seeds the per-request seeds of requests that bring none")
    p.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error", "critical"],
                   help="log level of jaxllm and uvicorn")
    p.add_argument("--task", default="auto", help="vLLM's older name for what the model does: generate, embed, "
                   "classify, score (embed/classify/score serve a pooling model)")
    p.add_argument("--runner", default="auto", choices=["auto", "generate", "pooling"],
                   help="generate text, or pool (embeddings, scores, classification); auto: by the architecture")
    p.add_argument("--convert", default="auto", choices=["auto", "none", "embed", "classify"],
                   help="run a causal LM as an embedding model (embed: last token, normalised)")
    p.add_argument("--override-pooler-config", "--pooler-config", dest="pooler_config", default=None,
                   help='JSON of PoolerConfig fields, e.g. \'{"pooling_type": "MEAN", "normalize": true}\'')
    p.add_argument("--max-request-body-bytes", type=int, default=MAX_BODY_BYTES,
                   help="larger request bodies are refused with 413 (not a vLLM flag)")
    add_shutdown_args(p)
    return p


def add_shutdown_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--shutdown-timeout", type=float, default=10.0,
                   help="on SIGTERM/SIGINT, seconds the requests in flight may still run; then each is ended "
                        "cleanly (streams get an error event and [DONE], others a 503)")


def serve(app, config) -> None:
    """Run `app` under uvicorn; the shutdown signal starts the app's drain (Lifecycle) at once."""
    import uvicorn

    lifecycle = app.state.lifecycle

    class Server(uvicorn.Server):
        def handle_exit(self, sig, frame):
            loop = getattr(self, "_jaxllm_loop", None)
            if loop is not None:
                loop.call_soon_threadsafe(lifecycle.begin_drain)
            super().handle_exit(sig, frame)

        async def serve(self, sockets=None):
            self._jaxllm_loop = asyncio.get_running_loop()
            await super().serve(sockets)

    # uvicorn's own grace period outlasts the drain, so that the app ends every request itself.
    config.timeout_graceful_shutdown = lifecycle.shutdown_timeout + 5
    Server(config).run()


def load_app(args: argparse.Namespace):
    """Load the model named by the parsed CLI args and build the app."""
    from jaxllm import LLM

    from jaxllm.llm import batch_limits

    dtype = {"float": "float32", "half": "float16"}.get(args.dtype, args.dtype)
    # vLLM's server defaults (smaller steps than offline)
    max_num_seqs, max_num_batched_tokens = batch_limits(args.max_num_seqs, args.max_num_batched_tokens, "server")
    engine_kwargs = dict(max_model_len=args.max_model_len, block_size=args.block_size, max_num_seqs=max_num_seqs,
                         max_num_batched_tokens=max_num_batched_tokens,
                         gpu_memory_utilization=args.gpu_memory_utilization,
                         enable_prefix_caching=args.enable_prefix_caching, seed=args.seed,
                         num_gpu_blocks_override=args.num_gpu_blocks_override)
    if args.model_shape:
        llm = _random_weights_llm(args.model_shape, dtype, engine_kwargs, args.tokenizer)
        model_path = f"random:{args.model_shape}"
    else:
        pooling = {k: v for k, v in (("task", args.task), ("runner", args.runner), ("convert", args.convert))
                   if v != "auto"}
        if args.pooler_config:
            pooling["override_pooler_config"] = args.pooler_config
        from jaxllm.pooling_engine import read_hf_dict, resolve_runner

        if args.model and resolve_runner(read_hf_dict(args.model), task=args.task, runner=args.runner,
                                         convert=args.convert)[0] == "pooling":  # the pooling engine's own defaults
            engine_kwargs.update(max_num_seqs=args.max_num_seqs, max_num_batched_tokens=args.max_num_batched_tokens)
        llm = LLM(args.model, tokenizer=args.tokenizer, dtype=dtype, **engine_kwargs, **pooling)
        model_path = str(llm.model)
    names = args.served_model_name or [args.model_shape or args.model or DEFAULT_SERVED_NAME]
    if llm._pooling is not None:
        return build_pooling_app(llm._pooling, served_model_names=names, model_path=model_path, api_key=args.api_key,
                                 max_body_bytes=args.max_request_body_bytes)
    chat_template = None
    if args.chat_template:
        with open(args.chat_template, encoding="utf-8") as f:
            chat_template = f.read()
    names = args.served_model_name or [args.model_shape or args.model or DEFAULT_SERVED_NAME]
    return build_app(llm.llm_engine, served_model_names=names, model_path=model_path, api_key=args.api_key,
                     chat_template=chat_template, max_body_bytes=args.max_request_body_bytes,
                     shutdown_timeout=getattr(args, "shutdown_timeout", 10.0))


DEFAULT_SERVED_NAME = "SmolLM2-135M-Instruct"


class _WrappingTokenizer:
    """The default model's tokenizer over a random-weight model of another vocabulary: token ids past its
    vocabulary decode as `id % len(tokenizer)`, so streamed text is never empty (for benchmarks)."""

    backend_tokenizer = None  # the detokenizer must decode through `decode`, which wraps the ids

    def __init__(self, base):
        self._base, self._size = base, len(base)
        self._backend_decode = backend_decoder(base)

    def __getattr__(self, name):
        return getattr(self._base, name)

    def __len__(self):
        return self._size

    def __call__(self, *args, **kwargs):
        return self._base(*args, **kwargs)

    def decode(self, ids, skip_special_tokens: bool = False, **kwargs):
        ids = [int(i) % self._size for i in ids] if isinstance(ids, (list, tuple)) else [int(ids) % self._size]
        if self._backend_decode is not None:
            return self._backend_decode(ids, skip_special_tokens=skip_special_tokens)
        return self._base.decode(ids, skip_special_tokens=skip_special_tokens, **kwargs)


def _random_weights_llm(shape: str, dtype: str, engine_kwargs: dict, tokenizer: str | None = None):
    import jax

    from jaxllm import LLM
    from jaxllm.loader import default_model_path, load_tokenizer
    from jaxllm.models.shapes import init_random_weights, model_shape_config

    config = model_shape_config(shape, "bfloat16" if dtype == "auto" else dtype)
    params = init_random_weights(config, jax.random.PRNGKey(engine_kwargs["seed"]))
    tokenizer = _WrappingTokenizer(load_tokenizer(tokenizer or default_model_path()))
    return LLM.from_params(params, config, tokenizer, **engine_kwargs)


def main(argv: list[str] | None = None) -> None:
    import uvicorn

    parser = make_arg_parser()
    args = parser.parse_args(argv)
    if args.model and args.model_shape:
        parser.error("pass --model or --model-shape, not both")
    if args.chat_template:  # before the model loads: a bad template file is named at once
        try:
            with open(args.chat_template, encoding="utf-8") as f:
                check_chat_template(f.read())
        except (OSError, ValueError) as e:
            parser.error(f"--chat-template: {e}")
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("jaxllm").setLevel(args.log_level.upper())
    app = load_app(args)
    config = uvicorn.Config(app, host=args.host, port=args.port, log_level=args.log_level,
                            timeout_graceful_shutdown=10, lifespan="on")
    # On SIGINT/SIGTERM: stop admitting (503), let in-flight requests run up to --shutdown-timeout, end the
    # rest cleanly, then the lifespan stops the engine loop.
    serve(app, config)
