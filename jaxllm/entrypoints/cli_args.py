"""The server's command line, with `vllm serve`'s flag names, meanings and defaults.

    jaxllm serve MODEL [flags]                                   # the console script
    python -m jaxllm.entrypoints.openai.api_server --model MODEL [flags]
    python -m jaxllm.entrypoints.api_server --model MODEL [flags]
    python server.py [--model MODEL] [flags]

A vLLM flag that has no meaning here is refused by name with the reason (never accepted and ignored),
and an unknown flag is refused as argparse does.
"""

from __future__ import annotations

import argparse
import json
import os
import ssl

from jaxllm.entrypoints.reasoning_parsers import REASONING_PARSERS
from jaxllm.entrypoints.tool_parsers import TOOL_PARSERS
from jaxllm.loader.quantized import QUANTIZATION_METHODS

MAX_BODY_BYTES = 16 * 2**20
DEFAULT_SERVED_NAME = "SmolLM2-135M-Instruct"
API_KEY_ENV = "JAXLLM_API_KEY"  # vLLM's VLLM_API_KEY

# vLLM flags refused here, with why. Flags that take a value take it (nargs="?") so the refusal names
# the flag rather than a stray value.
REFUSED_FLAGS = {
    ("--pipeline-parallel-size", "-pp"): "jaxllm serves on one device (no pipeline parallelism)",
    ("--distributed-executor-backend",): "jaxllm runs in one process",
    ("--headless",): "jaxllm runs in one process",
    ("--api-server-count", "-asc"): "jaxllm runs one API server process",
    ("--load-format",): "jaxllm reads safetensors folders and GGUF files, whatever this says",
    ("--enforce-eager",): "jaxllm always runs precompiled jitted steps (there is no eager mode)",
    ("--cpu-offload-gb",): "jaxllm does not offload weights",
    ("--swap-space",): "jaxllm does not swap the KV cache to host memory",
    ("--enable-lora", "--lora-modules", "--max-loras", "--max-lora-rank"): "jaxllm has no LoRA adapters",
    ("--speculative-config",): "jaxllm has no speculative decoding",
    ("--tool-parser-plugin",): "jaxllm's tool call parsers are built in (--tool-call-parser)",
    ("--limit-mm-per-prompt", "--mm-processor-kwargs"): "jaxllm serves text-only models",
    ("--middleware",): "jaxllm loads no ASGI middleware by import path",
    ("--uds",): "jaxllm listens on --host/--port only",
    ("--config",): "jaxllm reads no YAML config file: pass the flags",
    ("--enable-log-requests",): "jaxllm does not log request contents",
    ("--hf-overrides",): "jaxllm does not override the model's config",
    ("--rope-scaling", "--rope-theta"): "jaxllm takes RoPE settings from the model's config only",
    ("--tokenizer-revision",): "the tokenizer comes from --tokenizer or the model at --revision",
    ("--enable-ssl-refresh",): "uvicorn loads the SSL files once, at start",
}


class _Refused(argparse.Action):
    def __init__(self, option_strings, dest, reason: str = "", **kwargs):
        super().__init__(option_strings, dest, nargs="?", default=argparse.SUPPRESS, **kwargs)
        self.reason = reason

    def __call__(self, parser, namespace, values, option_string=None):
        parser.error(f"{option_string} is not supported: {self.reason}")


def _json_list(text: str) -> list[str]:
    """vLLM's form for --allowed-origins/-methods/-headers: a JSON list of strings."""
    try:
        value = json.loads(text)
    except json.JSONDecodeError:
        raise argparse.ArgumentTypeError(f"{text!r} is not JSON: pass a JSON list such as '[\"*\"]'") from None
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise argparse.ArgumentTypeError(f"{text!r} is not a JSON list of strings")
    return value


def _json_dict(text: str) -> dict:
    try:
        value = json.loads(text)
    except json.JSONDecodeError:
        raise argparse.ArgumentTypeError(f"{text!r} is not JSON: pass a JSON object") from None
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError(f"{text!r} is not a JSON object")
    return value


class _ArgumentParser(argparse.ArgumentParser):
    def error(self, message):
        if message.startswith("unrecognized arguments"):
            message += f" (not a flag of {self.prog}: --help lists the vLLM flags it has and the ones it refuses)"
        super().error(message)


class _HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """Shows a flag's default unless it is None or the help already names it; the epilog as written."""

    def _get_help_string(self, action):
        text = action.help or ""
        if action.default not in (None, argparse.SUPPRESS) and "default" not in text and action.option_strings:
            text += " (default: %(default)s)"
        return text


def make_arg_parser(prog: str = "jaxllm serve") -> argparse.ArgumentParser:
    """The server's argument parser: `vllm serve`'s flags that mean something here, and refusals."""
    refused = "\n".join(f"  {', '.join(flags)}: {reason}" for flags, reason in REFUSED_FLAGS.items())
    p = _ArgumentParser(
        prog=prog, description="jaxllm's OpenAI-compatible server (flags named as in `vllm serve`).",
        formatter_class=_HelpFormatter, epilog=f"vLLM flags refused here, and why:\n{refused}")
    p.add_argument("model_tag", nargs="?", default=None,
                   help="the model to serve, as --model (a positional MODEL wins over --model, as in vLLM)")
    model = p.add_argument_group("model")
    model.add_argument("--model", default=None,
                       help="a Hugging Face model folder, a .gguf file, or an ORG/NAME id found in the local "
                            "Hugging Face cache; default: SmolLM2-135M-Instruct (GGUF)")
    model.add_argument("--download-dir", default=None,
                       help="the Hugging Face cache folder ORG/NAME ids are read from; default: huggingface_hub's "
                            "($HF_HUB_CACHE, or $HF_HOME/hub); nothing is downloaded")
    model.add_argument("--revision", default=None,
                       help="with an ORG/NAME id: the branch, tag or commit of the cached snapshot (default: main)")
    model.add_argument("--model-shape", default=None,
                       help="serve random weights at a real model's shape (smollm2-135m, qwen3-0.6b, llama3-8b, ...) "
                            "with the default model's tokenizer (or --tokenizer), for benchmarks; replaces --model "
                            "(not a vLLM flag)")
    model.add_argument("--tokenizer", default=None, help="a tokenizer folder, file or cached id; default: the model's")
    model.add_argument("--tokenizer-mode", default="auto", choices=["auto", "hf"],
                       help="auto and hf both load the Hugging Face fast tokenizer (vLLM's slow, mistral and "
                            "custom modes are not available)")
    model.add_argument("--trust-remote-code", action="store_true",
                       help="accepted for vLLM compatibility: jaxllm never runs code from a model repository, so "
                            "a model whose architecture needs it is refused by name")
    model.add_argument("--dtype", default="auto", choices=["auto", "float32", "float", "bfloat16", "float16", "half"],
                       help="weight and compute dtype; auto: the checkpoint's")
    model.add_argument("--quantization", "-q", default=None, choices=QUANTIZATION_METHODS,
                       help="fp8 (W8A8) or int8 (weight-only): quantize a float checkpoint at load; awq, gptq, "
                            "compressed-tensors or fp8: a checkpoint quantized with it (awq also quantizes "
                            "--model-shape's random weights to int4); default: the checkpoint's own")
    model.add_argument("--kv-cache-dtype", default="auto", choices=["auto", "fp8", "fp8_e4m3"],
                       help="KV cache storage; fp8: float8_e4m3fn with the checkpoint's k/v scales (1.0 without)")
    model.add_argument("--max-model-len", type=int, default=None,
                       help="longest prompt + completion in tokens; default: the model's context length")
    model.add_argument("--generation-config", default="auto",
                       help="where the default sampling parameters come from: auto (the model's "
                            "generation_config.json), vllm (vLLM's defaults), or a folder holding a "
                            "generation_config.json; a request's own values always win")
    model.add_argument("--override-generation-config", type=_json_dict, default=None,
                       help='JSON object of default sampling parameters over --generation-config\'s, e.g. '
                            '\'{"temperature": 0.5}\'')
    model.add_argument("--max-logprobs", type=int, default=20,
                       help="most logprobs (and prompt_logprobs) a request may ask for")
    model.add_argument("--seed", type=int, default=0, help="seeds the per-request seeds of requests that bring none")

    model.add_argument("--task", default="auto", help="vLLM's older name for what the model does: generate, embed, "
                       "classify, score (embed/classify/score serve a pooling model)")
    model.add_argument("--runner", default="auto", choices=["auto", "generate", "pooling"],
                       help="generate text, or pool (embeddings, scores, classification); auto: by the architecture")
    model.add_argument("--convert", default="auto", choices=["auto", "none", "embed", "classify"],
                       help="run a causal LM as an embedding model (embed: last token, normalised)")
    model.add_argument("--override-pooler-config", "--pooler-config", dest="pooler_config", default=None,
                       help='JSON of PoolerConfig fields, e.g. \'{"pooling_type": "MEAN", "normalize": true}\'')

    engine = p.add_argument_group("engine")
    engine.add_argument("--block-size", type=int, default=16, help="tokens per KV-cache block")
    engine.add_argument("--tensor-parallel-size", "-tp", type=int, default=1,
                        help="devices the weights and KV cache are sharded over (of JAX's devices; "
                             "CUDA_VISIBLE_DEVICES picks them)")
    engine.add_argument("--data-parallel-size", "-dp", type=int, default=1,
                        help="engine replicas, each on its own tensor-parallel-size devices; requests go to the "
                             "least loaded")
    engine.add_argument("--gpu-memory-utilization", type=float, default=0.9,
                        help="share of accelerator memory the engine may use (weights, activations, KV cache)")
    engine.add_argument("--num-gpu-blocks-override", type=int, default=None,
                        help="a fixed number of KV-cache blocks instead of sizing from memory")
    engine.add_argument("--max-num-seqs", type=int, default=None,
                        help="most sequences in one step; default: vLLM's (1024 on GPUs of 70 GiB or more, "
                             "else 256; 32 on a CPU)")
    engine.add_argument("--max-num-batched-tokens", type=int, default=None,
                        help="most tokens in one step; default: vLLM's server value (8192 on GPUs of 70 GiB or "
                             "more, else 2048; 512 on a CPU)")
    engine.add_argument("--enable-prefix-caching", action=argparse.BooleanOptionalAction, default=True,
                        help="reuse the KV blocks of prompts that share a prefix")
    engine.add_argument("--enable-chunked-prefill", action=argparse.BooleanOptionalAction, default=True,
                        help="cut long prompts into chunks that share steps with decodes")

    server = p.add_argument_group("server")
    server.add_argument("--host", default="127.0.0.1", help="address to listen on")
    server.add_argument("--port", type=int, default=8000, help="port to listen on")
    server.add_argument("--served-model-name", nargs="+", default=None,
                        help="names clients use as `model` (the first is listed by /v1/models); default: the "
                             f"model as given, or {DEFAULT_SERVED_NAME} for the default model")
    server.add_argument("--api-key", nargs="+", default=None,
                        help="require `Authorization: Bearer KEY` with one of these keys on every route but "
                             "/health, /ping, /version and /metrics; an empty key means none; default: "
                             f"${API_KEY_ENV} if set")
    server.add_argument("--chat-template", default=None,
                        help="a Jinja chat template replacing the tokenizer's: a file, or the template itself")
    server.add_argument("--enable-auto-tool-choice", action="store_true",
                        help="let the model choose to call tools (tool_choice 'auto'); needs --tool-call-parser")
    server.add_argument("--tool-call-parser", default=None, choices=sorted(TOOL_PARSERS),
                        help="the model's tool call format, parsed for tool_choice 'auto'")
    server.add_argument("--reasoning-parser", default=None, choices=sorted(REASONING_PARSERS),
                        help="split the model's <think> reasoning into reasoning_content")
    server.add_argument("--allowed-origins", type=_json_list, default=["*"], help="CORS: allowed origins (JSON list)")
    server.add_argument("--allowed-methods", type=_json_list, default=["*"], help="CORS: allowed methods (JSON list)")
    server.add_argument("--allowed-headers", type=_json_list, default=["*"], help="CORS: allowed headers (JSON list)")
    server.add_argument("--allow-credentials", action="store_true", help="CORS: allow credentials")
    server.add_argument("--root-path", default=None,
                        help="the path prefix under which a proxy serves this server (ASGI root_path)")
    server.add_argument("--ssl-keyfile", default=None, help="the SSL key file (serve HTTPS)")
    server.add_argument("--ssl-certfile", default=None, help="the SSL certificate file (serve HTTPS)")
    server.add_argument("--ssl-ca-certs", default=None, help="the CA certificates file")
    server.add_argument("--ssl-cert-reqs", type=int, default=int(ssl.CERT_NONE),
                        help="whether a client certificate is required (see the stdlib ssl module)")
    server.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error", "critical"],
                        help="log level of jaxllm (and of uvicorn unless --uvicorn-log-level is given)")
    server.add_argument("--uvicorn-log-level", default=None,
                        choices=["critical", "error", "warning", "info", "debug", "trace"],
                        help="log level of uvicorn; default: --log-level")
    server.add_argument("--disable-uvicorn-access-log", action="store_true", help="no uvicorn access log")
    server.add_argument("--disable-log-requests", action="store_true",
                        help="accepted for vLLM compatibility: jaxllm does not log request contents anyway")
    server.add_argument("--shutdown-timeout", type=float, default=10.0,
                        help="on SIGTERM/SIGINT, seconds the requests in flight may still run; then each is ended "
                             "cleanly (streams get an error event and [DONE], others a 503)")
    server.add_argument("--max-request-body-bytes", type=int, default=MAX_BODY_BYTES,
                        help="larger request bodies are refused with 413 (not a vLLM flag)")

    for flags, reason in REFUSED_FLAGS.items():  # listed in the epilog, kept out of the usage line
        p.add_argument(*flags, action=_Refused, reason=reason, help=argparse.SUPPRESS)
    return p


def parse_args(argv: list[str] | None = None, prog: str = "jaxllm serve") -> argparse.Namespace:
    """Parse and settle the server's arguments: a positional model wins over --model (as in vLLM), the
    API keys come from $JAXLLM_API_KEY when --api-key is not given, empty keys are dropped, and the chat
    template is read (`chat_template_text`)."""
    parser = make_arg_parser(prog)
    args = parser.parse_args(argv)
    return settle_args(args, parser)


def settle_args(args: argparse.Namespace, parser: argparse.ArgumentParser | None = None) -> argparse.Namespace:
    parser = parser or make_arg_parser()
    if args.model_tag is not None:
        args.model = args.model_tag
    if args.model and args.model_shape:
        parser.error("pass a model or --model-shape, not both")
    if args.enable_auto_tool_choice and not args.tool_call_parser:
        parser.error("--enable-auto-tool-choice needs --tool-call-parser")
    keys = args.api_key if args.api_key is not None else [os.environ.get(API_KEY_ENV, "")]
    args.api_key = [key for key in keys if key] or None  # as vLLM: an empty key means no authentication
    from jaxllm.entrypoints.chat_utils import load_chat_template

    try:  # before the model loads: a bad template is named at once
        args.chat_template_text = load_chat_template(args.chat_template)
    except (OSError, ValueError) as e:
        parser.error(f"--chat-template: {e}")
    if os.environ.get("JAX_COORDINATOR_ADDRESS"):
        parser.error("JAX_COORDINATOR_ADDRESS is set, and the server runs on one host only: multi-host runs "
                     "are offline (jaxllm.distributed)")
    if args.max_logprobs < 0:  # vLLM's -1 (no limit) is offline-only here: a request's logprobs need a bound
        parser.error(f"--max-logprobs={args.max_logprobs}: must be >= 0")
    return args
