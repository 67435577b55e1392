"""Vertex predict with k instances against the same k prompts as k separate OpenAI calls.

Both through the front door of the same stack, rounds interleaved. One
"batch" is k prompts answered: one predict request (nginx -> gateway -> nginx
-> engine, k engine calls at once) or k concurrent /v1/completions calls
(nginx -> engine). Non-streaming, max_tokens each, ignore_eos.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field

import aiohttp
import orjson

from benchmarks import procs
from benchmarks.loadgen import prompt
from benchmarks.stack import Stack
from benchmarks.stats import percentile, ratio

WAYS = ("openai", "predict")
MIN_INSTANCES_PER_ROUND = 32


@dataclass
class BatchRound:
    wall_s: float = 0.0
    latencies_s: list[float] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)


async def _post(session: aiohttp.ClientSession, url: str, body: dict) -> dict:
    async with session.post(url, data=orjson.dumps(body)) as resp:
        answer = await resp.read()
        if resp.status != 200:
            raise RuntimeError(f"HTTP {resp.status}: {answer[:200]!r}")
        return orjson.loads(answer)


async def predict_batch(
    session: aiohttp.ClientSession, base: str, ids: range, max_tokens: int
) -> None:
    instances = [{"prompt": prompt(i), "max_tokens": max_tokens, "ignore_eos": True} for i in ids]
    body = {"instances": instances, "parameters": {"raw_response": True}}
    answer = await _post(session, base + "/predict", body)
    if len(answer["predictions"]) != len(ids) and len(ids) > 1:
        raise RuntimeError(f"{len(answer['predictions'])} predictions for {len(ids)} instances")


async def openai_batch(
    session: aiohttp.ClientSession, base: str, ids: range, max_tokens: int
) -> None:
    bodies = [
        {"model": "", "prompt": prompt(i), "max_tokens": max_tokens, "ignore_eos": True}
        for i in ids
    ]
    await asyncio.gather(*(_post(session, base + "/v1/completions", b) for b in bodies))


async def run_round(
    way: str, base: str, k: int, batches: int, max_tokens: int, first_id: int
) -> BatchRound:
    """`batches` batches of k prompts, one after the other, on a fresh session."""
    batch = predict_batch if way == "predict" else openai_batch
    out = BatchRound()
    timeout = aiohttp.ClientTimeout(total=300)
    headers = {"Content-Type": "application/json"}
    async with aiohttp.ClientSession(timeout=timeout, headers=headers) as session:
        start = time.perf_counter()
        for b in range(batches):
            ids = range(first_id + b * k, first_id + (b + 1) * k)
            t = time.perf_counter()
            try:
                await batch(session, base, ids, max_tokens)
                out.latencies_s.append(time.perf_counter() - t)
            except (aiohttp.ClientError, RuntimeError, TimeoutError) as e:
                out.errors.append(f"{type(e).__name__}: {e}")
        out.wall_s = time.perf_counter() - start
    return out


async def bench(
    stack: Stack, levels: list[int], batches: int, rounds: int, max_tokens: int
) -> dict:
    """For each k: interleaved rounds of both ways; instances/s, batch latency, CPU."""
    results: dict[str, dict] = {}
    next_id = 10**6  # apart from the streaming benchmark's prompts
    for k in levels:
        for way in WAYS:  # warm-up, not measured
            await run_round(way, stack.base, k, 1, max_tokens, next_id)
            next_id += k
        per_way: dict[str, list[tuple[BatchRound, dict]]] = {w: [] for w in WAYS}
        count = max(batches, MIN_INSTANCES_PER_ROUND // k)  # enough work to measure CPU
        for i in range(rounds):
            for way in WAYS if i % 2 == 0 else WAYS[::-1]:
                before = procs.snapshot(stack.proc.pid)
                r = await run_round(way, stack.base, k, count, max_tokens, next_id)
                cpu = procs.cpu_by_role(before, procs.snapshot(stack.proc.pid))
                next_id += k * count
                per_way[way].append((r, cpu))
                print(
                    f"  k={k:<3} round {i + 1} {way:<7} {k * len(r.latencies_s) / r.wall_s:7.1f} "
                    f"instances/s  errors {len(r.errors)}",
                    flush=True,
                )
        summary: dict[str, dict] = {}
        for way, got in per_way.items():
            wall = sum(r.wall_s for r, _ in got)
            done = k * sum(len(r.latencies_s) for r, _ in got)
            latencies = [t for r, _ in got for t in r.latencies_s]
            cpu: dict[str, float] = {}
            for _, c in got:
                for role, s in c.items():
                    cpu[role] = cpu.get(role, 0.0) + s
            summary[way] = {
                "instances": done,
                "errors": sum(len(r.errors) for r, _ in got),
                "error_samples": sorted({e for r, _ in got for e in r.errors})[:5],
                "instances_per_s": done / wall,
                "instances_per_s_by_round": [k * len(r.latencies_s) / r.wall_s for r, _ in got],
                "latency_p50_ms": (percentile(latencies, 0.5) or 0) * 1000,
                "latency_p99_ms": (percentile(latencies, 0.99) or 0) * 1000,
                "cpu_s_per_1k_instances": {r: s / done * 1000 for r, s in cpu.items()},
            }
        summary["predict_over_openai_instances_per_s"] = ratio(
            summary["predict"]["instances_per_s"], summary["openai"]["instances_per_s"]
        )
        results[str(k)] = summary
    return results


def table(results: dict[str, dict]) -> str:
    roles = ("nginx", "gateway", "api server")
    head = (
        f"{'way':<8}{'k':>4}{'inst':>6}{'err':>4}{'inst/s':>8}{'lat50':>8}{'lat99':>8} |"
        + "".join(f"{r:>11}" for r in roles)
    )
    lines = [
        "k prompts as one predict request or as k concurrent OpenAI calls; latency of a batch "
        "in ms; CPU seconds per 1,000 instances",
        head,
        "-" * len(head),
    ]
    for k, per in results.items():
        for way in WAYS:
            s = per[way]
            cpu = s["cpu_s_per_1k_instances"]
            lines.append(
                f"{way:<8}{k:>4}{s['instances']:>6}{s['errors']:>4}{s['instances_per_s']:>8.1f}"
                f"{s['latency_p50_ms']:>8.0f}{s['latency_p99_ms']:>8.0f} |"
                + "".join(f"{cpu.get(r, 0.0):>11.3f}" for r in roles)
            )
    lines.append("")
    lines.append("predict/openai instances/s (pooled; per round in brackets)")
    for k, per in results.items():
        rounds = ", ".join(
            f"{p / o:.2f}"
            for p, o in zip(
                per["predict"]["instances_per_s_by_round"],
                per["openai"]["instances_per_s_by_round"],
                strict=True,
            )
        )
        lines.append(f"  k={k:>3}: {per['predict_over_openai_instances_per_s']:.2f}x [{rounds}]")
    return "\n".join(lines)
