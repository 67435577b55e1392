"""Multi-turn conversations on 2 replicas: prefix-cache hit rate and TTFT by routing policy.

The workload: N conversations of T turns each, all opening with one shared system
prompt; each turn adds a user message to the history, and the assistant's reply
(what the engine streamed) is appended before the next. K conversations are in
flight at a time; a conversation's turns go one after the other. Requests are
streaming chat completions through the front door.

Configurations, same run, rounds interleaved:
  one engine   1 replica: every turn finds its history cached (the ideal hit rate)
  least_conn   2 replicas, nginx's least_conn (vgate before prefix routing)
  prefix       2 replicas, vgate's prefix-aware routing (`--routing prefix`)
Measured per configuration: TTFT p50/p99 (first streamed content), output tokens/s,
the engines' prefix-cache hit rate (vllm:prefix_cache_hits_total over
vllm:prefix_cache_queries_total, summed over engines, deltas over the round, read
from each engine's own /metrics), and requests per engine
(vllm:request_success_total deltas). A second workload with no shared prefix
(distinct one-turn prompts) compares least_conn and prefix throughput: prefix
routing must keep the load balanced.

vLLM's prefix cache counts whole KV blocks only (128 tokens on the CPU, 16 on a
GPU by default): the system prompt and each user turn are several blocks long.
Sizes are in words of the demo model's corpus, about 1.9 tokens each with its
tokenizer; the prompt tokens the engines counted are reported.
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import json
import random
import re
import shutil
import signal
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import aiohttp
import orjson

from benchmarks.loadgen import sse_chunks
from benchmarks.plots import Panel, grouped_bars
from benchmarks.stack import ServerStart, Stack, running_stack, servers_for_rounds
from benchmarks.stats import percentile, ratio
from engine.demo_model import _CORPUS

ONE = "one engine"
LEAST_CONN = "least_conn"
PREFIX = "prefix"
# Goals: hit rate at least 90% of one engine's; TTFT p50 below least_conn's; on the
# workload with no shared prefix, throughput at least 0.97x least_conn's.
GOAL_HIT_OF_IDEAL = 0.9
GOAL_NO_PREFIX_TOKENS = 0.97
WORDS = tuple(sorted(set(re.findall(r"[a-z]+", _CORPUS.lower()))))
COUNTERS = {
    "vllm:prefix_cache_hits_total": "hits",
    "vllm:prefix_cache_queries_total": "queries",
    "vllm:request_success_total": "requests",
    "vllm:prompt_tokens_total": "prompt_tokens",
}


# ---- the workload (pure, deterministic from its seed) ----


@dataclass(frozen=True)
class Conversation:
    id: int
    system: str | None  # the shared system prompt, or none
    users: tuple[str, ...]  # one user message per turn


@dataclass(frozen=True)
class Shape:
    conversations: int = 32
    turns: int = 4
    system_words: int = 210  # ~400 tokens: 3 CPU KV blocks
    user_words: int = 170  # ~320 tokens: 2.5 CPU KV blocks
    reply_tokens: int = 32
    concurrency: int = 8


def words(rng: random.Random, n: int) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(n))


def make_conversations(shape: Shape, seed: int) -> list[Conversation]:
    """`shape.conversations` conversations sharing one system prompt; the same for a seed."""
    rng = random.Random(seed)
    system = f"System {seed}: " + words(rng, shape.system_words) if shape.system_words else None
    return [
        Conversation(
            id=c,
            system=system,
            users=tuple(
                f"Conversation {seed}-{c}, turn {t}: " + words(rng, shape.user_words)
                for t in range(shape.turns)
            ),
        )
        for c in range(shape.conversations)
    ]


def make_unshared(shape: Shape, seed: int) -> list[Conversation]:
    """One-turn conversations with nothing in common (no system prompt, distinct text)."""
    one_turn = Shape(
        conversations=shape.conversations * shape.turns,
        turns=1,
        system_words=0,
        user_words=shape.user_words,
    )
    return make_conversations(one_turn, seed)


def session_id(conv: Conversation) -> str:
    """The X-Session-Id of a conversation (with --session-header): distinct across seeds."""
    return "conv-" + hashlib.sha256(conv.users[0].encode()).hexdigest()[:16]


def messages(conv: Conversation, turn: int, replies: list[str]) -> list[dict[str, str]]:
    """The chat history sent at `turn`: system, then user/assistant pairs, then this turn's."""
    if len(replies) < turn:
        raise ValueError(f"turn {turn} needs {turn} replies, got {len(replies)}")
    out = [{"role": "system", "content": conv.system}] if conv.system else []
    for t in range(turn):
        out += [
            {"role": "user", "content": conv.users[t]},
            {"role": "assistant", "content": replies[t]},
        ]
    return [*out, {"role": "user", "content": conv.users[turn]}]


# ---- engine counters ----


_SAMPLE = re.compile(r"^([a-zA-Z_:][a-zA-Z0-9_:]*)(\{[^}]*\})?\s+(\S+)")


def scrape_counters(text: str, names: dict[str, str] = COUNTERS) -> dict[str, float]:
    """Prometheus text -> {our name: the sum over every label set} for the counters named."""
    out = dict.fromkeys(names.values(), 0.0)
    for line in text.splitlines():
        m = _SAMPLE.match(line)
        if m and m.group(1) in names:
            out[names[m.group(1)]] += float(m.group(3))
    return out


def counter_deltas(
    before: list[dict[str, float]], after: list[dict[str, float]]
) -> list[dict[str, float]]:
    return [{k: a[k] - b.get(k, 0.0) for k in a} for b, a in zip(before, after, strict=True)]


def hit_rate(deltas: list[dict[str, float]]) -> float | None:
    """Prefix-cache hits over queries (tokens), summed over the engines."""
    return ratio(sum(d["hits"] for d in deltas), sum(d["queries"] for d in deltas))


# ---- running it ----


@dataclass
class Turn:
    ok: bool
    ttft_s: float | None = None
    completion_tokens: int = 0
    prompt_tokens: int = 0
    error: str = ""


@dataclass
class WorkloadRun:
    wall_s: float = 0.0
    turns: list[Turn] = field(default_factory=list)


async def chat_turn(
    session: aiohttp.ClientSession,
    url: str,
    body: dict,
    headers: dict[str, str],
) -> tuple[Turn, str]:
    """One streamed chat completion: its timing and the reply's text."""
    start = time.perf_counter()
    ttft = None
    usage: dict = {}
    parts: list[str] = []
    done = False
    try:
        async with session.post(url, data=orjson.dumps(body), headers=headers) as resp:
            if resp.status != 200:
                text = (await resp.text())[:200]
                return Turn(False, error=f"HTTP {resp.status}: {text}"), ""
            async for chunk in sse_chunks(resp.content):
                if chunk is None:
                    done = True
                    break
                for choice in chunk.get("choices") or []:
                    if content := (choice.get("delta") or {}).get("content"):
                        parts.append(content)
                        if ttft is None:
                            ttft = time.perf_counter() - start
                usage = chunk.get("usage") or usage
    except (aiohttp.ClientError, TimeoutError, ValueError) as e:
        return Turn(False, ttft, error=f"{type(e).__name__}: {e}"), ""
    if not done or not usage:
        return Turn(False, ttft, error="stream ended without usage or [DONE]"), ""
    turn = Turn(True, ttft, usage.get("completion_tokens", 0), usage.get("prompt_tokens", 0))
    return turn, "".join(parts)


async def run_workload(
    base: str,
    model: str,
    convs: list[Conversation],
    concurrency: int,
    reply_tokens: int,
    session_header: bool = False,
) -> WorkloadRun:
    """Every conversation, `concurrency` at a time, each one's turns in order."""
    url = base + "/v1/chat/completions"
    queue = iter(convs)
    out = WorkloadRun()
    timeout = aiohttp.ClientTimeout(total=None, sock_connect=10, sock_read=300)
    connector = aiohttp.TCPConnector(limit=concurrency)
    async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session:

        async def client() -> None:
            while (conv := next(queue, None)) is not None:
                headers = {"Content-Type": "application/json"}
                if session_header:
                    headers["X-Session-Id"] = session_id(conv)
                replies: list[str] = []
                for t in range(len(conv.users)):
                    body = {
                        "model": model,
                        "messages": messages(conv, t, replies),
                        "max_tokens": reply_tokens,
                        "ignore_eos": True,
                        "stream": True,
                        "stream_options": {"include_usage": True},
                    }
                    turn, reply = await chat_turn(session, url, body, headers)
                    out.turns.append(turn)
                    if not turn.ok:
                        break  # the rest of this conversation would not be the same workload
                    replies.append(reply)

        start = time.perf_counter()
        await asyncio.gather(*(client() for _ in range(concurrency)))
        out.wall_s = time.perf_counter() - start
    return out


def engine_counters(stack: Stack) -> list[dict[str, float]]:
    """Each engine's counters, read from its own port (not the front door's merged scrape)."""
    import urllib.request

    out = []
    for engine in stack.engines():
        with urllib.request.urlopen(engine.url + "/metrics", timeout=10) as resp:
            out.append(scrape_counters(resp.read().decode()))
    return out


def measure(stack: Stack, convs: list[Conversation], shape: Shape, session_header: bool) -> dict:
    """One workload on one stack: client-side timings and the engines' counter deltas."""
    model = stack.model()
    before = engine_counters(stack)
    run = asyncio.run(
        run_workload(
            stack.base, model, convs, shape.concurrency, shape.reply_tokens, session_header
        )
    )
    deltas = counter_deltas(before, engine_counters(stack))
    ok = [t for t in run.turns if t.ok]
    errors = [t.error for t in run.turns if not t.ok]
    return {
        "wall_s": run.wall_s,
        "ok": len(ok),
        "errors": len(errors),
        "error_samples": sorted(set(errors))[:3],
        "completion_tokens": sum(t.completion_tokens for t in ok),
        "prompt_tokens": sum(t.prompt_tokens for t in ok),
        "ttft_s": [t.ttft_s for t in ok if t.ttft_s is not None],
        "engines": deltas,
    }


def summarize(rounds: list[dict]) -> dict:
    """Pool one (configuration, workload)'s rounds: TTFTs pooled, counters and time summed."""
    ttfts = [t for r in rounds for t in r["ttft_s"]]
    wall = sum(r["wall_s"] for r in rounds)
    tokens = sum(r["completion_tokens"] for r in rounds)
    engines = [d for r in rounds for d in r["engines"]]
    n_engines = len(rounds[0]["engines"]) if rounds else 0
    per_engine = [
        sum(r["engines"][i]["requests"] for r in rounds) for i in range(n_engines)
    ]  # same engines every round
    ok = sum(r["ok"] for r in rounds)
    p50, p99 = percentile(ttfts, 0.5), percentile(ttfts, 0.99)
    return {
        "rounds": len(rounds),
        "requests_ok": ok,
        "errors": sum(r["errors"] for r in rounds),
        "output_tokens_per_s": ratio(tokens, wall),
        "output_tokens_per_s_by_round": [
            ratio(r["completion_tokens"], r["wall_s"]) for r in rounds
        ],
        "ttft_p50_ms": None if p50 is None else p50 * 1000,
        "ttft_p99_ms": None if p99 is None else p99 * 1000,
        "hit_rate": hit_rate(engines),
        "hit_rate_by_round": [hit_rate(r["engines"]) for r in rounds],
        "requests_per_engine": per_engine,
        "prompt_tokens_per_request": ratio(sum(r["prompt_tokens"] for r in rounds), ok),
    }


def compare(results: dict[str, dict[str, dict]]) -> dict:
    """The goals' ratios: prefix against the one-engine ideal and against least_conn."""
    shared = results.get("shared", {})
    unshared = results.get("unshared", {})

    def get(workload: dict, name: str, key: str) -> float | None:
        return (workload.get(name) or {}).get(key)

    out = {
        "least_conn_hit_of_ideal": ratio_or_none(
            get(shared, LEAST_CONN, "hit_rate"), get(shared, ONE, "hit_rate")
        ),
        "prefix_hit_of_ideal": ratio_or_none(
            get(shared, PREFIX, "hit_rate"), get(shared, ONE, "hit_rate")
        ),
        "prefix_ttft_p50_over_least_conn": ratio_or_none(
            get(shared, PREFIX, "ttft_p50_ms"), get(shared, LEAST_CONN, "ttft_p50_ms")
        ),
        "prefix_tokens_over_least_conn_unshared": ratio_or_none(
            get(unshared, PREFIX, "output_tokens_per_s"),
            get(unshared, LEAST_CONN, "output_tokens_per_s"),
        ),
    }
    goals = {}
    if out["prefix_hit_of_ideal"] is not None:
        goals[f"hit rate >= {GOAL_HIT_OF_IDEAL}x one engine's"] = (
            out["prefix_hit_of_ideal"] >= GOAL_HIT_OF_IDEAL
        )
    if out["prefix_ttft_p50_over_least_conn"] is not None:
        goals["TTFT p50 < least_conn's"] = out["prefix_ttft_p50_over_least_conn"] < 1
    if out["prefix_tokens_over_least_conn_unshared"] is not None:
        goals[f"no shared prefix: tokens/s >= {GOAL_NO_PREFIX_TOKENS}x least_conn's"] = (
            out["prefix_tokens_over_least_conn_unshared"] >= GOAL_NO_PREFIX_TOKENS
        )
    out["goals"] = goals
    return out


def ratio_or_none(a: float | None, b: float | None) -> float | None:
    return None if a is None or b is None else ratio(a, b)


def _fmt(v: float | None, spec: str) -> str:
    """`v` formatted, or "-" as wide as the spec's width."""
    width = spec.split(".")[0].lstrip("<>^")
    return format("-", f">{width}") if v is None else format(v, spec)


def table(results: dict) -> str:
    head = (
        f"{'workload':<10}{'config':<12}{'ok':>5}{'err':>4}{'tok/s':>8}{'ttft50':>8}"
        f"{'ttft99':>8}{'hit':>7}{'prompt':>7}  requests per engine"
    )
    lines = [
        "multi-turn conversations (TTFT ms; hit = engines' prefix-cache hits / queries;"
        " prompt = mean prompt tokens)",
        head,
        "-" * len(head),
    ]
    for workload in ("shared", "unshared"):
        for name, s in results["results"].get(workload, {}).items():
            lines.append(
                f"{workload:<10}{name:<12}{s['requests_ok']:>5}{s['errors']:>4}"
                f"{_fmt(s['output_tokens_per_s'], '8.0f')}{_fmt(s['ttft_p50_ms'], '8.1f')}"
                f"{_fmt(s['ttft_p99_ms'], '8.1f')}{_fmt(s['hit_rate'], '7.1%')}"
                f"{_fmt(s['prompt_tokens_per_request'], '7.0f')}  "
                + ", ".join(str(int(n)) for n in s["requests_per_engine"])
            )
    c = results["compare"]
    lines += [
        "",
        "hit rate of the one-engine ideal: "
        f"least_conn {_fmt(c['least_conn_hit_of_ideal'], '.2f')}x,"
        f" prefix {_fmt(c['prefix_hit_of_ideal'], '.2f')}x",
        f"prefix TTFT p50 / least_conn's: {_fmt(c['prefix_ttft_p50_over_least_conn'], '.2f')}x;"
        " no shared prefix, prefix tokens/s / least_conn's: "
        f"{_fmt(c['prefix_tokens_over_least_conn_unshared'], '.2f')}x",
    ]
    if c["goals"]:
        lines.append(
            "goals: "
            + ", ".join(f"{k}: {'met' if v else 'NOT met'}" for k, v in c["goals"].items())
        )
    return "\n".join(lines)


def plot(results: dict, path: Path) -> None:
    """Hit rate, TTFT p50/p99 (shared prefix) and tokens/s (no shared prefix) per config."""
    shared = results["results"].get("shared", {})
    unshared = results["results"].get("unshared", {})

    def panel(title: str, data: dict, keys: list[tuple[str, str]], scale: float = 1) -> Panel:
        bars = {n: [(data[n][k] or 0) * scale for k, _ in keys] for n in data}
        return Panel(title, bars, [group for _, group in keys])

    s = results["shape"]
    grouped_bars(
        [
            panel("prefix-cache hit rate (%)", shared, [("hit_rate", "")], 100),
            panel("TTFT (ms)", shared, [("ttft_p50_ms", "p50"), ("ttft_p99_ms", "p99")]),
            panel("no shared prefix: output tokens/s", unshared, [("output_tokens_per_s", "")]),
        ],
        {ONE: "#9e9e9e", LEAST_CONN: "#1f77b4", PREFIX: "#2ca02c"},
        f"{s['conversations']} conversations x {s['turns']} turns, {s['concurrency']} in flight, "
        f"{s['reply_tokens']}-token replies; {results['rounds']} interleaved round(s); "
        f"{results['machine']}",
        path,
        legend_from=1,
    )


def configurations(max_model_len: int, extra: list[str]) -> dict[str, ServerStart]:
    """name -> how to start it: one engine (the ideal hit rate), then 2 by each routing."""

    def vgate(args: list[str]) -> ServerStart:
        return lambda run_dir: running_stack(run_dir, max_model_len, args + extra)

    return {
        ONE: vgate(["--replicas", "1"]),
        LEAST_CONN: vgate(["--replicas", "2", "--routing", "least-conn"]),
        PREFIX: vgate(["--replicas", "2", "--routing", "prefix"]),
    }


def bench(
    shape: Shape,
    rounds: int = 2,
    seed: int = 0,
    max_model_len: int = 2048,
    session_header: bool = False,
    extra_args: list[str] | None = None,
    one_at_a_time: bool = False,
    unshared: bool = True,
    machine: Callable[[], str] | None = None,
) -> dict:
    starts = configurations(max_model_len, extra_args or [])
    root = Path(tempfile.mkdtemp(prefix="vgate-bench-multiturn-"))
    raw: dict[str, dict[str, list[dict]]] = {"shared": {}, "unshared": {}}
    ok = False
    try:
        with servers_for_rounds(starts, root, together=not one_at_a_time) as use:
            for i in range(rounds):
                # A new seed each round: a fresh system prompt, so no round finds the
                # previous one's prefixes cached.
                convs = make_conversations(shape, seed + i)
                plain = make_unshared(shape, 1_000_000 + seed + i)
                for name in starts:
                    with use(name) as stack:
                        r = measure(stack, convs, shape, session_header)
                        raw["shared"].setdefault(name, []).append(r)
                        _progress(i, name, "shared", r)
                        if unshared and name != ONE:
                            u = measure(stack, plain, shape, session_header)
                            raw["unshared"].setdefault(name, []).append(u)
                            _progress(i, name, "unshared", u)
        ok = True
    finally:
        if ok:
            shutil.rmtree(root, ignore_errors=True)
        else:
            print(f"multiturn: logs kept in {root}", file=sys.stderr)
    results = {w: {n: summarize(rs) for n, rs in by.items()} for w, by in raw.items()}
    return {
        "shape": asdict(shape),
        "rounds": rounds,
        "seed": seed,
        "session_header": session_header,
        "machine": machine() if machine else "",
        "results": results,
        "compare": compare(results),
        "by_round": {
            w: {
                n: [{k: v for k, v in r.items() if k != "ttft_s"} for r in rs]
                for n, rs in by.items()
            }
            for w, by in raw.items()
        },
    }


def _progress(i: int, name: str, workload: str, r: dict) -> None:
    hr = hit_rate(r["engines"])
    print(
        f"  round {i + 1} {name:<11} {workload:<9}"
        f" {_fmt(ratio(r['completion_tokens'], r['wall_s']), '6.0f')} tok/s"
        f"  TTFT p50 {_fmt(percentile(r['ttft_s'], 0.5), '.3f')} s"
        f"  hit {_fmt(hr, '.1%')}  per engine "
        + ",".join(str(int(d["requests"])) for d in r["engines"])
        + f"  errors {r['errors']}",
        flush=True,
    )


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    d = Shape()
    ap = argparse.ArgumentParser(prog="python -m benchmarks.multiturn", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    ap.add_argument("--conversations", type=int, default=d.conversations)
    ap.add_argument("--turns", type=int, default=d.turns)
    ap.add_argument("--system-words", type=int, default=d.system_words)
    ap.add_argument("--user-words", type=int, default=d.user_words)
    ap.add_argument("--reply-tokens", type=int, default=d.reply_tokens)
    ap.add_argument(
        "--concurrency", type=int, default=d.concurrency, help="conversations in flight"
    )
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--max-model-len", type=int, default=2048)
    ap.add_argument(
        "--session-header", action="store_true", help="send X-Session-Id per conversation"
    )
    ap.add_argument("--no-unshared", action="store_true", help="skip the no-shared-prefix load")
    ap.add_argument("--one-at-a-time", action="store_true", help="start each stack per round")
    ap.add_argument("--out", type=Path, default=Path("benchmarks/results/multiturn.json"))
    ap.add_argument("--png", type=Path, default=Path("docs/bench-multiturn.png"))
    return ap.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    from benchmarks.serving import machine

    args = parse_args(argv)
    signal.signal(signal.SIGTERM, signal.default_int_handler)  # stop every server on the way out
    shape = Shape(
        args.conversations,
        args.turns,
        args.system_words,
        args.user_words,
        args.reply_tokens,
        args.concurrency,
    )
    results = bench(
        shape,
        args.rounds,
        args.seed,
        args.max_model_len,
        args.session_header,
        one_at_a_time=args.one_at_a_time,
        unshared=not args.no_unshared,
        machine=machine,
    )
    print(table(results))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=1))
    if args.png:
        plot(results, args.png)
        print(f"written to {args.out} and {args.png}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
