"""Google's Model Garden container arguments, as its notebooks write them, made vgate's."""

import pytest

from engine.model_set import split_models
from gateway.config import resolve
from gateway.control.google_args import QUIET_STATS_INTERVAL_S, host_kv_offload, translate

# The notebook's deploy_model_vllm, as Vertex appends it to the entrypoint.
NOTEBOOK = [
    "python", "-m", "vllm.entrypoints.api_server", "--host=0.0.0.0", "--port=8080",
    "--model=org/llama", "--tensor-parallel-size=1", "--swap-space=16",
    "--gpu-memory-utilization=0.9", "--max-model-len=4096", "--dtype=auto", "--max-loras=1",
    "--max-cpu-loras=8", "--max-num-seqs=256", "--disable-log-stats", "--trust-remote-code",
    "--enforce-eager", "--enable-lora", "--model-type=llama3.1",
]  # fmt: skip


def test_the_notebooks_arguments() -> None:
    out = translate(NOTEBOOK)
    assert out.argv == [
        "--host=0.0.0.0", "--port=8080", "--model=org/llama", "--tensor-parallel-size=1",
        "--gpu-memory-utilization=0.9", "--max-model-len=4096", "--dtype=auto", "--max-loras=1",
        "--max-cpu-loras=8", "--max-num-seqs=256", "--trust-remote-code", "--enforce-eager",
        "--enable-lora",
    ]  # fmt: skip
    assert out.engine_env == {"VLLM_LOG_STATS_INTERVAL": QUIET_STATS_INTERVAL_S}
    assert [n.split(":", 1)[0] for n in out.notes] == [
        "python -m vllm.entrypoints.api_server",
        "--swap-space=16",
        "--disable-log-stats",
        "--model-type=llama3.1",
    ]
    assert "vllm:* metric" in out.notes[2]


@pytest.mark.parametrize(
    "launcher",
    [
        ["python", "-m", "vllm.entrypoints.api_server"],
        ["python3", "-m", "vllm.entrypoints.openai.api_server"],
        ["/usr/bin/python3.12", "-m", "vllm.entrypoints.openai.api_server"],
        ["python", "-m", "vllm.entrypoints.nginx_server"],
        ["python", "-m", "vllm.entrypoints.model_cohost_server"],
        ["vllm", "serve"],
        ["/vllm-workspace/ray_launcher.sh", "python", "-m", "vllm.entrypoints.api_server"],
    ],
)
def test_launchers_are_dropped(launcher: list[str]) -> None:
    out = translate([*launcher, "--max-model-len=64"])
    assert out.argv == ["--max-model-len=64"]
    assert out.notes[0].startswith(" ".join(launcher) + ": dropped")


def test_vllm_serve_keeps_its_positional_model() -> None:
    assert translate(["vllm", "serve", "org/m", "-tp", "2"]).argv == ["org/m", "-tp", "2"]


def test_a_module_that_is_not_vllms_is_left_alone() -> None:
    assert translate(["python", "-m", "other.server", "--x"]).argv == [
        "python", "-m", "other.server", "--x"
    ]  # fmt: skip


@pytest.mark.parametrize(
    ("given", "becomes"),
    [
        (["--num_instances=2"], ["--replicas=2"]),
        (["--num-instances", "3"], ["--replicas=3"]),
        (["--model-replicas=4"], ["--replicas=4"]),
        (["--total_gpus=8"], []),
        (["--total-gpus", "8"], []),
        (["--gpu-memory-partition=0.4"], ["--gpu-memory-partition=0.4"]),
        (["--model-replicas=4,2"], ["--replicas=4,2"]),
        (["--swap-space", "16", "--seed=1"], ["--seed=1"]),
        (["--disable-log-requests"], []),
        (["--tool-call-parser=vertex-llama-3"], ["--tool-call-parser=llama3_json"]),
        (["--tool-call-parser", "pythonic"], ["--tool-call-parser=pythonic"]),
        (
            ["--host-prefix-kv-cache-utilization-target=0.7"],
            ["--host-kv-cache-fraction=0.7"],
        ),
        (["--host-prefix-kv-cache-min-len=1024"], []),
        (["--limit_mm_per_prompt='image=1'"], ['--limit-mm-per-prompt={"image": 1}']),
        (["--limit-mm-per-prompt", '{"image": 2}'], ['--limit-mm-per-prompt={"image": 2}']),
        (["--num-speculative-tokens=3"], ["--speculative-config.num_speculative_tokens=3"]),
        (
            ["--speculative-draft-tensor-parallel-size=8"],
            ["--speculative-config.draft_tensor_parallel_size=8"],
        ),
        (
            ["--max-model-len=64", "--", "--swap-space=1"],
            ["--max-model-len=64", "--", "--swap-space=1"],
        ),
    ],
)
def test_google_flags_map_or_drop(given: list[str], becomes: list[str]) -> None:
    assert translate(given).argv == becomes


def test_every_mapped_or_dropped_flag_says_so_once() -> None:
    out = translate(["--total_gpus=8", "--num_instances=2", "--max-model-len=64"])
    assert out.notes == [
        "--total_gpus=8: dropped: vgate uses the GPUs it sees "
        "(CUDA_VISIBLE_DEVICES, else nvidia-smi)",
        "--num_instances=2: as --replicas=2",
    ]


COHOST = [
    "python", "-m", "vllm.entrypoints.model_cohost_server", "--host=0.0.0.0", "--port=8080",
    "--model=/m/model-a,/m/model-b", "--gpu-memory-partition=0.45,0.45",
    "--pipeline-parallel-size=1", "--tensor-parallel-size=1", "--model-replicas=1,1",
    "--data-parallel-size=1", "--swap-space=16", "--total-gpus=1",
    "--served-model-name=alpha,beta", "--max-model-len=1024",
]  # fmt: skip


def test_the_cohost_notebooks_arguments_are_two_models() -> None:
    config = resolve(translate(COHOST).argv, {})
    assert config.models == ["/m/model-a", "/m/model-b"]
    assert (config.replicas, config.gpu_memory_partition) == ([1, 1], [0.45, 0.45])
    a, b = split_models(
        config.models, config.engine_args, config.replicas, config.gpu_memory_partition
    )
    assert "--served-model-name=alpha" in a.engine_args
    assert "--served-model-name=beta" in b.engine_args
    assert "--max-model-len=1024" in a.engine_args and "--data-parallel-size=1" in b.engine_args
    assert (a.replicas, a.memory_share) == (1, 0.45)


def test_host_kv_cache_is_vllms_kv_offloading_on_gpus_only() -> None:
    flags, note = host_kv_offload(0.5, 64 * 2**30, replicas=4, device="cuda")
    assert flags == ["--kv-offloading-backend=native", "--kv-offloading-size=8.0"]
    assert note and "per replica" in note
    assert host_kv_offload(0.5, 64 * 2**30, replicas=2, device="cpu")[0] == []
    assert host_kv_offload(None, 64 * 2**30, replicas=2, device="cuda") == ([], None)
