"""Finding nginx's workers for the drain, from /proc as the kernel writes it."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from gateway.control.drain import alive, children
from tests.helpers import wait_for


def _proc(root: Path, pid: int, comm: str, ppid: int) -> None:
    (root / str(pid)).mkdir()
    (root / str(pid) / "stat").write_text(f"{pid} ({comm}) S {ppid} {pid} {pid} 0 -1\n")


def test_children_are_read_past_any_name(tmp_path: Path) -> None:
    _proc(tmp_path, 10, "nginx", 1)
    _proc(tmp_path, 11, "nginx: worker) S 10 (odd", 10)  # a name with ") S 10" in it
    _proc(tmp_path, 12, "nginx", 10)
    _proc(tmp_path, 13, "python", 12)
    (tmp_path / "self").mkdir()
    (tmp_path / "14").mkdir()  # ended while listed: no stat
    assert children(10, tmp_path) == {11, 12}


def test_children_of_this_process_on_the_real_proc() -> None:
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
    try:
        assert child.pid in children(os.getpid())
        assert alive(child.pid)
        child.kill()
        # Ended but not yet reaped (a zombie) is no longer alive.
        wait_for(lambda: not alive(child.pid), 10, "the killed child to end")
        assert Path(f"/proc/{child.pid}").exists()  # a zombie until waited for
    finally:
        child.kill()
        child.wait(10)
