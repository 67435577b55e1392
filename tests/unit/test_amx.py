"""The AMX plugin is one vLLM loads in every engine process, and asking is harmless."""

from __future__ import annotations

import subprocess
import sys
from importlib.metadata import entry_points


def test_vllm_loads_it_as_a_general_plugin() -> None:
    plugins = {e.name: e.value for e in entry_points(group="vllm.general_plugins")}
    assert plugins.get("vgate_amx") == "engine.amx:register", plugins


def test_asking_for_amx_works_with_or_without_it() -> None:
    done = subprocess.run(
        [sys.executable, "-c", "import engine.amx as a; a.register(); print('ok')"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0 and done.stdout.strip() == "ok", done.stderr
