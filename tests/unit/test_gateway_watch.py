"""The gateway workers' watch: which workers a (re)started monitor may kill."""

from __future__ import annotations

from gateway.control.gateway_watch import first_watches
from gateway.control.liveness import HUNG_AFTER_S


def _silent_until(watches: dict, until: float) -> dict[int, str | None]:
    """Probe every worker once a second, none answering; each one's restart reason."""
    now = 100.0
    while now <= until:
        for watch in watches.values():
            watch.probe(now, "RUNNING", False)
        now += 1.0
    return {k: w.restart_reason(now - 1.0) for k, w in watches.items()}


def test_a_restarted_monitor_kills_a_worker_that_was_hung_before_it_started() -> None:
    reasons = _silent_until(first_watches(2, restarted=True, now=100.0), 100.0 + HUNG_AFTER_S)
    assert all(r and "no answer" in r for r in reasons.values()), reasons


def test_a_restarted_monitor_waits_out_the_hang_bound_first() -> None:
    reasons = _silent_until(first_watches(2, restarted=True, now=100.0), 100.0 + HUNG_AFTER_S - 2)
    assert reasons == {0: None, 1: None}


def test_at_the_start_a_worker_must_answer_once_before_it_can_be_killed() -> None:
    reasons = _silent_until(first_watches(2, restarted=False, now=100.0), 100.0 + 5 * HUNG_AFTER_S)
    assert reasons == {0: None, 1: None}
