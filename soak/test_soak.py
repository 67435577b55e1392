"""`make soak`: the stack under sustained mixed load for SOAK_S (30 minutes by default).

Nothing fails, nothing restarts, and the memory of every process stays flat: the
resident set of each is sampled every SAMPLE_S, and the median of the run's last
quarter may exceed that of its second quarter (after the warm-up) by at most
GROWTH_SHARE plus GROWTH_BYTES. Figures are printed for each process.
"""

from __future__ import annotations

import os
import statistics
import time
from collections.abc import Iterator

import psutil
import pytest

from tests.e2e.conftest import Stack, one_replica_stack
from tests.e2e.load import Load, loaded_stack_args
from tests.helpers import descendants

SOAK_S = float(os.environ.get("VGATE_SOAK_S", "1800"))
SAMPLE_S = 10.0
GROWTH_SHARE = 0.05
GROWTH_BYTES = 32 * 1024**2
MiB = 1024**2


@pytest.fixture(scope="module")
def soaked(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    work = tmp_path_factory.mktemp("soak")
    with one_replica_stack(work, loaded_stack_args(), replicas=2) as stack:
        yield stack


def _name(p: psutil.Process) -> str:
    return " ".join(p.cmdline())[:90] or p.name()


def test_a_long_run_keeps_every_process_flat(soaked: Stack) -> None:
    family = {p.pid: p for p in descendants(soaked.proc.pid)}
    names = {pid: _name(p) for pid, p in family.items()}
    rss: dict[int, list[int]] = {pid: [] for pid in family}
    load = Load(soaked.base)
    load.run()
    start = time.monotonic()
    try:
        while time.monotonic() - start < SOAK_S:
            for pid, p in family.items():
                try:
                    rss[pid].append(p.memory_info().rss)
                except psutil.NoSuchProcess:
                    pytest.fail(f"{names[pid]} ended during the soak")
            time.sleep(SAMPLE_S)  # the sampling period, not a wait
    finally:
        load.stop()
    failed = [o.what for o in load.outcomes if not o.ok]
    print(f"\nsoak of {SOAK_S:.0f} s: {len(load.outcomes)} requests, {len(failed)} failed")
    grew = []
    for pid, samples in rss.items():
        quarter = len(samples) // 4
        early = statistics.median(samples[quarter : 2 * quarter])
        late = statistics.median(samples[3 * quarter :])
        print(f"  {names[pid]}: {early / MiB:.0f} -> {late / MiB:.0f} MiB")
        if late > early * (1 + GROWTH_SHARE) + GROWTH_BYTES:
            grew.append(f"{names[pid]}: {early / MiB:.0f} -> {late / MiB:.0f} MiB")
    assert not failed, failed[:5]
    assert not grew, grew
    assert {p.pid for p in descendants(soaked.proc.pid)} >= set(family)  # none replaced
