"""supervisord's engine programs: one per engine replica, in a file supervisord.conf includes.

A program each (not one program of N processes), so that an update of the models
adds and removes engines through supervisord's own reloadConfig, addProcessGroup and
removeProcessGroup (what `supervisorctl update` does) while every other engine runs on.
"""

from __future__ import annotations

from pathlib import Path

from engine.files import write_atomic
from engine.workers import EngineWorker

ENGINE_PROGRAMS_FILE = "engines.conf"
_TEMPLATE = Path(__file__).with_name("supervisord-engine.conf")
PREFIX = "engine-"


def program_name(replica: int) -> str:
    """The engine's supervisord group; its one process has the same name."""
    return f"{PREFIX}{replica}"


def replica_of(group: str) -> int | None:
    """The replica an engine program runs, None for other programs."""
    suffix = group.removeprefix(PREFIX)
    return int(suffix) if group.startswith(PREFIX) and suffix.isdigit() else None


def write_engine_programs(workers: list[EngineWorker], run_dir: Path) -> None:
    template = _TEMPLATE.read_text()
    text = "".join(template.replace("{replica}", str(w.replica)) for w in workers)
    write_atomic(run_dir / ENGINE_PROGRAMS_FILE, text)
