"""make bench's multiturn suite: the workload's shape and determinism, counters, pooling, goals."""

from __future__ import annotations

import asyncio
from pathlib import Path

from benchmarks import multiturn as mt
from benchmarks.multiturn import LEAST_CONN, ONE, PREFIX, Shape

SHAPE = Shape(conversations=5, turns=3, system_words=40, user_words=20, concurrency=2)


def test_same_seed_same_workload_other_seed_other_workload():
    assert mt.make_conversations(SHAPE, 1) == mt.make_conversations(SHAPE, 1)
    a, b = mt.make_conversations(SHAPE, 1), mt.make_conversations(SHAPE, 2)
    assert a[0].system != b[0].system
    assert a[0].users != b[0].users


def test_shape_one_shared_system_prompt_and_distinct_turns():
    convs = mt.make_conversations(SHAPE, 3)
    assert [c.id for c in convs] == list(range(5))
    assert len({c.system for c in convs}) == 1
    system = convs[0].system
    assert system is not None and len(system.split()) == 40 + 2  # "System 3:" and 40 words
    assert all(len(c.users) == 3 for c in convs)
    users = [u for c in convs for u in c.users]
    assert len(set(users)) == len(users)
    assert all(len(u.split()) == 20 + 4 for u in users)  # "Conversation 3-c, turn t:"
    assert all(w in mt.WORDS for w in users[0].split()[4:])


def test_unshared_workload_has_no_system_prompt_and_one_turn_each():
    convs = mt.make_unshared(SHAPE, 9)
    assert len(convs) == SHAPE.conversations * SHAPE.turns
    assert all(c.system is None and len(c.users) == 1 for c in convs)
    firsts = {c.users[0].split(",")[0] for c in convs}
    assert len(firsts) == len(convs)  # they differ from their first words


def test_messages_grow_with_the_replies():
    conv = mt.make_conversations(SHAPE, 0)[0]
    first = mt.messages(conv, 0, [])
    assert [m["role"] for m in first] == ["system", "user"]
    third = mt.messages(conv, 2, ["r0", "r1"])
    assert [m["role"] for m in third] == ["system", "user", "assistant"] * 1 + [
        "user",
        "assistant",
        "user",
    ]
    assert third[:2] == first  # the history is a prefix of every later turn
    assert [m["content"] for m in third if m["role"] == "assistant"] == ["r0", "r1"]
    assert third[-1]["content"] == conv.users[2]


def test_messages_refuses_a_turn_without_its_replies():
    conv = mt.make_conversations(SHAPE, 0)[0]
    try:
        mt.messages(conv, 2, ["only one"])
    except ValueError:
        return
    raise AssertionError("expected ValueError")


def test_default_shape_fits_the_demo_models_length():
    """~1.9 tokens a word: the last turn's prompt and reply stay under 2048 tokens."""
    s = Shape()
    words = s.system_words + s.turns * (s.user_words + 5)
    tokens = words * 1.9 + (s.turns - 1) * s.reply_tokens * 1.5 + s.reply_tokens
    assert tokens < 2048
    assert s.system_words * 1.9 >= 3 * 128  # several CPU KV blocks of 128 tokens
    assert s.user_words * 1.9 >= 2 * 128


def test_session_ids_differ_by_conversation_and_seed():
    ids = [mt.session_id(c) for seed in (0, 1) for c in mt.make_conversations(SHAPE, seed)]
    assert len(set(ids)) == len(ids)
    assert ids[0] == mt.session_id(mt.make_conversations(SHAPE, 0)[0])


METRICS = """\
# HELP vllm:prefix_cache_queries_total Prefix cache queries
# TYPE vllm:prefix_cache_queries_total counter
vllm:prefix_cache_queries_total{engine="0",model_name="m"} 1000.0
vllm:prefix_cache_hits_total{engine="0",model_name="m"} 600.0
vllm:prefix_cache_hits_created{engine="0",model_name="m"} 1.7e9
vllm:request_success_total{engine="0",finished_reason="length",model_name="m"} 7.0
vllm:request_success_total{engine="0",finished_reason="stop",model_name="m"} 3.0
vllm:prompt_tokens_total{engine="0",model_name="m"} 1000.0
vllm:external_prefix_cache_hits_total{engine="0"} 99.0
"""


def test_scrape_counters_sums_label_sets_and_skips_others():
    c = mt.scrape_counters(METRICS)
    assert c == {"hits": 600.0, "queries": 1000.0, "requests": 10.0, "prompt_tokens": 1000.0}
    assert mt.scrape_counters("") == dict.fromkeys(c, 0.0)


def test_hit_rate_is_summed_over_engines_from_deltas():
    before = [mt.scrape_counters(METRICS), {"hits": 0, "queries": 0, "requests": 0}]
    after = [
        {"hits": 700.0, "queries": 1200.0, "requests": 12.0, "prompt_tokens": 0.0},
        {"hits": 100.0, "queries": 200.0, "requests": 4.0},
    ]
    d = mt.counter_deltas(before, after)
    assert d[0]["hits"] == 100.0 and d[0]["queries"] == 200.0 and d[0]["requests"] == 2.0
    assert mt.hit_rate(d) == 200.0 / 400.0
    assert mt.hit_rate([{"hits": 0, "queries": 0}]) is None


def _round(tokens: int, wall: float, ttfts: list[float], engines: list[tuple]) -> dict:
    return {
        "wall_s": wall,
        "ok": len(ttfts),
        "errors": 0,
        "completion_tokens": tokens,
        "prompt_tokens": 100 * len(ttfts),
        "ttft_s": ttfts,
        "engines": [{"hits": h, "queries": q, "requests": n} for h, q, n in engines],
    }


def test_summarize_pools_rounds():
    s = mt.summarize(
        [
            _round(100, 1.0, [0.1, 0.3], [(50, 100, 1), (0, 100, 1)]),
            _round(300, 3.0, [0.2], [(150, 200, 1), (0, 0, 0)]),
        ]
    )
    assert s["output_tokens_per_s"] == 100.0
    assert s["output_tokens_per_s_by_round"] == [100.0, 100.0]
    assert abs(s["ttft_p50_ms"] - 200.0) < 1e-9
    assert s["hit_rate"] == 200 / 400
    assert s["hit_rate_by_round"] == [0.25, 0.75]
    assert s["requests_per_engine"] == [2, 1]
    assert s["prompt_tokens_per_request"] == 100.0


def _summary(hit: float, ttft: float, tokens: float) -> dict:
    return {"hit_rate": hit, "ttft_p50_ms": ttft, "output_tokens_per_s": tokens}


def test_compare_and_goals():
    results = {
        "shared": {
            ONE: _summary(0.8, 50, 0),
            LEAST_CONN: _summary(0.5, 100, 0),
            PREFIX: _summary(0.76, 60, 0),
        },
        "unshared": {LEAST_CONN: _summary(0, 0, 1000), PREFIX: _summary(0, 0, 980)},
    }
    c = mt.compare(results)
    assert abs(c["prefix_hit_of_ideal"] - 0.95) < 1e-9
    assert c["least_conn_hit_of_ideal"] == 0.625
    assert c["prefix_ttft_p50_over_least_conn"] == 0.6
    assert c["prefix_tokens_over_least_conn_unshared"] == 0.98
    assert all(c["goals"].values()) and len(c["goals"]) == 3
    results["unshared"][PREFIX] = _summary(0, 0, 900)
    assert not all(mt.compare(results)["goals"].values())


def test_compare_without_prefix_routing_sets_no_goal():
    c = mt.compare({"shared": {ONE: _summary(0.8, 50, 0), LEAST_CONN: _summary(0.5, 100, 0)}})
    assert c["prefix_hit_of_ideal"] is None and c["goals"] == {}
    assert c["least_conn_hit_of_ideal"] == 0.625


def test_table_and_plot(tmp_path: Path):
    rounds = [_round(100, 1.0, [0.1], [(5, 10, 1), (0, 10, 1)])]
    summary = mt.summarize(rounds)
    results = {
        "results": {"shared": {ONE: summary, LEAST_CONN: summary}, "unshared": {}},
        "compare": mt.compare({"shared": {ONE: summary, LEAST_CONN: summary}}),
        "shape": SHAPE.__dict__,
        "rounds": 1,
        "machine": "test",
    }
    text = mt.table(results)
    assert "least_conn" in text and "25.0%" in text
    png = tmp_path / "m.png"
    mt.plot(results, png)
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_configurations_are_one_engine_and_two_by_each_routing():
    starts = mt.configurations(2048, [])
    assert list(starts) == [ONE, LEAST_CONN, PREFIX]


def test_an_event_stream_reads_as_its_chunks_then_none_at_done():
    from unittest import mock

    import aiohttp

    from benchmarks.loadgen import sse_chunks

    async def read() -> list:
        reader = aiohttp.StreamReader(
            mock.Mock(_reading_paused=False), 2**16, loop=asyncio.get_running_loop()
        )
        reader.feed_data(b'data: {"a":1}\n\n: comment\ndata: {"b":2}\n\ndata: [DONE]\n\nx\n')
        reader.feed_eof()
        return [chunk async for chunk in sse_chunks(reader)]

    assert asyncio.run(read()) == [{"a": 1}, {"b": 2}, None]
