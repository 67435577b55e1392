"""make bench: vgate's same-run comparisons, each suite's table, one JSON record.

Suites: download (parallel model download against one file at a time),
front-metrics (what nginx's request counting costs), stream and predict (below),
vs-vllm (benchmarks.serving: plain vLLM against vgate, vLLM's own benchmark
client) and multiturn (benchmarks.multiturn: prefix-cache hit rate and TTFT by
routing policy on 2 replicas).

Front door (nginx) against direct vLLM, same engine, same run, rounds interleaved.

One stack with one engine replica; for each concurrency level, rounds of
streaming completions alternate between the engine's own port and the front
door, so drift on a shared 2-core machine hits both paths alike. Reported per
(path, concurrency): requests/s, streamed tokens/s, TTFT p50/p99, and CPU
seconds per 1,000 streamed tokens of each process role; plus the front/direct
ratio of tokens/s.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import shutil
import signal
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path

import uvloop

from benchmarks import (
    download,
    front_metrics,
    loadgen,
    multiturn,
    predict,
    procs,
    routing_cost,
    serving,
)
from benchmarks.stack import Stack, running_stack
from benchmarks.stats import percentile, ratio

PATHS = ("direct", "front")
SUITES = (
    "download",
    "front-metrics",
    "routing-cost",
    "stream",
    "predict",
    "vs-vllm",
    "multiturn",
)
TABLE_ROLES = {
    "nginx": "nginx",
    "gateway": "gateway",
    "monitor": "monitor",
    "supervisord": "supvsrd",
    "api server": "api srv",
    "engine core+workers": "core+wk",
    "loadgen": "loadgen",
    "outside": "outside",
}


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.run", description=__doc__)
    ap.add_argument("--concurrency", default="1,8,32", help="comma-separated levels")
    ap.add_argument(
        "--requests",
        type=int,
        default=64,
        help="requests per round and path (at least 4 x concurrency are sent)",
    )
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--rounds", type=int, default=2, help="measured rounds per path and level")
    ap.add_argument("--max-model-len", type=int, default=1024)
    ap.add_argument(
        "--instances", default="1,8,32", help="predict: comma-separated instances per request"
    )
    ap.add_argument("--batches", type=int, default=6, help="predict: requests per round and way")
    ap.add_argument(
        "--suites",
        default=",".join(SUITES),
        help="comma-separated: " + ", ".join(SUITES),
    )
    ap.add_argument(
        "--vs-prompts", type=int, default=400, help="vs-vllm: prompts per round and server"
    )
    ap.add_argument("--vs-rounds", type=int, default=3, help="vs-vllm: rounds per server")
    ap.add_argument(
        "--best-args",
        default=serving.DEFAULT_BEST_ARGS,
        help="vs-vllm: vgate serve flags of 'vgate best'",
    )
    ap.add_argument(
        "--conversations", type=int, default=multiturn.Shape().conversations, help="multiturn"
    )
    ap.add_argument("--turns", type=int, default=multiturn.Shape().turns, help="multiturn")
    ap.add_argument("--multiturn-rounds", type=int, default=2, help="multiturn: rounds")
    ap.add_argument("--session-header", action="store_true", help="multiturn: send X-Session-Id")
    ap.add_argument("--png-dir", type=Path, default=Path("docs"), help="where the suites' plots go")
    ap.add_argument("--out", type=Path, default=Path("benchmarks/results/latest.json"))
    ap.add_argument("--keep-run-dir", action="store_true", help="keep the stack's run dir and log")
    return ap.parse_args(argv)


def summarize(rounds: list[dict]) -> dict:
    """Pool the rounds of one (path, concurrency): rates over summed wall time, CPU summed."""
    wall = sum(r["wall_s"] for r in rounds)
    ok = sum(r["ok"] for r in rounds)
    tokens = sum(r["tokens"] for r in rounds)
    ttfts = [t for r in rounds for t in r["ttft_s"]]
    cpu: dict[str, float] = defaultdict(float)
    for r in rounds:
        for role, s in r["cpu_s"].items():
            cpu[role] += s
    p50, p99 = percentile(ttfts, 0.5), percentile(ttfts, 0.99)
    return {
        "rounds": len(rounds),
        "requests_ok": ok,
        "errors": sum(r["errors"] for r in rounds),
        "tokens": tokens,
        "text_events": sum(r["text_events"] for r in rounds),
        "wall_s": wall,
        "requests_per_s": ok / wall,
        "tokens_per_s": tokens / wall,
        "tokens_per_s_by_round": [r["tokens"] / r["wall_s"] for r in rounds],
        "ttft_p50_ms": None if p50 is None else p50 * 1000,
        "ttft_p99_ms": None if p99 is None else p99 * 1000,
        "cpu_s": dict(cpu),
        "cpu_s_per_1k_tokens": {k: v / (tokens / 1000) if tokens else None for k, v in cpu.items()},
    }


async def measured_round(
    stack: Stack, url: str, concurrency: int, requests: int, max_tokens: int, first_id: int
) -> dict:
    before = procs.snapshot(stack.proc.pid)
    res = await loadgen.run_round(url, concurrency, requests, max_tokens, first_id)
    after = procs.snapshot(stack.proc.pid)
    errors = [r.error for r in res.results if not r.ok]
    return {
        "wall_s": res.wall_s,
        "ok": res.ok,
        "errors": len(errors),
        "error_samples": sorted(set(errors))[:5],
        "tokens": res.tokens,
        "text_events": sum(r.text_events for r in res.results if r.ok),
        "ttft_s": [r.ttft_s for r in res.results if r.ok and r.ttft_s is not None],
        "cpu_s": procs.cpu_by_role(before, after),
    }


async def bench(stack: Stack, args: argparse.Namespace, levels: list[int]) -> dict:
    engine = stack.engines()[0]
    urls = {
        "direct": f"{engine.url}/v1/completions",
        "front": f"{stack.base}/v1/completions",
    }
    results: dict[str, dict[str, dict]] = {}
    next_id = 0
    for c in levels:
        n = max(args.requests, 4 * c)
        for path in PATHS:  # warm-up, not measured: connections, first-batch shapes
            await loadgen.run_round(urls[path], c, c, args.max_tokens, next_id)
            next_id += c
        rounds: dict[str, list[dict]] = {p: [] for p in PATHS}
        for i in range(args.rounds):
            order = PATHS if i % 2 == 0 else PATHS[::-1]  # ABBA: no path always goes first
            for path in order:
                r = await measured_round(stack, urls[path], c, n, args.max_tokens, next_id)
                next_id += n
                rounds[path].append(r)
                print(
                    f"  c={c:<3} round {i + 1} {path:<6} {r['tokens'] / r['wall_s']:8.0f} tok/s "
                    f"{r['wall_s']:6.1f} s  errors {r['errors']}",
                    flush=True,
                )
        per_path = {p: summarize(rounds[p]) | {"requests_per_round": n} for p in PATHS}
        for p in PATHS:
            per_path[p]["round_detail"] = [
                {k: v for k, v in r.items() if k != "ttft_s"}
                | {"ttft_ms": [round(t * 1000, 1) for t in r["ttft_s"]]}
                for r in rounds[p]
            ]
        speed = {p: per_path[p]["tokens_per_s"] for p in PATHS}
        per_path["front_over_direct_tokens_per_s"] = ratio(speed["front"], speed["direct"])
        results[str(c)] = per_path
    return results


def fmt(v: float | None, spec: str) -> str:
    return "-" if v is None else format(v, spec)


def table(results: dict[str, dict[str, dict]]) -> str:
    roles = list(TABLE_ROLES.values())
    head = (
        f"{'path':<7}{'conc':>5}{'ok':>5}{'err':>4}{'req/s':>7}{'tok/s':>7}"
        f"{'ttft50':>8}{'ttft99':>8} |" + "".join(f"{r:>8}" for r in roles)
    )
    lines = [
        "ok/err: requests over all rounds; TTFT in ms; then CPU seconds per 1,000 streamed tokens",
        head,
        "-" * len(head),
    ]
    for c, per_path in results.items():
        for p in PATHS:
            s = per_path[p]
            cpu = s["cpu_s_per_1k_tokens"]
            lines.append(
                f"{p:<7}{c:>5}{s['requests_ok']:>5}{s['errors']:>4}"
                f"{s['requests_per_s']:>7.1f}{s['tokens_per_s']:>7.0f}"
                f"{fmt(s['ttft_p50_ms'], '8.1f')}{fmt(s['ttft_p99_ms'], '8.1f')} |"
                + "".join(fmt(cpu.get(role), "8.3f") for role in TABLE_ROLES)
            )
    lines.append("")
    lines.append("front/direct tokens/s (pooled; per round in brackets)")
    for c, per_path in results.items():
        by_round = [
            ratio(f, d)
            for f, d in zip(
                per_path["front"]["tokens_per_s_by_round"],
                per_path["direct"]["tokens_per_s_by_round"],
                strict=True,
            )
        ]
        rounds = ", ".join(fmt(x, ".2f") for x in by_round)
        pooled = fmt(per_path["front_over_direct_tokens_per_s"], ".2f")
        lines.append(f"  concurrency {c:>3}: {pooled}x [{rounds}]")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    levels = [int(x) for x in args.concurrency.split(",") if x.strip()]
    cores = len(os.sched_getaffinity(0))
    header = (
        "vgate benchmark: front door (nginx -> engine) vs direct (engine port), one engine,\n"
        f"demo model, streaming /v1/completions, max_tokens={args.max_tokens}, ignore_eos, "
        f"{args.rounds} interleaved rounds per path, >= {args.requests} requests per round.\n"
        f"Tokens = usage.completion_tokens; TTFT = first data event with text (ms).\n"
        f"The load generator runs on the same {cores} core(s) as the stack: every process, "
        f"itself included, competes for them;\nread ratios and CPU per token, not absolute speed."
    )
    print(header, flush=True)
    suites = {x.strip() for x in args.suites.split(",") if x.strip()}
    if unknown := suites - set(SUITES):
        raise SystemExit(f"unknown suites: {', '.join(sorted(unknown))}")
    # SIGTERM as Ctrl-C: every stack and server started is stopped on the way out.
    signal.signal(signal.SIGTERM, signal.default_int_handler)
    t0 = time.monotonic()
    download_results = download.bench() if "download" in suites else {}
    front_metrics_results = front_metrics.bench() if "front-metrics" in suites else {}
    routing_cost_results = routing_cost.bench() if "routing-cost" in suites else {}
    results: dict = {}
    predict_results: dict = {}
    processes: list = []
    startup_s = 0.0
    if suites & {"stream", "predict"}:
        run_dir = Path(tempfile.mkdtemp(prefix="vgate-bench-"))
        t1 = time.monotonic()
        ok = False
        try:
            with running_stack(run_dir, args.max_model_len) as stack:
                startup_s = time.monotonic() - t1
                print(f"stack ready in {startup_s:.0f} s (run dir {run_dir})", flush=True)
                processes = procs.describe(procs.snapshot(stack.proc.pid))
                if "stream" in suites:
                    results = uvloop.run(bench(stack, args, levels))
                ks = [int(x) for x in args.instances.split(",") if x.strip()]
                if "predict" in suites:
                    predict_results = uvloop.run(
                        predict.bench(stack, ks, args.batches, args.rounds, args.max_tokens)
                    )
            ok = True
        finally:
            if not ok or args.keep_run_dir:
                print(f"stack log kept in {run_dir / 'stack.log'}", file=sys.stderr)
            else:
                shutil.rmtree(run_dir, ignore_errors=True)
    vs_vllm_results: dict = {}
    if "vs-vllm" in suites:
        print("vs-vllm: plain vLLM against vgate, vllm bench serve", flush=True)
        work = serving.Workload(num_prompts=args.vs_prompts)
        vs_vllm_results = serving.bench(work, args.vs_rounds, shlex.split(args.best_args))
        serving.plot(vs_vllm_results, args.png_dir / "bench-vs-vllm.png")
    multiturn_results: dict = {}
    if "multiturn" in suites:
        print("multiturn: prefix-cache hit rate and TTFT by routing, 2 replicas", flush=True)
        shape = multiturn.Shape(conversations=args.conversations, turns=args.turns)
        multiturn_results = multiturn.bench(
            shape,
            args.multiturn_rounds,
            session_header=args.session_header,
            machine=serving.machine,
        )
        multiturn.plot(multiturn_results, args.png_dir / "bench-multiturn.png")
    wall_s = time.monotonic() - t0
    if download_results:
        print()
        print(download.table(download_results))
    if front_metrics_results:
        print()
        print(front_metrics.table(front_metrics_results))
    if routing_cost_results:
        print()
        print(routing_cost.table(routing_cost_results))
    if results:
        print()
        print(table(results))
    if predict_results:
        print()
        print(predict.table(predict_results))
    if vs_vllm_results:
        print()
        print(serving.table(vs_vllm_results))
    if multiturn_results:
        print()
        print(multiturn.table(multiturn_results))
    print(f"\nwall time {wall_s:.0f} s (stack startup {startup_s:.0f} s)")
    record = {
        "header": header,
        "args": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
        "machine": {"cores": cores, "python": platform.python_version()},
        "startup_s": startup_s,
        "wall_s": wall_s,
        "processes": processes,
        "results": results,
        "predict_results": predict_results,
        "download_results": download_results,
        "front_metrics_results": front_metrics_results,
        "routing_cost_results": routing_cost_results,
        "vs_vllm_results": vs_vllm_results,
        "multiturn_results": multiturn_results,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(record, indent=1))
    print(f"written to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
