"""Command line: generate, chat, info, serve, convert, eval, trace. Errors become one line and exit 1."""

from __future__ import annotations

import argparse
import importlib
import sys

from .commands.format import add_store_args
from .errors import MoeflowError

# subcommands whose module declares its own arguments: command name -> module in commands/
_EXTRA = {"convert": "convert", "eval": "evaluate", "trace": "trace", "simulate": "simulate"}
_BUILTIN = {"generate": "generate", "chat": "chat", "serve": "serve", "info": "info"}


def _add_model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", help="checkpoint folder (default: the built-in demo model)")
    p.add_argument("--dtype", default="float32", help="compute dtype: float32, bfloat16, float16")
    p.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N")
    p.add_argument("--threads", type=int, default=None, help="CPU threads (default: torch's choice)")
    add_store_args(p)


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="moeflow", description="Run Mixture-of-Experts language models.")
    sub = ap.add_subparsers(dest="command", required=True)
    g = sub.add_parser("generate", help="generate text from a prompt, streaming to stdout")
    _add_model_args(g)
    src = g.add_mutually_exclusive_group()
    src.add_argument("--prompt", default="The capital of France is", help="raw text prompt")
    src.add_argument("--chat", metavar="MESSAGE", help="a user message, sent through the chat template")
    g.add_argument("--max-tokens", type=int, default=64)
    g.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    g.add_argument("--top-p", type=float, default=1.0)
    g.add_argument("--top-k", type=int, default=0)
    g.add_argument("--seed", type=int, default=None)
    g.add_argument("--stop", action="append", default=[], help="stop string (repeatable)")
    g.add_argument("--ignore-eos", action="store_true")
    g.add_argument(
        "--experts-top-k", type=int, default=None, help="run K experts per token instead of the model's"
    )
    g.add_argument("--max-model-len", type=int, default=None)
    g.add_argument("--json", action="store_true", help="print the result as JSON instead of streaming")
    c = sub.add_parser("chat", help="interactive chat on the terminal, one line per turn")
    _add_model_args(c)
    c.add_argument("--system", default=None, help="system message")
    c.add_argument("--max-tokens", type=int, default=256)
    c.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    c.add_argument("--top-p", type=float, default=1.0)
    c.add_argument("--seed", type=int, default=None)
    c.add_argument("--experts-top-k", type=int, default=None)
    c.add_argument("--max-model-len", type=int, default=None)
    i = sub.add_parser("info", help="architecture, parameter counts and bytes touched per token")
    _add_model_args(i)
    s = sub.add_parser("serve", help="OpenAI-compatible HTTP server with continuous batching")
    _add_model_args(s)
    s.add_argument("--host", default="127.0.0.1")
    s.add_argument("--port", type=int, default=8000)
    s.add_argument("--max-batch", type=int, default=16, help="sequences in the running batch (KV slots)")
    s.add_argument(
        "--max-waiting", type=int, default=64, help="queued requests beyond which the server answers 503"
    )
    s.add_argument("--max-model-len", type=int, default=None)
    s.add_argument(
        "--served-model-name", default=None, help="the model id clients send (default: folder name)"
    )
    s.add_argument("--log-level", default="warning")
    for mod in _EXTRA.values():
        importlib.import_module(f".commands.{mod}", __package__).add_parser(sub)
    return ap


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        name = {**_BUILTIN, **_EXTRA}[args.command]
        return importlib.import_module(f".commands.{name}", __package__).run(args)
    except MoeflowError as e:
        print(f"moeflow: error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("moeflow: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        return 0


if __name__ == "__main__":
    sys.exit(main())
