"""Start the server from parsed arguments: load the model, build the app (CORS, API keys, root path),
run uvicorn (SSL, log levels). Shared by every way in: `jaxllm serve`, `python -m
jaxllm.entrypoints.openai.api_server`, `python -m jaxllm.entrypoints.api_server`, `python server.py`."""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

from jaxllm.entrypoints.cli_args import DEFAULT_SERVED_NAME, parse_args, settle_args

logger = logging.getLogger("jaxllm.server")


def load_app(args: argparse.Namespace):
    """Load the model named by the parsed CLI args and build the app (an ASGI app with `.state`)."""
    from jaxllm import LLM
    from jaxllm.entrypoints.openai_server import build_app
    from jaxllm.generation_config import default_sampling_params
    from jaxllm.llm import batch_limits

    args = settle_args(args)  # idempotent: parse_args settled it already, make_arg_parser().parse_args did not
    dtype = {"float": "float32", "half": "float16"}.get(args.dtype, args.dtype)
    # vLLM's server defaults (smaller steps than offline)
    max_num_seqs, max_num_batched_tokens = batch_limits(args.max_num_seqs, args.max_num_batched_tokens, "server")
    engine_kwargs = dict(max_model_len=args.max_model_len, block_size=args.block_size, max_num_seqs=max_num_seqs,
                         max_num_batched_tokens=max_num_batched_tokens,
                         gpu_memory_utilization=args.gpu_memory_utilization,
                         enable_prefix_caching=args.enable_prefix_caching,
                         enable_chunked_prefill=args.enable_chunked_prefill, seed=args.seed,
                         num_gpu_blocks_override=args.num_gpu_blocks_override, max_logprobs=args.max_logprobs,
                         kv_cache_dtype=args.kv_cache_dtype, tensor_parallel_size=args.tensor_parallel_size,
                         data_parallel_size=args.data_parallel_size, reasoning_parser=args.reasoning_parser)
    if args.model_shape:
        from jaxllm.entrypoints.random_weights import random_weights_llm

        llm = random_weights_llm(args.model_shape, dtype, engine_kwargs, args.tokenizer, args.quantization)
        model_path, defaults = f"random:{args.model_shape}", {}
    else:
        pooling = {k: v for k, v in (("task", args.task), ("runner", args.runner), ("convert", args.convert))
                   if v != "auto"}
        if args.pooler_config:
            pooling["override_pooler_config"] = args.pooler_config
        llm = LLM(args.model, tokenizer=args.tokenizer, dtype=dtype, quantization=args.quantization, revision=args.revision,
                  download_dir=args.download_dir, tokenizer_mode=args.tokenizer_mode,
                  trust_remote_code=args.trust_remote_code, generation_config=args.generation_config,
                  override_generation_config=args.override_generation_config,
                  **_pooling_batch_limits(args, engine_kwargs, pooling), **pooling)
        model_path = str(llm.model)
        names = args.served_model_name or [args.model or DEFAULT_SERVED_NAME]
        if llm._pooling is not None:
            from jaxllm.entrypoints.pooling_routes import build_pooling_app

            return _with_cors(build_pooling_app(llm._pooling, served_model_names=names, model_path=model_path,
                                                api_key=args.api_key, max_body_bytes=args.max_request_body_bytes),
                              args)
        defaults = default_sampling_params(model_path if Path(model_path).is_dir() else None,
                                           args.generation_config, args.override_generation_config)
    if defaults:
        logger.info("default sampling parameters from the model's generation config: %s (a request's own "
                    "values win; --generation-config vllm turns this off)", defaults)
    names = args.served_model_name or [args.model_shape or args.model or DEFAULT_SERVED_NAME]
    app = build_app(llm.llm_engine, served_model_names=names, model_path=model_path, api_key=args.api_key,
                    chat_template=args.chat_template_text, max_body_bytes=args.max_request_body_bytes,
                    shutdown_timeout=args.shutdown_timeout, default_sampling_params=defaults,
                    tool_call_parser=args.tool_call_parser if args.enable_auto_tool_choice else None,
                    reasoning_parser=args.reasoning_parser)
    return _with_cors(app, args)


def _with_cors(app, args: argparse.Namespace):
    # CORS outermost, so a preflight is answered before the API key is asked for and a 401 carries the
    # CORS headers a browser needs to read it.
    from starlette.middleware.cors import CORSMiddleware

    cors = CORSMiddleware(app, allow_origins=args.allowed_origins, allow_methods=args.allowed_methods,
                          allow_headers=args.allowed_headers, allow_credentials=args.allow_credentials)
    cors.state = app.state
    return cors


def _pooling_batch_limits(args: argparse.Namespace, engine_kwargs: dict, pooling: dict) -> dict:
    """A pooling model keeps its own engine's batch defaults (not the generation server's)."""
    from jaxllm.pooling_engine import read_hf_dict, resolve_runner

    if args.model and resolve_runner(read_hf_dict(args.model), task=args.task, runner=args.runner,
                                     convert=args.convert)[0] == "pooling":
        return {**engine_kwargs, "max_num_seqs": args.max_num_seqs,
                "max_num_batched_tokens": args.max_num_batched_tokens}
    return engine_kwargs


def uvicorn_config(app, args: argparse.Namespace):
    """uvicorn's Config for the parsed args (address, SSL, root path, log levels)."""
    import uvicorn

    return uvicorn.Config(
        app, host=args.host, port=args.port, log_level=args.uvicorn_log_level or args.log_level,
        access_log=not args.disable_uvicorn_access_log, root_path=args.root_path or "",
        ssl_keyfile=args.ssl_keyfile, ssl_certfile=args.ssl_certfile, ssl_ca_certs=args.ssl_ca_certs,
        ssl_cert_reqs=args.ssl_cert_reqs, lifespan="on")


def main(argv: list[str] | None = None, prog: str = "python server.py") -> None:
    """Parse `argv` (default: sys.argv[1:]), load the model and serve until SIGINT/SIGTERM."""
    from jaxllm.entrypoints.openai_server import serve

    args = parse_args(argv, prog)
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("jaxllm").setLevel(args.log_level.upper())
    app = load_app(args)
    # On SIGINT/SIGTERM: stop admitting (503), let in-flight requests run up to --shutdown-timeout, end the
    # rest cleanly, then the lifespan stops the engine loop.
    serve(app, uvicorn_config(app, args))
