"""The process of one /update_models call (gateway/admin.py starts it): see model_update.

Its first steps are kept light, before vLLM's parser (and torch) are imported: one
update at a time (a lock), and the process pinned to one core. Torch's MKL counts
cores at import by moving its thread onto each in turn; on a machine whose cores
engines keep busy such a move was seen to hang for minutes (2 cores, CPU engines
under load), and one core allowed (the one it runs on) means no move.
"""

from __future__ import annotations

import fcntl
import os
import sys
from pathlib import Path

from engine.logs import configure
from engine.placement import pin

LOCK_FILE = "update.lock"
BUSY = 3  # exit code: another update runs


def current_cpu() -> int:
    """The core this process runs on now (/proc/self/stat's `processor`)."""
    stat = Path("/proc/self/stat").read_text()
    return int(stat.rsplit(")", 1)[1].split()[36])


def main(argv: list[str]) -> int:
    configure("update")
    run_dir = Path(os.environ["VGATE_RUN_DIR"])
    pin(str(current_cpu()))
    lock = (run_dir / LOCK_FILE).open("w")
    try:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        print(
            '{"status": "error", "message": "another update of the models is under way: '
            'try again when it is done"}',
            flush=True,
        )
        return BUSY
    from gateway.control import model_update  # after the pin: it imports vLLM, and torch

    return model_update.run(argv[1], run_dir)


if __name__ == "__main__":
    sys.exit(main(sys.argv))
