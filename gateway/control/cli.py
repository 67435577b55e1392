"""The `vgate` command line: serve, demo-model, download."""

from __future__ import annotations

import argparse
import sys
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path


def _version() -> str:
    try:
        return version("vgate")
    except PackageNotFoundError:  # run from a checkout that was never installed
        return "unknown"


def build_parser() -> argparse.ArgumentParser:
    from engine.gcs import DEFAULT_WORKERS, MODEL_CONFIG

    parser = argparse.ArgumentParser(
        prog="vgate",
        description="Serve open LLMs on Vertex AI and GKE: vLLM engines behind nginx, "
        "with Vertex's predict protocol.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
        allow_abbrev=False,
    )
    parser.add_argument("--version", action="version", version=f"vgate {_version()}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")
    commands.add_parser(
        "serve",
        help="serve a model (vgate serve --help: its flags; other flags go to vLLM)",
        add_help=False,
    )
    demo = commands.add_parser(
        "demo-model",
        help="write the built-in demo model (random weights, made here) to DIR",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    demo.add_argument("dir", type=Path, metavar="DIR")
    demo.add_argument(
        "--vision",
        action="store_true",
        help="a vision-language model (a tiny BLIP-2) that takes images, instead of the text one",
    )
    download = commands.add_parser(
        "download",
        help="mirror a Cloud Storage prefix into DIR, verified (what serve does; "
        "for images and init containers)",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    download.add_argument("uri", metavar="gs://BUCKET/PREFIX")
    download.add_argument("dest", type=Path, metavar="DIR")
    download.add_argument("--workers", type=int, default=DEFAULT_WORKERS, help="parallel fetches")
    download.add_argument(
        "--required", default=MODEL_CONFIG, help="a file the prefix must hold ('' for none)"
    )
    return parser


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if args[:1] == ["serve"]:  # its own parser: unknown flags are vLLM's, not errors
        from gateway.control import serve

        return serve.main(args[1:])
    parser = build_parser()
    ns = parser.parse_args(args)
    if ns.command == "demo-model":
        from engine.demo_model import write_demo_model
        from engine.demo_vision import write_demo_vision_model

        print((write_demo_vision_model if ns.vision else write_demo_model)(ns.dir))
        return 0
    if ns.command == "download":
        return download(ns)
    parser.print_help(sys.stderr)
    return 2


def download(args: argparse.Namespace) -> int:
    from engine.gcs import DownloadError
    from engine.gcs import download as mirror

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
