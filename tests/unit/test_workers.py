"""The vLLM command line and environment of each engine replica."""

from engine.placement import plan
from engine.workers import VLLM_SERVER_MODULE, build_workers, load_workers, save_workers


def test_cpu_workers_get_own_cores_port_and_bounded_kv_cache(tmp_path) -> None:
    workers = build_workers(
        plan("cpu", [], [0, 1], replicas=2),
        [8001, 8002],
        "/py",
        "/m",
        "demo",
        ["--max-model-len", "64"],
        {},
    )
    w0, w1 = workers
    assert w0.argv == [
        "/py",
        "-m",
        VLLM_SERVER_MODULE,
        "--model",
        "/m",
        "--host",
        "127.0.0.1",
        "--port",
        "8001",
        "--enable-scale-out",
        "--limit-mm-per-prompt",
        '{"image": 16, "audio": 16, "video": 1}',
        "--served-model-name",
        "demo",
        "--max-model-len",
        "64",
    ]
    assert w0.env["VLLM_CPU_OMP_THREADS_BIND"] == "0" and w1.env["VLLM_CPU_OMP_THREADS_BIND"] == "1"
    assert w0.env["VLLM_CPU_KVCACHE_SPACE"] == "1"
    assert w1.url == "http://127.0.0.1:8002"
    save_workers(workers, tmp_path / "engines.json")
    assert load_workers(tmp_path / "engines.json") == workers


def test_user_kv_cache_size_wins() -> None:
    (w,) = build_workers(
        plan("cpu", [], [0], replicas=1),
        [1],
        "/py",
        "m",
        None,
        [],
        {"VLLM_CPU_KVCACHE_SPACE": "4"},
    )
    assert w.env["VLLM_CPU_KVCACHE_SPACE"] == "4"
    assert "--served-model-name" not in w.argv


def test_gpu_workers_see_only_their_group() -> None:
    workers = build_workers(
        plan("cuda", [0, 1, 2, 3], [], 2), [1, 2], "/py", "m", None, ["-tp=2"], {}
    )
    assert [w.env["CUDA_VISIBLE_DEVICES"] for w in workers] == ["0,1", "2,3"]
    assert workers[0].argv[-1] == "-tp=2"  # the engine flags as given
    assert workers[1].device == "cuda:2,3"


def test_engines_fetch_media_through_vgates_guard_unless_the_operator_says_otherwise() -> None:
    (w,) = build_workers(plan("cpu", [], [0], replicas=1), [1], "/py", "m", None, [], {})
    assert w.env["VLLM_MEDIA_CONNECTOR"] == "vgate"
    assert w.env["VLLM_MEDIA_URL_ALLOW_REDIRECTS"] == "0"
    assert w.env["VLLM_MAX_MEDIA_DOWNLOAD_SIZE_MB"] == "20"
    assert w.env["VLLM_NO_USAGE_STATS"] == "1"
    mine = {"VLLM_MAX_MEDIA_DOWNLOAD_SIZE_MB": "64"}
    (w,) = build_workers(plan("cpu", [], [0], replicas=1), [1], "/py", "m", None, [], mine)
    assert w.env["VLLM_MAX_MEDIA_DOWNLOAD_SIZE_MB"] == "64"


def test_default_cpu_engine_binds_its_threads_off_the_reserved_core() -> None:
    (w,) = build_workers(plan("cpu", [], [0, 1]), [1], "/py", "m", None, [], {})
    assert (w.env["VLLM_CPU_OMP_THREADS_BIND"], w.device) == ("0", "cpu:0")


def test_the_operators_own_thread_binding_wins() -> None:
    mine = {"VLLM_CPU_OMP_THREADS_BIND": "auto"}
    workers = build_workers(plan("cpu", [], [0, 1], replicas=2), [1, 2], "/py", "m", None, [], mine)
    assert [w.env["VLLM_CPU_OMP_THREADS_BIND"] for w in workers] == ["auto", "auto"]
    assert [w.device for w in workers] == ["cpu:auto", "cpu:auto"]  # what /health shows
    (w,) = build_workers(plan("cpu", [], [0, 1]), [1], "/py", "m", None, [], {**mine, "x": "1"})
    assert w.env["VLLM_CPU_OMP_THREADS_BIND"] == "auto"
    (g,) = build_workers(plan("cuda", [0], []), [1], "/py", "m", None, [], mine)
    assert "VLLM_CPU_OMP_THREADS_BIND" not in g.env and g.device == "cuda:0"
