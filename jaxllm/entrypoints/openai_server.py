"""The OpenAI-compatible HTTP server: `jaxllm serve MODEL` or `python server.py --model ...`.

`build_app(engine, ...)` wires an LLMEngine into a Starlette app; the CLI (the same flag names as
`vllm serve`) is in cli_args.py and launcher.py. HTTP concerns live here: body limits, the API keys,
JSON errors, SSE, and client disconnects (which abort the client's engine requests, streaming or not).
"""

from __future__ import annotations

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
from jaxllm.engine import LLMEngine
from jaxllm.entrypoints.async_engine import AsyncLLMEngine, EngineDeadError, EngineError, RequestError
from jaxllm.entrypoints.metrics import CONTENT_TYPE, ServerMetrics
from jaxllm.entrypoints.protocol import APIError, error_dict, find_lone_surrogate
from jaxllm.entrypoints.pooling_routes import refusing_routes
from jaxllm.entrypoints.reasoning_parsers import get_reasoning_parser
from jaxllm.entrypoints.serving import OpenAIServing
from jaxllm.entrypoints.tool_parsers import get_tool_parser
from jaxllm.generation_config import with_generation_defaults

logger = logging.getLogger("jaxllm.server")

MAX_BODY_BYTES = 16 * 2**20
OPEN_PATHS = ("/health", "/ping", "/version", "/metrics")  # reachable without the API key


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
    if isinstance(e, RequestError):
        return APIError(str(e), status=400, code="structured_output_failed")
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


def api_keys(api_key: str | list[str] | None) -> list[str]:
    """The keys that open the server: vLLM's `--api-key` takes several, and an empty one means none."""
    keys = [api_key] if isinstance(api_key, str) else list(api_key or [])
    return [key for key in keys if key]


class _Guard:
    """ASGI middleware: one of the API keys on every route but OPEN_PATHS (and CORS preflights), and a
    cap on declared body sizes."""

    def __init__(self, app, api_key: str | list[str] | None, max_body_bytes: int):
        self.app, self.max_body_bytes = app, max_body_bytes
        self.expected = [f"Bearer {key}".encode() for key in api_keys(api_key)]

    def _authorized(self, given: str) -> bool:
        given = given.encode("latin-1")
        # every key compared, so the time taken does not tell which one nearly matched
        return sum(hmac.compare_digest(given, expected) for expected in self.expected) > 0

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope["headers"]}
        path = scope["path"]
        root = scope.get("root_path", "")
        if root and path.startswith(root):  # behind --root-path, uvicorn passes the full path
            path = path[len(root):] or "/"
        if self.expected and path not in OPEN_PATHS and scope["method"] != "OPTIONS":
            if not self._authorized(headers.get("authorization", "")):
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
              api_key: str | list[str] | None = None, chat_template: str | None = None,
              max_body_bytes: int = MAX_BODY_BYTES, shutdown_timeout: float = 10.0,
              default_sampling_params: dict | None = None, tool_call_parser: str | None = None,
              reasoning_parser: str | None = None):
    """An ASGI app serving `engine`. The engine loop starts and stops with the app's lifespan; `app.state`
    holds `async_engine` and `metrics`.

    Args:
        served_model_names: the names clients may pass as `model` (the first is listed); default "jaxllm".
        model_path: shown as the model's `root` in /v1/models.
        api_key: a key or a list of keys; with any non-empty one, every route but /health, /ping, /version and
            /metrics needs `Authorization: Bearer KEY` with one of them.
        chat_template: a Jinja chat template (text) that replaces the tokenizer's.
        max_body_bytes: larger request bodies get a 413.
        shutdown_timeout: seconds the requests in flight may run after SIGTERM before they are ended.
        default_sampling_params: {field: value} from the model's generation config, for the completion and
            chat fields a request leaves out (see with_generation_defaults).
        tool_call_parser: parses tool calls from the text for tool_choice "auto" (hermes, llama3_json, mistral).
        reasoning_parser: splits reasoning_content off the text (qwen3, deepseek_r1).
    """
    names = list(served_model_names or ["jaxllm"])
    metrics = ServerMetrics(engine, names[0])
    async_engine = AsyncLLMEngine(engine, on_output=metrics.observe, on_abort=metrics.observe_abort)
    serving = OpenAIServing(async_engine, names, chat_template,
                            tool_parser=get_tool_parser(tool_call_parser) if tool_call_parser else None,
                            reasoning_parser=get_reasoning_parser(reasoning_parser) if reasoning_parser else None)
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
        prep = await prepared(request, lambda body: serving.prepare_completion(
            with_generation_defaults(body, default_sampling_params)))
        if prep.req.stream:
            return stream(serving.completion_stream(prep))
        return await respond(request, serving.completion(prep))

    async def chat_completions(request: Request) -> Response:
        prep = await prepared(request, lambda body: serving.prepare_chat(
            with_generation_defaults(body, default_sampling_params)))
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


def serve(app, config) -> None:
    """Run `app` under uvicorn; the shutdown signal starts the app's drain (Lifecycle) at once."""
    import uvicorn

    lifecycle = getattr(app.state, "lifecycle", None)
    if lifecycle is None:  # a pooling model's app: no streams to end, its requests finish within uvicorn's drain
        uvicorn.Server(config).run()
        return

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


def __getattr__(name: str):
    # The CLI moved to cli_args.py and launcher.py; these names stay importable from here (lazily: the
    # launcher imports this module).
    if name in ("make_arg_parser", "load_app", "main"):
        from jaxllm.entrypoints import cli_args, launcher

        return getattr(cli_args if name == "make_arg_parser" else launcher, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
