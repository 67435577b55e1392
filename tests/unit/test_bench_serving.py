"""make bench's vs-vllm suite: the client's command line, its results parsed, pooled, compared."""

from __future__ import annotations

import json
from pathlib import Path

from benchmarks import serving
from benchmarks.serving import PLAIN, VGATE_BEST, VGATE_DEFAULT, Workload

# What `vllm bench serve --save-result` writes (vLLM 0.32), trimmed.
RAW = {
    "duration": 20.0,
    "completed": 400,
    "failed": 0,
    "total_output_tokens": 51200,
    "request_throughput": 20.0,
    "output_throughput": 2560.0,
    "median_ttft_ms": 150.0,
    "p99_ttft_ms": 400.0,
    "median_itl_ms": 10.0,
    "p99_itl_ms": 90.0,
    "median_tpot_ms": 11.0,
    "p50_ttft_ms": 150.0,
}


def test_bench_argv_names_the_workload_and_where_to_write():
    work = Workload(input_len=64, output_len=128, num_prompts=400, concurrency=32, seed=7)
    argv = serving.bench_argv(
        "http://127.0.0.1:9", "m", "/models/m", work, Path("/r"), "x.json", python="py"
    )
    assert argv[:3] == ["py", "-m", "benchmarks.vllm_bench"]

    def value(flag: str) -> str:
        return argv[argv.index(flag) + 1]

    assert value("--backend") == "openai"
    assert value("--endpoint") == "/v1/completions"
    assert value("--base-url") == "http://127.0.0.1:9"
    assert value("--tokenizer") == "/models/m"
    assert value("--dataset-name") == "random"
    assert value("--random-input-len") == "64"
    assert value("--random-output-len") == "128"
    assert value("--num-prompts") == "400"
    assert value("--max-concurrency") == "32"
    assert value("--seed") == "7"
    assert (value("--result-dir"), value("--result-filename")) == ("/r", "x.json")
    assert "--ignore-eos" in argv and "--save-result" in argv


def test_the_client_module_builds_vllms_own_parser():
    """The flags bench_argv passes are the ones vLLM's `bench serve` parser takes."""
    from vllm.benchmarks.serve import add_cli_args
    from vllm.utils.argparse_utils import FlexibleArgumentParser

    parser = FlexibleArgumentParser()
    add_cli_args(parser)
    argv = serving.bench_argv("http://h:1", "m", "/t", Workload(), Path("/r"), "f.json")
    args = parser.parse_args(argv[3:])
    assert args.ignore_eos and args.save_result
    assert (args.random_input_len, args.random_output_len) == (64, 128)
    assert (args.num_prompts, args.max_concurrency) == (400, 32)


def test_parse_result_maps_vllms_keys():
    r = serving.parse_result(RAW)
    assert r["output_tokens_per_s"] == 2560.0
    assert (r["ttft_p50_ms"], r["ttft_p99_ms"]) == (150.0, 400.0)
    assert (r["itl_p50_ms"], r["itl_p99_ms"]) == (10.0, 90.0)
    assert (r["completed"], r["failed"]) == (400, 0)


def test_parse_result_of_a_real_file_shape(tmp_path: Path):
    path = tmp_path / "r.json"
    path.write_text(json.dumps(RAW | {"date": "x", "itls": [[1.0]]}))
    assert serving.parse_result(json.loads(path.read_text()))["requests_per_s"] == 20.0


def test_pool_takes_the_median_of_rounds_and_sums_failures():
    rounds = [
        serving.parse_result(RAW | {"output_throughput": t, "median_ttft_ms": f, "failed": 1})
        for t, f in ((100.0, 30.0), (300.0, 10.0), (200.0, 20.0))
    ]
    p = serving.pool(rounds)
    assert p["output_tokens_per_s"] == 200.0
    assert p["ttft_p50_ms"] == 20.0
    assert p["failed"] == 3 and p["rounds"] == 3
    assert p["output_tokens_per_s_by_round"] == [100.0, 300.0, 200.0]


def test_pool_of_an_even_number_of_rounds_interpolates():
    rounds = [serving.parse_result(RAW | {"output_throughput": t}) for t in (100.0, 200.0)]
    assert serving.pool(rounds)["output_tokens_per_s"] == 150.0


def test_ratios_are_to_plain_vllm():
    def s(tokens: float, ttft: float) -> dict:
        return serving.pool([serving.parse_result(RAW | {"output_throughput": tokens,
                                                          "median_ttft_ms": ttft})])  # fmt: skip

    pooled = {PLAIN: s(1000, 100), VGATE_DEFAULT: s(950, 110), VGATE_BEST: s(2000, 50)}
    r = serving.ratios(pooled)
    assert set(r) == {VGATE_DEFAULT, VGATE_BEST}
    assert r[VGATE_DEFAULT]["output_tokens_per_s"] == 0.95
    assert abs(r[VGATE_DEFAULT]["ttft_p50_ms"] - 1.1) < 1e-12
    assert r[VGATE_BEST]["output_tokens_per_s"] == 2.0
    assert r[VGATE_BEST]["ttft_p50_ms"] == 0.5


def test_ratio_of_a_missing_figure_is_none():
    pooled = {PLAIN: {"ttft_p50_ms": None, "output_tokens_per_s": 0.0}, VGATE_DEFAULT: {}}
    assert serving.ratios(pooled)[VGATE_DEFAULT] == dict.fromkeys(serving.RATIO_KEYS)


def test_goals_of_vgate_default():
    met = serving.goals({VGATE_DEFAULT: {"output_tokens_per_s": 0.96, "ttft_p50_ms": 1.05}})
    assert all(met.values()) and len(met) == 2
    missed = serving.goals({VGATE_DEFAULT: {"output_tokens_per_s": 0.9, "ttft_p50_ms": 1.2}})
    assert not any(missed.values())
    assert not any(serving.goals({}).values())


def test_table_and_plot(tmp_path: Path):
    pooled = {
        n: serving.pool([serving.parse_result(RAW | {"output_throughput": t})])
        for n, t in ((PLAIN, 1000.0), (VGATE_DEFAULT, 1200.0), (VGATE_BEST, 1300.0))
    }
    rs = serving.ratios(pooled)
    results = {
        "pooled": pooled,
        "ratios": rs,
        "goals": serving.goals(rs),
        "servers": {PLAIN: "", VGATE_DEFAULT: "", VGATE_BEST: "--replicas 2"},
        "workload": Workload().__dict__,
        "rounds": 1,
        "machine": "test",
    }
    text = serving.table(results)
    assert "1.20" in text and "1.30" in text and "met" in text
    png = tmp_path / "p.png"
    serving.plot(results, png)
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
