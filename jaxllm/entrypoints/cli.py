"""The `jaxllm` command (installed by pip as a console script), as vLLM's `vllm` command:

    jaxllm serve MODEL [flags]      # the OpenAI-compatible server; `jaxllm serve --help` lists the flags
    jaxllm --version
"""

from __future__ import annotations

import argparse
import sys


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["serve"]:
        from jaxllm.entrypoints.launcher import main as serve

        return serve(argv[1:], prog="jaxllm serve")
    parser = argparse.ArgumentParser(prog="jaxllm", description="jaxllm: LLM inference and serving in pure JAX.")
    parser.add_argument("--version", action="store_true", help="print the version and exit")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.add_parser("serve", help="start the OpenAI-compatible server: jaxllm serve MODEL [flags] "
                                 "(jaxllm serve --help lists them)", add_help=False)
    args = parser.parse_args(argv)
    if args.version:
        import jaxllm

        print(jaxllm.__version__)
        return
    parser.print_help()
    parser.exit(2)


if __name__ == "__main__":
    main()
