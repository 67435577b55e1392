"""Where each engine replica runs: which GPUs, or which CPU cores.

Pure functions: the device facts come in as arguments so that every rule can be
tested without a GPU.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from dataclasses import dataclass

DEVICES = ("auto", "cpu", "cuda")
DEFAULT_CPU_REPLICAS = 2


class PlacementError(ValueError):
    """A configuration that cannot be placed on this machine."""


@dataclass(frozen=True)
class Placement:
    """One engine replica's share of the machine."""

    replica: int
    device: str  # "cuda" or "cpu"
    gpus: tuple[int, ...] = ()
    cpus: tuple[int, ...] = ()
    cluster_gpus: int = 0  # multi-host: GPUs the replica takes across the Ray cluster

    @property
    def label(self) -> str:
        """Human-readable device, as /health reports it."""
        if self.cluster_gpus:
            return f"ray:{self.cluster_gpus} GPUs"
        if self.device == "cuda":
            return "cuda:" + ",".join(map(str, self.gpus))
        return "cpu:" + _ranges(self.cpus)


def visible_gpus() -> list[int]:
    """GPU indices this container may use: CUDA_VISIBLE_DEVICES, else nvidia-smi."""
    env = os.environ.get("CUDA_VISIBLE_DEVICES")
    if env is not None:
        return [int(x) for x in env.split(",") if x.strip().isdigit()]
    if shutil.which("nvidia-smi") is None:
        return []
    try:
        out = subprocess.run(
            ["nvidia-smi", "--query-gpu=index", "--format=csv,noheader"],
            capture_output=True,
            text=True,
            timeout=20,
            check=True,
        ).stdout
    except (OSError, subprocess.SubprocessError):
        return []
    return [int(line) for line in out.split() if line.strip().isdigit()]


def usable_cpus() -> list[int]:
    """CPU cores this process may run on (cgroup/affinity aware)."""
    return sorted(os.sched_getaffinity(0))


def plan(
    device: str,
    gpus: list[int],
    cpus: list[int],
    tensor_parallel_size: int = 1,
    replicas: int | None = None,
    ray: bool = False,
) -> list[Placement]:
    """Split the machine into engine replicas.

    GPUs: one replica per tensor-parallel group of consecutive GPUs. CPU: each
    replica gets its own contiguous slice of cores, so engines do not fight over
    the same cores (when there are more replicas than cores, slices are shared).
    `ray` (--distributed-executor-backend ray): one replica whose group may span
    hosts; vLLM's Ray executor places it on the cluster's GPUs, this host's included.
    """
    if device not in DEVICES:
        raise PlacementError(f"unknown device {device!r}: choose one of {', '.join(DEVICES)}")
    if tensor_parallel_size < 1:
        raise PlacementError("--tensor-parallel-size must be at least 1")
    if replicas is not None and replicas < 1:
        raise PlacementError("--replicas must be at least 1")
    if device == "auto":
        device = "cuda" if gpus else "cpu"
    if ray:
        return _plan_ray_cluster(device, gpus, tensor_parallel_size, replicas)
    if device == "cuda":
        return _plan_gpus(gpus, tensor_parallel_size, replicas)
    return _plan_cpus(cpus, tensor_parallel_size, replicas)


def _plan_gpus(gpus: list[int], tp: int, replicas: int | None) -> list[Placement]:
    if not gpus:
        raise PlacementError("--device cuda, but no GPU is visible")
    if len(gpus) % tp:
        raise PlacementError(
            f"{tp} GPUs per replica (tensor x pipeline parallel size) do not divide "
            f"the {len(gpus)} visible GPUs"
        )
    groups = len(gpus) // tp
    count = groups if replicas is None else replicas
    if count > groups:
        raise PlacementError(
            f"--replicas {count} needs {count * tp} GPUs with {tp} per replica, "
            f"but {len(gpus)} are visible"
        )
    return [
        Placement(replica=i, device="cuda", gpus=tuple(gpus[i * tp : (i + 1) * tp]))
        for i in range(count)
    ]


def _plan_ray_cluster(
    device: str, gpus: list[int], group: int, replicas: int | None
) -> list[Placement]:
    if device != "cuda":
        raise PlacementError("--distributed-executor-backend ray spans GPU hosts: it needs GPUs")
    if replicas not in (None, 1):
        raise PlacementError(
            "--distributed-executor-backend ray runs one replica across the Ray cluster; "
            "scale out with more leader groups (Vertex replicas, the GKE autoscaler)"
        )
    # Not checked against this host's GPUs: the rest are on the workers that joined.
    return [Placement(replica=0, device="cuda", gpus=tuple(gpus), cluster_gpus=group)]


def _plan_cpus(cpus: list[int], tp: int, replicas: int | None) -> list[Placement]:
    if not cpus:
        raise PlacementError("no CPU core is available to this process")
    if tp != 1:
        raise PlacementError(
            "tensor or pipeline parallelism (--tensor-parallel-size, --pipeline-parallel-size) "
            "needs --device cuda"
        )
    count = DEFAULT_CPU_REPLICAS if replicas is None else replicas
    if count <= len(cpus):
        size, extra = divmod(len(cpus), count)
        slices, start = [], 0
        for i in range(count):
            end = start + size + (1 if i < extra else 0)
            slices.append(tuple(cpus[start:end]))
            start = end
    else:
        slices = [(cpus[i % len(cpus)],) for i in range(count)]
    return [Placement(replica=i, device="cpu", cpus=s) for i, s in enumerate(slices)]


def _ranges(cpus: tuple[int, ...]) -> str:
    """(0, 1, 2, 5) -> "0-2,5": the form VLLM_CPU_OMP_THREADS_BIND takes."""
    runs: list[list[int]] = []
    for c in cpus:
        if runs and runs[-1][1] == c - 1:
            runs[-1][1] = c
        else:
            runs.append([c, c])
    return ",".join(str(a) if a == b else f"{a}-{b}" for a, b in runs)


def cpu_bind(p: Placement) -> str:
    """The VLLM_CPU_OMP_THREADS_BIND value for a CPU placement."""
    return _ranges(p.cpus)
