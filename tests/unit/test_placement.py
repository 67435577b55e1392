"""Placement of engine replicas on GPUs and CPU cores."""

import os
from pathlib import Path
from types import SimpleNamespace

import pytest

from engine.placement import (
    CpuNode,
    CpuTopology,
    GpuFacts,
    Placement,
    PlacementError,
    cpu_bind,
    front_cpus,
    gpu_facts,
    parse_gpu_facts,
    pin,
    plan,
    read_cpu_topology,
)


def fake_sysfs(root: Path, nodes: dict[int, str] | None, siblings: dict[int, str]) -> Path:
    """A sysfs tree: each node's cpulist (None: no node dir) and each CPU's SMT siblings."""
    for node, cpulist in (nodes or {}).items():
        (root / f"devices/system/node/node{node}").mkdir(parents=True)
        (root / f"devices/system/node/node{node}/cpulist").write_text(cpulist + "\n")
    (root / "devices/system/node").mkdir(parents=True, exist_ok=True)
    (root / "devices/system/node/online").write_text("0\n")  # not a node dir
    for cpu, listed in siblings.items():
        (root / f"devices/system/cpu/cpu{cpu}/topology").mkdir(parents=True)
        (root / f"devices/system/cpu/cpu{cpu}/topology/thread_siblings_list").write_text(listed)
    return root


def test_auto_picks_cuda_when_gpus_are_visible() -> None:
    placements = plan("auto", [0, 1, 2, 3], [0, 1], tensor_parallel_size=2)
    assert [p.gpus for p in placements] == [(0, 1), (2, 3)]
    assert {p.device for p in placements} == {"cuda"}
    assert placements[1].label == "cuda:2,3"


def test_auto_falls_back_to_one_cpu_replica_that_leaves_a_core_free() -> None:
    (p,) = plan("auto", [], [0, 1])
    assert (p.device, p.cpus, p.reserved_cpus, p.label) == ("cpu", (0,), (1,), "cpu:0")


# The sysfs reader: what vLLM's auto binding reads with lscpu and sched_getaffinity.


def test_one_node_of_two_cores(tmp_path: Path) -> None:
    root = fake_sysfs(tmp_path, {0: "0-1"}, {0: "0", 1: "1"})
    topology = read_cpu_topology(root, allowed={0, 1}, arch="x86_64")
    assert topology == CpuTopology((CpuNode(0, ((0,), (1,))),), "x86_64")


def test_two_nodes_with_smt_siblings(tmp_path: Path) -> None:
    # 2 sockets x 2 cores x 2 threads, numbered as Linux does: siblings are n and n+4.
    siblings = {c: f"{c % 4},{c % 4 + 4}" for c in range(8)}
    root = fake_sysfs(tmp_path, {0: "0-1,4-5", 1: "2-3,6-7"}, siblings)
    topology = read_cpu_topology(root, allowed=range(8), arch="x86_64")
    assert topology.nodes == (
        CpuNode(0, ((0, 4), (1, 5))),
        CpuNode(1, ((2, 6), (3, 7))),
    )


def test_without_node_dirs_every_usable_cpu_is_one_node(tmp_path: Path) -> None:
    root = fake_sysfs(tmp_path, None, {0: "0-1", 1: "0-1", 2: "2-3", 3: "2-3"})
    topology = read_cpu_topology(root, allowed={0, 1, 2, 3}, arch="x86_64")
    assert topology.nodes == (CpuNode(0, ((0, 1), (2, 3))),)
    # Nor any topology dir: each CPU is its own core.
    bare = read_cpu_topology(tmp_path / "none", allowed={3, 1}, arch="x86_64")
    assert bare.nodes == (CpuNode(0, ((1,), (3,))),)


def test_affinity_subset_leaves_out_other_cpus_and_empty_nodes(tmp_path: Path) -> None:
    siblings = {c: f"{c % 4},{c % 4 + 4}" for c in range(8)}
    root = fake_sysfs(tmp_path, {0: "0-1,4-5", 1: "2-3,6-7", 2: ""}, siblings)
    topology = read_cpu_topology(root, allowed={1, 2, 3, 5}, arch="x86_64")
    assert topology.nodes == (CpuNode(0, ((1, 5),)), CpuNode(1, ((2,), (3,))))


def test_this_machines_topology_covers_its_usable_cpus() -> None:
    topology = read_cpu_topology()
    found = sorted(c for node in topology.nodes for core in node.cores for c in core)
    assert found == sorted(os.sched_getaffinity(0))


# The planner: by default, one replica per node, bound as vLLM's auto binding binds one engine.


def test_default_is_one_replica_per_node_one_thread_per_core_last_core_reserved() -> None:
    topology = CpuTopology(
        (CpuNode(0, ((0, 4), (1, 5))), CpuNode(1, ((2, 6), (3, 7)))), arch="x86_64"
    )
    placements = plan("cpu", [], list(range(8)), topology=topology)
    # vLLM on x86 takes each core's last sibling, then reserves the highest of them.
    assert [(p.replica, p.cpus, p.reserved_cpus) for p in placements] == [
        (0, (4,), (5,)),
        (1, (6,), (7,)),
    ]
    assert [cpu_bind(p) for p in placements] == ["4", "6"]


def test_vgates_own_processes_go_to_the_cores_every_engine_keeps_free() -> None:
    topology = CpuTopology(
        (CpuNode(0, ((0, 4), (1, 5))), CpuNode(1, ((2, 6), (3, 7)))), arch="x86_64"
    )
    assert front_cpus(plan("cpu", [], list(range(8)), topology=topology)) == (5, 7)
    # Slices of every core (--replicas, or a node of one core): nothing kept free, no pinning.
    assert front_cpus(plan("cpu", [], list(range(8)), replicas=2, topology=topology)) == ()


def test_pin_moves_this_process_and_nothing_is_a_no_op() -> None:
    before = os.sched_getaffinity(0)
    try:
        pin(None)
        pin("")
        assert os.sched_getaffinity(0) == before
        one = min(before)
        pin(str(one))
        assert os.sched_getaffinity(0) == {one}
    finally:
        os.sched_setaffinity(0, before)


def test_default_on_arm_binds_every_logical_cpu() -> None:
    topology = CpuTopology((CpuNode(0, ((0,), (1,), (2,), (3,))),), arch="aarch64")
    (p,) = plan("cpu", [], [0, 1, 2, 3], topology=topology)
    assert (p.cpus, p.reserved_cpus) == ((0, 1, 2), (3,))


def test_a_node_of_one_physical_core_reserves_nothing() -> None:
    topology = CpuTopology((CpuNode(0, ((0, 1),)),), arch="x86_64")
    (p,) = plan("auto", [], [0, 1], topology=topology)
    assert (p.cpus, p.reserved_cpus) == ((1,), ())


def test_explicit_replicas_keep_slices_of_every_core() -> None:
    topology = CpuTopology((CpuNode(0, ((0,), (1,))),), arch="x86_64")
    (one,) = plan("cpu", [], [0, 1], replicas=1, topology=topology)
    assert (one.cpus, one.reserved_cpus, one.label) == ((0, 1), (), "cpu:0-1")
    two = plan("cpu", [], [0, 1], replicas=2, topology=topology)
    assert [p.cpus for p in two] == [(0,), (1,)]


def test_gpu_placement_ignores_the_cpu_topology() -> None:
    topology = CpuTopology((CpuNode(0, ((0,), (1,))),))
    assert [p.gpus for p in plan("auto", [0, 1], [0, 1], topology=topology)] == [(0,), (1,)]


@pytest.mark.parametrize(
    ("out", "facts"),
    [
        ("NVIDIA H100 80GB HBM3, 81559\n", GpuFacts(81559 << 20, "NVIDIA H100 80GB HBM3")),
        (
            "NVIDIA A100-SXM4-80GB, 81920\nNVIDIA A100-SXM4-80GB, 81920\n",
            GpuFacts(81920 << 20, "NVIDIA A100-SXM4-80GB"),
        ),
        ("", None),
        ("No devices were found", None),
        ("Tesla T4, [N/A]", None),
    ],
)
def test_nvidia_smi_facts(out: str, facts: GpuFacts | None) -> None:
    assert parse_gpu_facts(out) == facts


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


@pytest.mark.parametrize("arch", ["x86_64", "aarch64"])
@pytest.mark.parametrize(
    "topology_nodes",
    [
        (CpuNode(0, ((0,), (1,))),),
        (CpuNode(0, ((0, 4), (1, 5))), CpuNode(1, ((2, 6), (3, 7)))),
        (CpuNode(0, ((0, 2),)), CpuNode(1, ((1, 3), (5, 7), (9, 11)))),
        (CpuNode(0, ((3,),)),),
    ],
)
def test_default_binding_is_vllms_own_for_one_engine_per_node(
    monkeypatch: pytest.MonkeyPatch, arch: str, topology_nodes: tuple[CpuNode, ...]
) -> None:
    # A drift check: vLLM's auto binding (VLLM_CPU_OMP_THREADS_BIND=auto) for one engine
    # whose memory node is each node in turn, on the same topology.
    from vllm.platforms import CpuArchEnum
    from vllm.utils import ompmultiprocessing
    from vllm.utils.cpu_resource_utils import LogicalCPUInfo

    cpus = [
        LogicalCPUInfo(id=cpu, physical_core=core[0], numa_node=node.node)
        for node in topology_nodes
        for core in node.cores
        for cpu in core
    ]
    vllm_arch = CpuArchEnum.X86 if arch == "x86_64" else CpuArchEnum.ARM
    platform = ompmultiprocessing.current_platform
    monkeypatch.setattr(platform, "get_cpu_architecture", lambda: vllm_arch)
    monkeypatch.setattr(ompmultiprocessing.cr_utils, "get_allowed_cpu_list", lambda: cpus)
    mine = plan("cpu", [], [c.id for c in cpus], topology=CpuTopology(topology_nodes, arch))
    manager = ompmultiprocessing.OMPProcessManager
    pick = (lambda c: c[-1:]) if arch == "x86_64" else (lambda c: c)
    for node, placement in zip(topology_nodes, mine, strict=True):
        monkeypatch.setattr(
            ompmultiprocessing.cr_utils, "get_visible_memory_node", lambda n=node.node: [n]
        )
        engine = SimpleNamespace(local_world_size=1, simulate_multi_node=False, reserve_cpu_num=1)
        (omp,), reserved = manager._get_autobind_cpu_ids(engine, pick)
        assert placement.cpus == tuple(c.id for c in omp)
        assert placement.reserved_cpus == tuple(c.id for c in reserved)


def fake_nvidia_smi(bin_dir: Path, script: str) -> None:
    bin_dir.mkdir()
    tool = bin_dir / "nvidia-smi"
    tool.write_text("#!/bin/sh\n" + script + "\n")
    tool.chmod(0o755)


def test_gpu_facts_asks_nvidia_smi_for_the_gpu(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    fake_nvidia_smi(tmp_path / "bin", 'echo "$*" > "$0.args"; echo "NVIDIA H200, 143771"')
    monkeypatch.setenv("PATH", str(tmp_path / "bin"))
    assert gpu_facts(3) == GpuFacts(143771 << 20, "NVIDIA H200")
    args = (tmp_path / "bin/nvidia-smi.args").read_text().split()
    assert args[:2] == ["-i", "3"] and "--query-gpu=name,memory.total" in args


@pytest.mark.parametrize("script", ["exit 9", "exec /bin/sleep 5", "echo garbage"])
def test_gpu_facts_are_none_when_nvidia_smi_cannot_say(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, script: str
) -> None:
    monkeypatch.setenv("PATH", str(tmp_path / "none"))
    assert gpu_facts(0) is None  # not installed
    fake_nvidia_smi(tmp_path / "bin", script)
    monkeypatch.setenv("PATH", str(tmp_path / "bin"))
    assert gpu_facts(0, timeout_s=0.5) is None
