"""Entry point of supervisord's engine program: run engine replica N, and leave nothing behind.

supervisord starts `python -m engine.launch N` (N is its process_num) in a
process group of its own. This looks up replica N in the plan `vgate serve`
wrote and runs vLLM in that group. vLLM spawns an engine core and workers that
outlive a server killed with SIGKILL (an OOM kill, say) and would hold the
memory its restart needs; so when the server exits, for whatever reason,
everything left in the group is killed before supervisord restarts it.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from engine.fetch_model import MODEL_READY
from engine.workers import load_workers

# Vertex gives a deployment 2 h, downloads included.
MODEL_WAIT_S = 7200


def wait_for_model(run_dir: Path, deadline_s: float = MODEL_WAIT_S) -> None:
    """Until the download program has the model in place (at once when nothing to fetch)."""
    end = time.monotonic() + deadline_s
    while not (run_dir / MODEL_READY).exists():
        if time.monotonic() > end:
            raise SystemExit(f"vgate: the model was not in place within {deadline_s:g} s")
        time.sleep(1)


def main(argv: list[str]) -> None:
    replica = int(argv[1])
    run_dir = Path(os.environ["VGATE_RUN_DIR"])
    worker = load_workers(run_dir / "engines.json")[replica]
    env = {**os.environ, **worker.env}
    # vLLM must serve its own metrics on its own /metrics, not into a shared dir.
    env.pop("PROMETHEUS_MULTIPROC_DIR", None)
    wait_for_model(run_dir)
    # supervisord signals the whole group, vLLM included: this process only waits.
    # (A Python handler, unlike SIG_IGN, is not inherited by vLLM.)
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: None)
    server = subprocess.Popen(worker.argv, env=env)
    code = server.wait()
    print(f"vgate: engine replica {replica} exited ({code}); stopping what it left", flush=True)
    os.killpg(os.getpgrp(), signal.SIGKILL)  # this process too: supervisord restarts it


if __name__ == "__main__":
    main(sys.argv)
