"""Placement of engine replicas on GPUs and CPU cores."""

import pytest

from engine.placement import Placement, PlacementError, cpu_bind, plan


def test_auto_picks_cuda_when_gpus_are_visible() -> None:
    placements = plan("auto", [0, 1, 2, 3], [0, 1], tensor_parallel_size=2)
    assert [p.gpus for p in placements] == [(0, 1), (2, 3)]
    assert {p.device for p in placements} == {"cuda"}
    assert placements[1].label == "cuda:2,3"


def test_auto_falls_back_to_cpu_with_two_replicas() -> None:
    placements = plan("auto", [], [0, 1])
    assert [(p.device, p.cpus) for p in placements] == [("cpu", (0,)), ("cpu", (1,))]


def test_cpu_cores_are_split_into_contiguous_slices() -> None:
    placements = plan("cpu", [], list(range(8)), replicas=3)
    assert [p.cpus for p in placements] == [(0, 1, 2), (3, 4, 5), (6, 7)]
    assert [cpu_bind(p) for p in placements] == ["0-2", "3-5", "6-7"]


def test_more_cpu_replicas_than_cores_share_cores() -> None:
    placements = plan("cpu", [], [0, 1], replicas=3)
    assert [p.cpus for p in placements] == [(0,), (1,), (0,)]


def test_cpu_bind_ranges() -> None:
    assert cpu_bind(Placement(0, "cpu", cpus=(0, 1, 2, 5, 7, 8))) == "0-2,5,7-8"


def test_fewer_gpu_replicas_than_groups() -> None:
    assert [p.gpus for p in plan("cuda", [0, 1, 2, 3], [], replicas=2)] == [(0,), (1,)]


def test_respects_visible_gpu_ids() -> None:
    assert [p.gpus for p in plan("cuda", [4, 6], [], 1)] == [(4,), (6,)]


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (("cuda", [0, 1, 2], [0], 2, None), "do not divide the 3 visible GPUs"),
        (("cuda", [], [0], 1, None), "no GPU is visible"),
        (("cuda", [0, 1], [0], 1, 3), "needs 3 GPUs"),
        (("tpu", [], [0], 1, None), "unknown device 'tpu'"),
        (("cpu", [], [0, 1], 2, None), "needs --device cuda"),
        (("cpu", [], [0], 1, 0), "at least 1"),
    ],
)
def test_impossible_placements_say_why(args: tuple, message: str) -> None:
    with pytest.raises(PlacementError, match=message):
        plan(*args)
