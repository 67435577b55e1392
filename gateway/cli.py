"""The `vgate` command line."""

from __future__ import annotations

import sys
from pathlib import Path

USAGE = """usage: vgate COMMAND ...

commands:
  serve [flags] [-- vLLM flags]   serve a model (vgate serve --help)
  demo-model DIR                  write the built-in demo model to DIR
"""


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if not args or args[0] in ("-h", "--help"):
        print(USAGE, end="")
        return 0 if args else 2
    command, rest = args[0], args[1:]
    if command == "serve":
        from gateway import serve

        return serve.main(rest)
    if command == "demo-model" and len(rest) == 1:
        from engine.demo_model import write_demo_model

        print(write_demo_model(Path(rest[0])))
        return 0
    print(USAGE, end="", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
