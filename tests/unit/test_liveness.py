"""A replica's verdict from its probes and progress: rise and fall, hung, stalled."""

import pytest

from gateway.control.liveness import (
    FALL,
    HUNG_AFTER_S,
    RISE,
    STALLED_AFTER_S,
    Progress,
    ReplicaWatch,
    read_progress,
)
from gateway.state import DOWN, READY, STARTING


def _ready(watch: ReplicaWatch, now: float = 0.0) -> None:
    for i in range(RISE):
        watch.probe(now + i, "RUNNING", True)


@pytest.mark.parametrize(
    ("process", "state"),
    [("STARTING", STARTING), ("BACKOFF", DOWN), ("EXITED", DOWN), ("STOPPED", DOWN), (None, DOWN)],
)
def test_a_process_that_does_not_run_is_out_at_once(process: str | None, state: str) -> None:
    watch = ReplicaWatch()
    _ready(watch)
    assert watch.probe(5, process, True) == state and not watch.routed


def test_rise_and_fall() -> None:
    watch = ReplicaWatch()
    assert watch.probe(0, "RUNNING", True) == STARTING  # one good probe is not enough
    assert watch.probe(1, "RUNNING", True) == READY
    for i in range(FALL - 1):  # slow probes on a busy engine: still in
        assert watch.probe(2 + i, "RUNNING", False) == READY
    assert watch.probe(10, "RUNNING", True) == READY  # a good one resets the count
    states = [watch.probe(11 + i, "RUNNING", False) for i in range(FALL)]
    assert states[-1] == STARTING and not watch.routed
    assert watch.probe(20, "RUNNING", True) == STARTING  # back only after RISE good ones
    assert watch.probe(21, "RUNNING", True) == READY


def test_a_ready_replica_that_stops_answering_is_restarted() -> None:
    watch = ReplicaWatch()
    _ready(watch)
    last = RISE - 1
    for t in range(RISE, int(last + HUNG_AFTER_S)):
        watch.probe(t, "RUNNING", False)
        assert watch.restart_reason(t) is None
    watch.probe(last + HUNG_AFTER_S, "RUNNING", False)
    assert watch.restart_reason(last + HUNG_AFTER_S) == "no answer to its health probe for 20 s"


def test_a_loading_engine_is_never_hung() -> None:
    watch = ReplicaWatch()
    for t in range(600):  # vLLM answers nothing until the model is loaded
        watch.probe(t, "RUNNING", False)
    assert watch.restart_reason(600) is None


def test_pending_work_without_an_engine_step_is_a_stall() -> None:
    watch = ReplicaWatch()
    _ready(watch)
    watch.progress(0, Progress(pending=4, steps=100))
    watch.progress(STALLED_AFTER_S - 1, Progress(pending=4, steps=100))
    assert watch.restart_reason(STALLED_AFTER_S - 1) is None
    watch.progress(STALLED_AFTER_S, Progress(pending=4, steps=100))
    assert watch.restart_reason(STALLED_AFTER_S).startswith("requests are pending")


def test_a_gap_between_samples_is_not_a_stall() -> None:
    watch = ReplicaWatch()
    _ready(watch)
    watch.progress(0, Progress(pending=4, steps=100))
    assert watch.restart_reason(STALLED_AFTER_S + 60) is None  # the monitor was held up
    watch.progress(STALLED_AFTER_S + 60, Progress(pending=4, steps=180))
    assert watch.restart_reason(STALLED_AFTER_S + 60) is None


def test_steps_or_an_empty_queue_are_not_a_stall() -> None:
    watch = ReplicaWatch()
    _ready(watch)
    for t in range(0, 300, 5):  # a long prefill: one step now and then
        watch.progress(t, Progress(pending=1, steps=t // 25))
    for t in range(300, 600, 5):  # idle: nothing pending, nothing to do
        watch.progress(t, Progress(pending=0, steps=12))
    watch.progress(600, None)  # metrics not read: the probe decides
    assert watch.restart_reason(600) is None


def test_progress_from_vllms_metrics() -> None:
    text = "\n".join(
        [
            "# TYPE vllm:num_requests_running gauge",
            'vllm:num_requests_running{engine="0",model_name="m"} 3.0',
            'vllm:num_requests_waiting{engine="0",model_name="m"} 2.0',
            'vllm:num_requests_waiting_by_reason{engine="0",reason="x"} 9.0',
            'vllm:iteration_tokens_total_count{engine="0",model_name="m"} 1234.0',
            'vllm:iteration_tokens_total_sum{engine="0",model_name="m"} 99999.0',
        ]
    )
    assert read_progress(text) == Progress(pending=5.0, steps=1234.0)
    assert read_progress("# no vLLM metrics here") is None
