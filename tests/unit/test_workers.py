"""The vLLM command line and environment of each engine replica."""

from engine.placement import plan
from engine.workers import build_workers, flag_value, load_workers, max_num_seqs, save_workers


def test_cpu_workers_get_own_cores_port_and_bounded_kv_cache(tmp_path) -> None:
    workers = build_workers(
        plan("cpu", [], [0, 1]), [8001, 8002], "/py", "/m", "demo", 1, ["--max-model-len", "64"], {}
    )
    w0, w1 = workers
    assert w0.argv == [
        "/py",
        "-m",
        "vllm.entrypoints.openai.api_server",
        "--model",
        "/m",
        "--host",
        "127.0.0.1",
        "--port",
        "8001",
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
        1,
        [],
        {"VLLM_CPU_KVCACHE_SPACE": "4"},
    )
    assert w.env["VLLM_CPU_KVCACHE_SPACE"] == "4"
    assert "--served-model-name" not in w.argv


def test_gpu_workers_see_only_their_group() -> None:
    workers = build_workers(plan("cuda", [0, 1, 2, 3], [], 2), [1, 2], "/py", "m", None, 2, [], {})
    assert [w.env["CUDA_VISIBLE_DEVICES"] for w in workers] == ["0,1", "2,3"]
    assert workers[0].argv[-2:] == ["--tensor-parallel-size", "2"]
    assert workers[1].device == "cuda:2,3"


def test_flag_value_in_either_form() -> None:
    assert flag_value(["--max-num-seqs", "8"], "--max-num-seqs") == "8"
    assert flag_value(["--max-num-seqs=9", "--x"], "--max-num-seqs") == "9"
    assert flag_value(["--max-num-seqs-x", "1"], "--max-num-seqs") is None


def test_max_num_seqs_is_the_flag_or_vllms_default() -> None:
    assert max_num_seqs(["--max-num-seqs=12"], "cuda", 1) == 12
    assert max_num_seqs([], "cuda", 2) == 256
    assert max_num_seqs([], "cpu", 2) == 256  # 128 per CPU worker
    assert max_num_seqs(["--max-num-seqs", "junk"], "cpu", 1) == 128
