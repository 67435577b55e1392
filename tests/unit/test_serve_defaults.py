"""`vgate serve`'s default admission: each engine's --max-num-seqs as vLLM would choose it."""

import pytest

from engine import placement
from engine.placement import GpuFacts, Placement
from engine.vllm_args import EngineArgs, GiB
from gateway.control.serve import sequences_per_engine

H100 = GpuFacts(80 * GiB, "NVIDIA H100 80GB HBM3")


@pytest.fixture
def asked(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """The GPUs nvidia-smi was asked about; it says H100 for each."""
    calls: list[int] = []

    def facts(index: int) -> GpuFacts:
        calls.append(index)
        return H100

    monkeypatch.setattr(placement, "gpu_facts", facts)
    return calls


def test_a_gpu_engine_gets_vllms_default_for_its_gpu(asked: list[int]) -> None:
    first = Placement(0, "cuda", gpus=(2, 3))
    assert sequences_per_engine(EngineArgs(), first) == 1024
    assert asked == [2]
    throughput = EngineArgs(performance_mode="throughput")
    assert sequences_per_engine(throughput, first) == 2048


def test_the_flag_wins_and_nvidia_smi_is_not_asked(asked: list[int]) -> None:
    config = EngineArgs(max_num_seqs=48)
    assert sequences_per_engine(config, Placement(0, "cuda", gpus=(0,))) == 48
    assert sequences_per_engine(EngineArgs(), Placement(0, "cpu", cpus=(0,))) == 128
    assert asked == []


def test_a_gpu_nvidia_smi_cannot_describe_gets_the_smallest_default(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(placement, "gpu_facts", lambda index: None)
    assert sequences_per_engine(EngineArgs(), Placement(0, "cuda", gpus=(0,))) == 256
