"""The `vgate` command line."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

USAGE = """usage: vgate COMMAND ...

commands:
  serve [flags] [-- vLLM flags]   serve a model (vgate serve --help)
  demo-model DIR                  write the built-in demo model to DIR
  download gs://B/P DIR [--workers N] [--required FILE]
                                  mirror a Cloud Storage prefix into DIR, verified
                                  (the same download `serve` does: for images and init containers)
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
    if command == "download":
        return download(rest)
    print(USAGE, end="", file=sys.stderr)
    return 2


def download(argv: list[str]) -> int:
    from engine.gcs import DEFAULT_WORKERS, MODEL_CONFIG, DownloadError
    from engine.gcs import download as mirror

    parser = argparse.ArgumentParser(prog="vgate download", allow_abbrev=False)
    parser.add_argument("uri", help="gs://bucket/prefix")
    parser.add_argument("dest", type=Path, help="local directory")
    parser.add_argument("--workers", type=int, default=DEFAULT_WORKERS)
    parser.add_argument(
        "--required", default=MODEL_CONFIG, help="a file the prefix must hold ('' for none)"
    )
    args = parser.parse_args(argv)
    try:
        done = mirror(
            args.uri,
            args.dest,
            workers=args.workers,
            required=args.required or None,
            on_progress=lambda p: print(f"{args.uri}: {p.line()}", file=sys.stderr, flush=True),
        )
    except DownloadError as e:
        print(f"vgate: {e}", file=sys.stderr)
        return 1
    print(f"{args.dest} ({done.files_total} files, {done.files_reused} already here)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
