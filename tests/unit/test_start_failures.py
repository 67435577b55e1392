"""The monitor's verdict on replicas that cannot start, and the one cause a run ends with."""

from pathlib import Path

from engine.failures import Failure, StartWatch
from engine.fetch_model import DOWNLOAD_FAILED
from engine.launch import read_exits, record_exit
from gateway.control.monitor import fatal_cause, with_failures
from gateway.state import FAILED, READY, STARTING, ReplicaState

OOM = Failure("torch.OutOfMemoryError: CUDA out of memory", "lower --max-num-seqs")


def _replicas(*states: str) -> list[ReplicaState]:
    return [ReplicaState(i, s, f"cuda:{i}") for i, s in enumerate(states)]


def test_exit_records_round_trip(tmp_path: Path) -> None:
    record_exit(tmp_path, 1, OOM)
    record_exit(tmp_path, 1, Failure("x"))
    assert read_exits(tmp_path, 1) == [OOM, Failure("x")]
    assert read_exits(tmp_path, 0) == []


def test_a_replica_that_keeps_failing_to_start_is_failed_with_its_cause(tmp_path: Path) -> None:
    watch = StartWatch(limit=2)
    assert with_failures(tmp_path, _replicas(STARTING, READY), watch)[0].state == STARTING
    for _ in range(2):
        record_exit(tmp_path, 0, OOM)
        replicas = with_failures(tmp_path, _replicas(STARTING, READY), watch)
    assert replicas[0] == ReplicaState(0, FAILED, "cuda:0", OOM.line())
    assert replicas[1].state == READY
    assert fatal_cause(replicas) is None  # replica 1 still serves


def test_a_failed_download_fails_every_replica(tmp_path: Path) -> None:
    (tmp_path / DOWNLOAD_FAILED).write_text('{"cause": "the model download failed: 403"}')
    replicas = with_failures(tmp_path, _replicas(STARTING, STARTING), StartWatch())
    assert {r.state for r in replicas} == {FAILED}
    assert fatal_cause(replicas) == "no engine replica can start: the model download failed: 403"


def test_the_fatal_cause_names_each_replica_when_they_differ() -> None:
    replicas = [ReplicaState(0, FAILED, "cuda:0", "a"), ReplicaState(1, FAILED, "cuda:1", "b")]
    assert fatal_cause(replicas) == "no engine replica can start: replica 0: a; replica 1: b"
    assert fatal_cause([]) is None
