"""Entry point of supervisord's engine program: become engine replica N.

supervisord starts `python -m engine.launch N` (N is its process_num); this
looks up replica N in the plan `vgate serve` wrote and execs vLLM in place, so
supervisord's signals reach the vLLM server itself.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

from engine.workers import load_workers


def main(argv: list[str]) -> None:
    replica = int(argv[1])
    plan = Path(os.environ["VGATE_RUN_DIR"]) / "engines.json"
    worker = load_workers(plan)[replica]
    env = {**os.environ, **worker.env}
    # vLLM must serve its own metrics on its own /metrics, not into a shared dir.
    env.pop("PROMETHEUS_MULTIPROC_DIR", None)
    os.execvpe(worker.argv[0], worker.argv, env)


if __name__ == "__main__":
    main(sys.argv)
