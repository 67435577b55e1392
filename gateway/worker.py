"""Entry point of supervisord's gateway program: gateway worker K on its unix socket."""

from __future__ import annotations

import asyncio
import os
import signal
import sys
from pathlib import Path

import uvloop
from aiohttp import web

from engine.logs import configure
from gateway.app import make_app
from gateway.config import Config, gateway_socket


async def serve(worker: int, run_dir: Path) -> None:
    config = Config.load(run_dir / "config.json")
    runner = web.AppRunner(
        make_app(config, run_dir, worker),
        handler_cancellation=True,  # a client that goes away cancels its engine calls
        # nginx has drained in-flight requests before supervisord stops the
        # gateways (supervisord.conf), so little is left; stay under its 10 s.
        shutdown_timeout=8,
        access_log=None,  # nginx logs every request
    )
    await runner.setup()
    path = gateway_socket(run_dir, worker)
    path.unlink(missing_ok=True)
    await web.UnixSite(runner, str(path)).start()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    await runner.cleanup()


def main(argv: list[str]) -> None:
    configure(f"gateway-{argv[1]}")
    uvloop.run(serve(int(argv[1]), Path(os.environ["VGATE_RUN_DIR"])))


if __name__ == "__main__":
    main(sys.argv)
