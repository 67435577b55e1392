"""The engine flags read by vLLM's own parser: the typed view, and refusals that name the flag."""

import pytest

from engine.vllm_args import (
    EngineArgs,
    EngineArgsError,
    GiB,
    default_max_num_seqs,
    read_engine_args,
)


def test_defaults_and_the_values_vgate_asks_for() -> None:
    assert read_engine_args([]) == EngineArgs()
    args = read_engine_args(["--max-num-seqs=12", "--enable-lora", "--served-model-name", "a", "b"])
    assert (args.max_num_seqs, args.enable_lora, args.served_model_name) == (12, True, ["a", "b"])


@pytest.mark.parametrize(
    ("argv", "tp", "pp"),
    [
        (["-tp", "2"], 2, 1),
        (["-tp=4", "-pp=2"], 4, 2),
        (["--tensor-parallel-size=2", "--pipeline-parallel-size", "2"], 2, 2),
        (["--tensor_parallel_size=8"], 8, 1),  # vLLM takes underscores too
    ],
)
def test_vllm_aliases_mean_what_they_mean_to_vllm(argv: list[str], tp: int, pp: int) -> None:
    args = read_engine_args(argv)
    assert (args.tensor_parallel_size, args.pipeline_parallel_size) == (tp, pp)
    assert args.gpus_per_replica == tp * pp


def test_sequences_per_engine_is_the_flag_or_vllms_default() -> None:
    assert read_engine_args(["--max-num-seqs=12"]).sequences_per_engine("cuda", 80 * GiB) == 12
    assert EngineArgs().sequences_per_engine("cuda") == 256  # the GPU unknown
    assert EngineArgs().sequences_per_engine("cuda", 80 * GiB, "NVIDIA H100 80GB HBM3") == 1024
    assert EngineArgs().sequences_per_engine("cpu") == 128
    throughput = read_engine_args(["--performance-mode", "throughput"])
    assert throughput.performance_mode == "throughput"
    assert throughput.sequences_per_engine("cuda", 80 * GiB, "NVIDIA A100-SXM4-80GB") == 512
    assert throughput.sequences_per_engine("cpu") == 256


# (device memory in GiB, name): vLLM's own rule draws its lines at 70 and 160 GiB, and A100s.
GPUS = [
    (0, ""),
    (15, "Tesla T4"),
    (22, "NVIDIA L4"),
    (44.4, "NVIDIA L40S"),
    (69.9, "NVIDIA H100 80GB HBM3"),
    (70, "NVIDIA H100 80GB HBM3"),
    (79.6, "NVIDIA H100 80GB HBM3"),
    (79.1, "NVIDIA A100-SXM4-80GB"),
    (140, "NVIDIA H200"),
    (159.9, "NVIDIA A100 made up"),
    (160, "NVIDIA A100 made up"),
    (178.4, "NVIDIA B200"),
]


@pytest.mark.parametrize(("gib", "name"), GPUS)
@pytest.mark.parametrize("mode", ["balanced", "throughput"])
@pytest.mark.parametrize("world_size", [1, 2])
def test_default_max_num_seqs_is_vllms_own(
    monkeypatch: pytest.MonkeyPatch, gib: float, name: str, mode: str, world_size: int
) -> None:
    # A drift check: vLLM's EngineArgs.get_batch_defaults for its OpenAI server, on a
    # platform that says the same about its device.
    from vllm.engine.arg_utils import EngineArgs as VllmEngineArgs
    from vllm.engine.arg_utils import current_platform
    from vllm.usage.usage_lib import UsageContext

    memory = int(gib * GiB)
    for device in ("cuda", "cpu"):
        monkeypatch.setattr(current_platform, "get_device_total_memory", lambda *_: memory)
        monkeypatch.setattr(current_platform, "get_device_name", lambda *_: name)
        monkeypatch.setattr(current_platform, "is_cpu", lambda d=device: d == "cpu")
        monkeypatch.setattr(current_platform, "is_tpu", lambda: False)
        _, seqs = VllmEngineArgs.get_batch_defaults(world_size)
        vllms = seqs[UsageContext.OPENAI_API_SERVER] * (2 if mode == "throughput" else 1)
        mine = default_max_num_seqs(device, world_size, memory, name, mode)
        assert mine == vllms, (device, gib, name, mode)


def test_an_unknown_gpu_gets_the_smallest_default(monkeypatch: pytest.MonkeyPatch) -> None:
    from vllm.engine.arg_utils import EngineArgs as VllmEngineArgs
    from vllm.engine.arg_utils import current_platform
    from vllm.usage.usage_lib import UsageContext

    def unknown(*_: object) -> int:
        raise RuntimeError("no device")

    monkeypatch.setattr(current_platform, "get_device_total_memory", unknown)
    monkeypatch.setattr(current_platform, "is_cpu", lambda: False)
    monkeypatch.setattr(current_platform, "is_tpu", lambda: False)
    _, seqs = VllmEngineArgs.get_batch_defaults(1)
    assert default_max_num_seqs("cuda") == seqs[UsageContext.OPENAI_API_SERVER] == 256


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (
            ["--max-num-seqz=3"],
            "unrecognized arguments: --max-num-seqz=3 (did you mean --max-num-seqs?)",
        ),
        (["--max-num-seqs", "x"], "argument --max-num-seqs: invalid int value: 'x'"),
        (["--swap-space=16"], "unrecognized arguments: --swap-space=16"),
        (["--enable-auto-tool-choice"], "--enable-auto-tool-choice requires --tool-call-parser"),
        (["--dtype", "float7"], "argument --dtype: invalid choice: 'float7'"),
    ],
)
def test_refusals_name_the_flag_and_vllms_reason(argv: list[str], message: str) -> None:
    with pytest.raises(EngineArgsError) as refused:
        read_engine_args(argv)
    assert str(refused.value).startswith(message)


def test_a_positional_among_the_flags_is_seen() -> None:
    assert read_engine_args(["--enforce-eager", "org/model"]).model_tag == "org/model"


@pytest.mark.parametrize("argv", [["--host", "0.0.0.0"], ["--port=9000"], ["--uds", "/tmp/s"]])
def test_engines_stay_on_loopback(argv: list[str]) -> None:
    # vgate serve -- --host 0.0.0.0 would put the raw engines on every interface.
    with pytest.raises(EngineArgsError, match="--host, --port and --uds are vgate's"):
        read_engine_args(argv)
