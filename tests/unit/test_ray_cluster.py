"""Multi-host placement (vLLM's Ray executor) and the leader's wait for the cluster's GPUs.

Ray is not installed here (vLLM's GPU image has it): the cluster's GPU count is a
function given to the wait, as the real one asks ray.cluster_resources().
"""

import pytest

from engine.placement import PlacementError, plan
from engine.ray_cluster import ClusterNotReady, wait_for_gpus
from engine.vllm_args import read_engine_args
from engine.workers import build_workers, engine_env


def test_ray_takes_one_replica_larger_than_this_hosts_gpus() -> None:
    # tp 8 x pp 2 on a leader with 8 GPUs: the other 8 are on the worker.
    (p,) = plan("auto", list(range(8)), [0, 1], tensor_parallel_size=16, ray=True)
    assert (p.gpus, p.cluster_gpus, p.label) == (tuple(range(8)), 16, "ray:16 GPUs")
    assert engine_env(p, {})["CUDA_VISIBLE_DEVICES"] == "0,1,2,3,4,5,6,7"
    (worker,) = build_workers([p], [9000], "python", "m", None, [], {})
    assert worker.cluster_gpus == 16


def test_without_ray_the_same_group_does_not_fit() -> None:
    with pytest.raises(PlacementError, match="do not divide"):
        plan("auto", list(range(8)), [0, 1], tensor_parallel_size=16)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [({"replicas": 2}, "one replica across the Ray cluster"), ({}, "needs GPUs")],
)
def test_ray_mode_refuses_what_it_cannot_do(kwargs: dict, match: str) -> None:
    gpus = list(range(8)) if kwargs else []
    with pytest.raises(PlacementError, match=match):
        plan("auto", gpus, [0, 1], tensor_parallel_size=16, ray=True, **kwargs)


def test_the_engine_flags_say_when_a_replica_spans_hosts() -> None:
    flags = ["--distributed-executor-backend", "ray", "-tp", "8", "-pp", "2"]
    args = read_engine_args(flags)
    assert args.spans_hosts and args.gpus_per_replica == 16
    assert not read_engine_args(["-tp", "2"]).spans_hosts


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now

    def sleep(self, s: float) -> None:
        self.now += s


def test_the_leader_waits_until_the_workers_gpus_join() -> None:
    clock, said = Clock(), []
    joined = iter([8.0, 8.0, 16.0])
    have = wait_for_gpus(16, lambda: next(joined), 60, clock.sleep, clock, said.append)
    assert have == 16.0 and clock.now == 10.0
    assert said == ["waiting for the Ray cluster: 8 of 16 GPUs"]  # once per change


def test_a_cluster_that_never_fills_is_a_clear_error() -> None:
    clock = Clock()
    with pytest.raises(ClusterNotReady, match="has 8 GPUs after 60 s; the replica needs 16"):
        wait_for_gpus(16, lambda: 8.0, 60, clock.sleep, clock, lambda _: None)
