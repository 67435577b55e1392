"""Where each engine replica runs: which GPUs, or which CPU cores.

The machine is read at the edge (`visible_gpus`, `gpu_facts`, `usable_cpus`,
`read_cpu_topology`); planning is pure: the device facts come in as arguments so
that every rule can be tested without a GPU or the machine's topology.
"""

from __future__ import annotations

import os
import platform
import shutil
import subprocess
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

DEVICES = ("auto", "cpu", "cuda")
SYSFS = Path("/sys")
# Cores kept free of a default CPU engine's OpenMP threads: vLLM's own auto binding
# reserves one per engine (its local world size) for the API server and scheduler;
# nginx and the gateway run there too.
RESERVED_CPUS_PER_ENGINE = 1


# Where vgate's own processes run (nginx, the gateway, the monitor, supervisord): the
# cores the CPU default keeps free of the engines' compute threads. The engines' launcher
# takes back every core (ENGINE_CPUS_ENV) before it starts vLLM, as plain vLLM runs.
FRONT_CPUS_ENV = "VGATE_FRONT_CPUS"
ENGINE_CPUS_ENV = "VGATE_ENGINE_CPUS"


class PlacementError(ValueError):
    """A configuration that cannot be placed on this machine."""


@dataclass(frozen=True)
class Placement:
    """One engine replica's share of the machine."""

    replica: int
    device: str  # "cuda" or "cpu"
    gpus: tuple[int, ...] = ()
    cpus: tuple[int, ...] = ()  # CPU: the cores its OpenMP threads are bound to
    cluster_gpus: int = 0  # multi-host: GPUs the replica takes across the Ray cluster
    reserved_cpus: tuple[int, ...] = ()  # CPU default: its node's cores kept free of them
    # Several models: on a GPU, the share of each of its GPUs' memory it may take (vLLM's
    # --gpu-memory-utilization); on the CPU, its share of the container's KV cache space.
    memory: float | None = None

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


@dataclass(frozen=True)
class GpuFacts:
    """What vLLM's default --max-num-seqs depends on: a GPU's memory and name."""

    memory_bytes: int
    name: str


def gpu_facts(index: int, timeout_s: float = 20) -> GpuFacts | None:
    """GPU `index`'s total memory and name from nvidia-smi; None if it cannot say."""
    if shutil.which("nvidia-smi") is None:
        return None
    try:
        query = ["--query-gpu=name,memory.total", "--format=csv,noheader,nounits"]
        out = subprocess.run(
            ["nvidia-smi", "-i", str(index), *query],
            capture_output=True,
            text=True,
            timeout=timeout_s,
            check=True,
        ).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    return parse_gpu_facts(out)


def parse_gpu_facts(out: str) -> GpuFacts | None:
    """nvidia-smi's `NAME, MiB` line (the first, if several) as GpuFacts."""
    name, _, mib = (out.strip().splitlines() or [""])[0].rpartition(",")
    try:
        return GpuFacts(memory_bytes=int(float(mib)) << 20, name=name.strip())
    except ValueError:
        return None


def usable_cpus() -> list[int]:
    """CPU cores this process may run on (cgroup/affinity aware)."""
    return sorted(os.sched_getaffinity(0))


@dataclass(frozen=True)
class CpuNode:
    """One NUMA node's usable logical CPUs, grouped by physical core (SMT siblings)."""

    node: int
    cores: tuple[tuple[int, ...], ...]  # each core's logical CPUs, ascending


@dataclass(frozen=True)
class CpuTopology:
    nodes: tuple[CpuNode, ...]
    arch: str = "x86_64"  # platform.machine(): which SMT sibling vLLM binds to


def _id_list(text: str) -> list[int]:
    """sysfs's "0-3,8" -> [0, 1, 2, 3, 8]."""
    ids: list[int] = []
    for part in text.strip().split(","):
        if part:
            first, _, last = part.partition("-")
            ids.extend(range(int(first), int(last or first) + 1))
    return ids


def read_cpu_topology(
    root: Path = SYSFS, allowed: Iterable[int] | None = None, arch: str | None = None
) -> CpuTopology:
    """The NUMA nodes and physical cores of the CPUs this process may use, from sysfs.

    Without NUMA information (no node dirs) every usable CPU is on one node; without
    SMT information each CPU is its own core.
    """
    usable = set(os.sched_getaffinity(0) if allowed is None else allowed)
    found: list[tuple[int, set[int]]] = []
    node_dirs = (root / "devices/system/node").glob("node[0-9]*")
    for node_dir in sorted(node_dirs, key=lambda d: int(d.name[4:])):
        try:
            cpus = set(_id_list((node_dir / "cpulist").read_text())) & usable
        except (OSError, ValueError):
            continue
        if cpus:  # a node of memory alone has none
            found.append((int(node_dir.name[4:]), cpus))
    if not found:
        found = [(0, usable)]
    nodes = []
    for node, cpus in found:
        cores: dict[tuple[int, ...], list[int]] = {}
        for cpu in sorted(cpus):
            topology = root / f"devices/system/cpu/cpu{cpu}/topology/thread_siblings_list"
            try:
                siblings = tuple(sorted(_id_list(topology.read_text())))
            except (OSError, ValueError):
                siblings = (cpu,)
            cores.setdefault(siblings or (cpu,), []).append(cpu)
        nodes.append(CpuNode(node, tuple(tuple(c) for c in cores.values())))
    return CpuTopology(tuple(nodes), platform.machine() if arch is None else arch)


def _smt_pick(arch: str) -> Callable[[tuple[int, ...]], tuple[int, ...]]:
    """Which logical CPUs of one physical core vLLM's auto binding uses (ompmultiprocessing)."""
    machine = arch.lower()
    if machine in ("x86_64", "amd64", "i386", "i686", "s390x"):
        return lambda cpus: cpus[-1:]  # one per physical core: the last sibling
    if machine.startswith("ppc"):
        return lambda cpus: tuple(c for c in cpus if c % 8 < 4)
    return lambda cpus: cpus  # no SMT (Arm, RISC-V): every logical CPU


def plan(
    device: str,
    gpus: list[int],
    cpus: list[int],
    tensor_parallel_size: int = 1,
    replicas: int | None = None,
    ray: bool = False,
    topology: CpuTopology | None = None,
) -> list[Placement]:
    """Split the machine into engine replicas.

    GPUs: one replica per tensor-parallel group of consecutive GPUs. CPU, by
    default: one replica per NUMA node of `topology` (without one: `cpus` as one
    node, each CPU its own core), bound as vLLM's own auto binding binds one engine
    there (see `_plan_cpu_nodes`). CPU with `replicas` given: each replica gets its
    own contiguous slice of `cpus`, all of them, so engines do not fight over the
    same cores (when there are more replicas than cores, slices are shared).
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
    if replicas is None:
        _check_cpus(cpus, tensor_parallel_size)
        if topology is None:
            topology = CpuTopology((CpuNode(0, tuple((c,) for c in cpus)),))
        return _plan_cpu_nodes(topology)
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


def _check_cpus(cpus: list[int], tp: int) -> None:
    if not cpus:
        raise PlacementError("no CPU core is available to this process")
    if tp != 1:
        raise PlacementError(
            "tensor or pipeline parallelism (--tensor-parallel-size, --pipeline-parallel-size) "
            "needs --device cuda"
        )


def _plan_cpu_nodes(topology: CpuTopology) -> list[Placement]:
    """One replica per NUMA node, its OpenMP threads where vLLM's auto binding puts them.

    That is plain vLLM's own choice for one engine on a node
    (vllm/utils/ompmultiprocessing.py, `_get_autobind_cpu_ids`): the node's cores,
    one logical CPU per physical core on x86 (the last SMT sibling), the highest
    `RESERVED_CPUS_PER_ENGINE` left to the engine's API server and scheduler (and
    here nginx and the gateway) when more than that remain. Engines on the same
    cores spin against each other and the front door: on 2 cores, 2 engines lost
    2.5-4x to one plain vLLM.
    """
    placements = []
    pick = _smt_pick(topology.arch)
    for node in topology.nodes:
        chosen = sorted(cpu for core in node.cores for cpu in pick(core))
        keep = RESERVED_CPUS_PER_ENGINE if len(chosen) > RESERVED_CPUS_PER_ENGINE else 0
        omp, reserved = tuple(chosen[: len(chosen) - keep]), tuple(chosen[len(chosen) - keep :])
        if omp:
            placements.append(Placement(len(placements), "cpu", cpus=omp, reserved_cpus=reserved))
    if not placements:
        raise PlacementError("no CPU core is available to this process")
    return placements


def _plan_cpus(cpus: list[int], tp: int, count: int) -> list[Placement]:
    _check_cpus(cpus, tp)
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


def front_cpus(placements: list[Placement]) -> tuple[int, ...]:
    """The cores kept free of every engine's compute threads (none: no pinning)."""
    return tuple(sorted({c for p in placements for c in p.reserved_cpus}))


def cpu_list(cpus: tuple[int, ...] | list[int]) -> str:
    return ",".join(map(str, cpus))


def pin(value: str | None) -> None:
    """This process (and what it starts) onto the cores `value` lists, if any."""
    if value:
        os.sched_setaffinity(0, {int(c) for c in value.split(",")})


# vLLM's default --gpu-memory-utilization: what several models split when no
# --gpu-memory-partition is given.
DEFAULT_MEMORY_SHARE = 0.9
_FIT = 1e-9  # shares are decimal fractions: 0.45 + 0.45 + 0.1 must fit in 1


@dataclass(frozen=True)
class ModelDemand:
    """What one of several models asks of the machine (Google's co-host flags)."""

    name: str
    group: int = 1  # GPUs per replica: tensor x pipeline parallel size
    replicas: int | None = None  # None: one
    share: float | None = None  # of the whole machine's GPU memory; None: an even split


def plan_models(
    device: str,
    gpus: list[int],
    cpus: list[int],
    demands: list[ModelDemand],
    taken: Iterable[Placement] = (),
) -> list[list[Placement]]:
    """Each model's replicas, for several models; replica numbers are left to the caller.

    GPUs, as Google's co-host server shares them: a model's share of the machine's GPU
    memory is spread over its replicas' GPUs, each engine's --gpu-memory-utilization, and
    engines of different models share a GPU while their fractions fit in it. Groups of a
    replica's GPUs are consecutive and aligned, first fit, after what `taken` (engines
    already running) holds. CPU: the cores, and the KV cache space, split by the same
    shares (each engine at least one core; fewer cores than engines are shared).
    """
    if device == "auto":
        device = "cuda" if gpus else "cpu"
    default = DEFAULT_MEMORY_SHARE / len(demands)
    shares = [d.share if d.share is not None else default for d in demands]
    if device == "cuda":
        if not gpus:
            raise PlacementError("--device cuda, but no GPU is visible")
        free = {g: 1.0 for g in gpus}
        for p in taken:
            for g in p.gpus:
                if g in free:
                    free[g] -= p.memory or 0.0
        return [_place_model_gpus(d, s, gpus, free) for d, s in zip(demands, shares, strict=True)]
    for d in demands:
        _check_cpus(cpus, d.group)
    engines = [
        (m, share / (d.replicas or 1))
        for m, (d, share) in enumerate(zip(demands, shares, strict=True))
        for _ in range(d.replicas or 1)
    ]
    total = sum(weight for _, weight in engines)
    slices = _weighted_slices(cpus, [weight / total for _, weight in engines])
    out: list[list[Placement]] = [[] for _ in demands]
    for (m, weight), cores in zip(engines, slices, strict=True):
        out[m].append(Placement(0, "cpu", cpus=cores, memory=round(weight / total, 4)))
    return out


def _place_model_gpus(
    demand: ModelDemand, share: float, gpus: list[int], free: dict[int, float]
) -> list[Placement]:
    group, replicas = demand.group, demand.replicas or 1
    fraction = share * len(gpus) / (replicas * group)
    what = f"model {demand.name}: a {share:g} share of {len(gpus)} GPUs' memory over "
    what += f"{replicas} replica(s) of {group} GPU(s)"
    if fraction > 1 + _FIT:
        raise PlacementError(
            f"{what} is {fraction:.2f} of each GPU: raise its --model-replicas or lower its "
            "--gpu-memory-partition"
        )
    placed = []
    for _ in range(replicas):
        starts = range(0, len(gpus) - group + 1, group)
        fits = [
            gpus[k : k + group]
            for k in starts
            if all(free[g] + _FIT >= fraction for g in gpus[k : k + group])
        ]
        if not fits:
            left = ", ".join(f"{g}:{max(free[g], 0):.2f}" for g in gpus)
            raise PlacementError(
                f"{what} needs {fraction:.2f} of each GPU's memory, and no group of {group} "
                f"has it free (free, by GPU: {left}): the models' partitions do not fit"
            )
        for g in fits[0]:
            free[g] -= fraction
        placed.append(Placement(0, "cuda", gpus=tuple(fits[0]), memory=round(fraction, 4)))
    return placed


def _weighted_slices(cpus: list[int], weights: list[float]) -> list[tuple[int, ...]]:
    """Contiguous slices of `cpus` sized by `weights` (largest remainder, one core at
    least each); with fewer cores than slices, each slice one core, shared in turn."""
    if len(cpus) < len(weights):
        return [(cpus[i % len(cpus)],) for i in range(len(weights))]
    spare = len(cpus) - len(weights)
    exact = [w * spare for w in weights]
    sizes = [1 + int(e) for e in exact]
    by_remainder = sorted(range(len(weights)), key=lambda i: int(exact[i]) - exact[i])
    for i in by_remainder[: len(cpus) - sum(sizes)]:
        sizes[i] += 1
    slices, start = [], 0
    for size in sizes:
        slices.append(tuple(cpus[start : start + size]))
        start += size
    return slices
