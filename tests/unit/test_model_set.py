"""Several models in one container: Google's per-model lists, their placement, and what
an update keeps (engine/model_set.py, engine/placement.plan_models)."""

from __future__ import annotations

import pytest

from engine.model_set import (
    ModelSetError,
    ModelSpec,
    check_name,
    flag_groups,
    spec_key,
    split_models,
)
from engine.placement import ModelDemand, PlacementError, plan_models


def test_one_value_for_all_or_one_per_model() -> None:
    a, b = split_models(
        ["/m/a", "/m/b"],
        ["--max-model-len=1024", "--tensor-parallel-size=1,2", "--dtype", "auto"],
        replicas=[2],
        shares=[0.4, 0.5],
    )
    assert a.engine_args == ["--dtype", "auto", "--max-model-len=1024", "--tensor-parallel-size=1"]
    assert b.engine_args[-1] == "--tensor-parallel-size=2"
    assert (a.replicas, b.replicas, a.memory_share, b.memory_share) == (2, 2, 0.4, 0.5)


def test_one_model_is_not_split() -> None:
    (only,) = split_models(["/m/a"], ["--served-model-name", "a", "b"])
    assert only.engine_args == ["--served-model-name", "a", "b"]  # one model, two names


@pytest.mark.parametrize(
    ("args", "replicas", "shares", "says"),
    [
        (["--served-model-name=a,b,c"], None, None, "--served-model-name: 3 values for 2 models"),
        (["-tp", "1,2,4"], None, None, "--tensor-parallel-size: 3 values for 2 models"),
        ([], [1, 2, 3], None, "--replicas: 3 values for 2 models"),
        ([], None, [0.6, 0.6], "adds up to more than the whole machine's memory"),
        (["--served-model-name=a,a"], None, None, "each model needs its own name"),
    ],
)
def test_lists_that_do_not_fit_are_one_line(
    args: list[str], replicas: list[int] | None, shares: list[float] | None, says: str
) -> None:
    with pytest.raises(ModelSetError, match=says) as e:
        split_models(["/m/a", "/m/b"], args, replicas, shares)
    assert "\n" not in str(e.value)


def test_names_fit_for_the_routing() -> None:
    assert check_name("gemma-3n-E2B-it") == "gemma-3n-E2B-it"
    for bad in ("", "a b", 'a"b', "a$b", "a;b"):
        with pytest.raises(ModelSetError, match="model name"):
            check_name(bad)


def test_an_update_keeps_a_model_whose_flags_are_the_same_in_any_order_or_spelling() -> None:
    one = ModelSpec("/m/a", ["--max-model-len=1024", "--dtype", "auto"], 1, 0.45)
    same = ModelSpec("/m/a", ["--dtype=auto", "--max-model-len", "1024"], 1, 0.45)
    assert flag_groups(same.engine_args) == ["--dtype=auto", "--max-model-len=1024"]
    assert spec_key(one) == spec_key(same)
    assert spec_key(one) != spec_key(ModelSpec("/m/a", same.engine_args, 2, 0.45))
    assert spec_key(one) != spec_key(ModelSpec("/m/a", same.engine_args, 1, 0.45, {"X": "1"}))


def test_models_share_a_gpu_while_their_partitions_fit() -> None:
    demands = [ModelDemand("a", share=0.45), ModelDemand("b", share=0.45)]
    (a,), (b,) = plan_models("cuda", [0], [0, 1], demands)
    assert (a.gpus, b.gpus) == ((0,), (0,))
    assert (a.memory, b.memory) == (0.45, 0.45)  # each engine's --gpu-memory-utilization


def test_a_share_spreads_over_the_replicas_gpus() -> None:
    demands = [ModelDemand("a", group=2, replicas=2, share=0.5), ModelDemand("b", share=0.1)]
    a, b = plan_models("cuda", [0, 1, 2, 3], [0], demands)
    # First fit: both replicas share GPUs 0 and 1 (half of each), as Google's co-host does.
    assert [p.gpus for p in a] == [(0, 1), (0, 1)] and a[0].memory == 0.5
    assert b[0].gpus == (2,) and b[0].memory == 0.4  # 0.1 of 4 GPUs' memory, on one


def test_a_plan_that_does_not_fit_is_refused_in_one_line() -> None:
    with pytest.raises(PlacementError, match="do not fit") as e:
        plan_models("cuda", [0], [0], [ModelDemand("a", share=0.5)], taken=[_held(0.6)])
    assert "\n" not in str(e.value)
    with pytest.raises(PlacementError, match="raise its --model-replicas"):
        plan_models("cuda", [0, 1], [0], [ModelDemand("a", share=0.9)])


def _held(memory: float):
    from engine.placement import Placement

    return Placement(0, "cuda", gpus=(0,), memory=memory)


def test_on_the_cpu_cores_and_kv_are_split_by_the_shares() -> None:
    demands = [ModelDemand("a", share=0.75), ModelDemand("b", share=0.25)]
    (a,), (b,) = plan_models("cpu", [], [0, 1, 2, 3, 4, 5], demands)
    assert a.cpus == (0, 1, 2, 3) and b.cpus == (4, 5)
    assert (a.memory, b.memory) == (0.75, 0.25)  # of the container's KV cache space
