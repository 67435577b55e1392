"""Replica states, and the file the monitor shares them through."""

import time

from gateway.state import (
    DOWN,
    FAILED,
    READY,
    STARTING,
    ReplicaState,
    StateReader,
    write_state,
)


def test_reader_sees_new_state_and_distrusts_a_stale_one(tmp_path) -> None:
    path = tmp_path / "state.json"
    reader = StateReader(path, {0: "cpu:0", 1: "cpu:1"})
    assert [r.state for r in reader.replicas()] == [STARTING, STARTING]  # no file yet
    write_state(path, [ReplicaState(0, READY, "cpu:0"), ReplicaState(1, DOWN, "cpu:1")])
    assert [r.state for r in reader.replicas()] == [READY, DOWN]
    old = time.time() - 60
    write_state(path, [ReplicaState(0, READY, "cpu:0"), ReplicaState(1, READY, "cpu:1")], now=old)
    # The monitor stopped reporting: nothing counts as ready.
    assert [r.state for r in reader.replicas()] == [STARTING, STARTING]


def test_a_failed_replica_carries_its_cause_through_the_file(tmp_path) -> None:
    failed = ReplicaState(0, FAILED, "cuda:0", "torch.OutOfMemoryError: CUDA out of memory")
    write_state(tmp_path / "s.json", [failed, ReplicaState(1, READY, "cuda:1")])
    replicas = StateReader(tmp_path / "s.json", {0: "cuda:0", 1: "cuda:1"}).replicas()
    assert replicas[0] == failed
    assert [r.public() for r in replicas] == [
        {"replica": 0, "state": FAILED, "device": "cuda:0", "cause": failed.cause},
        {"replica": 1, "state": READY, "device": "cuda:1"},  # no cause: none shown
    ]
