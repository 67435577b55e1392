"""The routing policy (gateway/control/nginx/vgate_routing_policy.lua), run by LuaJIT as
nginx runs it, without nginx: block chains, matches, and the bounded choice."""

from __future__ import annotations

import math
import zlib
from pathlib import Path
from typing import Any

import pytest
from lupa import luajit21

from gateway.control.nginx_config import TEMPLATE_DIR


@pytest.fixture(scope="module")
def policy() -> Any:
    lua = luajit21.LuaRuntime(unpack_returned_tuples=True)
    lua.execute(f"package.path = '{Path(TEMPLATE_DIR)}/?.lua;' .. package.path")
    return lua.eval('require("vgate_routing_policy")'), lua


def _crc(text: bytes | str) -> int:
    return zlib.crc32(text.encode() if isinstance(text, str) else text)


def _table(lua: Any, value: Any) -> Any:
    """A Python dict or list as a Lua table (lists 1-based)."""
    if isinstance(value, dict):
        return lua.table_from({k: _table(lua, v) for k, v in value.items()})
    if isinstance(value, list):
        return lua.table_from([_table(lua, v) for v in value])
    return value


def _dict(table: Any) -> dict:
    return {k: v for k, v in table.items()}


def _chain(policy: Any, adapter: str, text: str) -> list[int]:
    m, _ = policy
    return list(m.blocks(adapter, text, _crc).values())


def _choose(
    policy: Any,
    replicas: list[int],
    loads: dict[int, int],
    matched: dict[int, int] | None = None,
    blocks: int = 1,
    adapter: bool = False,
    pinned: int | None = None,
    turn: int = 0,
) -> int:
    m, lua = policy
    request = _table(lua, {"matched": matched or {}, "blocks": blocks, "adapter": adapter})
    if pinned is not None:
        request["pinned"] = pinned
    return m.choose(_table(lua, replicas), _table(lua, loads), request, turn)


def test_prompts_read_as_they_grow(policy) -> None:
    m, lua = policy
    turn1 = {
        "model": "m",
        "messages": [{"role": "system", "content": "S"}, {"role": "user", "content": "hi"}],
    }
    turn2 = {
        "model": "m",
        "messages": [
            *turn1["messages"],
            {"role": "assistant", "content": [{"type": "text", "text": "hello"}]},
            {"role": "user", "content": "more"},
        ],
        "max_tokens": 9,
    }
    text1, model = m.prompt_of(_table(lua, turn1))
    text2, _ = m.prompt_of(_table(lua, turn2))
    assert model == "m" and text2.startswith(text1) and "hello" in text2
    assert m.prompt_of(_table(lua, {"prompt": "abc"}))[0] == "abc"
    assert m.prompt_of(_table(lua, {"prompt": ["first", "second"]}))[0] == "first"
    assert m.prompt_of(_table(lua, {"token_ids": [1, 2, 3]}))[0] == "1,2,3"
    assert m.prompt_of(_table(lua, {"instructions": "I", "input": "x"}))[0] == "Ix"
    assert m.prompt_of("not a table")[0] is None


def test_media_count_by_their_urls_ends_not_their_size(policy) -> None:
    m, lua = policy
    url = "data:image/png;base64," + "A" * 2_000_000
    body = {
        "messages": [
            {"role": "user", "content": [{"type": "image_url", "image_url": {"url": url}}]}
        ]
    }
    text, _ = m.prompt_of(_table(lua, body))
    assert len(text) < 300 and str(len(url)) in text


def test_odd_fields_are_skipped_not_fatal(policy) -> None:
    m, lua = policy
    for body in (
        {"model": 5, "messages": "x"},
        {"messages": [{"role": ["x"], "content": {"a": 1}}, 7]},
        {"prompt": [[1, 2], None]},
        {"input": [{"content": [5, {"text": 6}]}]},
    ):
        text, model = m.prompt_of(_table(lua, body))
        assert isinstance(text, str) and isinstance(model, str)


def test_a_chain_has_the_adapter_then_whole_blocks_each_bound_to_its_prefix(policy) -> None:
    m, _ = policy
    size = m.BLOCK_CHARS
    assert len(_chain(policy, "", "x" * (size - 1))) == 1  # no whole block: the model only
    one, two = "a" * size, "b" * size
    ab, bb = _chain(policy, "", one + two), _chain(policy, "", two + two)
    assert len(ab) == 3 and ab[2] != bb[2]  # the same block after another prefix differs
    assert _chain(policy, "", one + two + "tail")[:3] == ab  # a longer prompt extends it
    assert _chain(policy, "lora-1", one)[0] != _chain(policy, "", one)[0]
    assert len(_chain(policy, "", "z" * size * (m.MAX_BLOCKS + 10))) == m.MAX_BLOCKS + 1


def _match(policy: Any, chain: list[int], held: dict[int, int], replicas: list[int]) -> dict:
    m, lua = policy
    matched, _ = m.match(_table(lua, chain), lambda h: held.get(h), _table(lua, replicas))
    return _dict(matched)


def test_a_match_is_the_run_of_leading_blocks_an_engine_holds(policy) -> None:
    chain = [11, 12, 13, 14]
    held = {11: 0b11, 12: 0b01, 13: 0b11, 14: 0b10}
    # Engine 0: blocks 1-3. Engine 1 lacks block 2, so its 3 and 4 do not count.
    assert _match(policy, chain, held, [0, 1]) == {0: 3, 1: 1}
    assert _match(policy, chain, {}, [0, 1]) == {}
    assert _match(policy, chain, held, [1]) == {1: 1}  # only the candidates


def test_remember_adds_the_engine_to_each_block_once(policy) -> None:
    m, lua = policy
    chain, held = [11, 12, 13], {11: 0b01, 12: 0b10}
    _, seen = m.match(_table(lua, chain), lambda h: held.get(h), _table(lua, [0, 1]))
    writes = [
        tuple(w.values())
        for w in m.remember(_table(lua, chain), seen, 0, lambda h: held.get(h)).values()
    ]
    assert writes == [(12, 0b11), (13, 0b01)]  # block 11 had it already
    assert len(m.remember(_table(lua, chain), seen, 40, lambda h: held.get(h))) == 0  # untracked id


def test_no_claim_means_least_loaded_and_ties_rotate(policy) -> None:
    assert _choose(policy, [0, 1, 2], {0: 3, 1: 1, 2: 2}) == 1
    picks = {_choose(policy, [0, 1], {0: 0, 1: 0}, turn=t) for t in range(4)}
    assert picks == {0, 1}


def test_the_longest_prefix_wins_within_the_bound(policy) -> None:
    # 6 prompt blocks (+ the model's): engine 1 holds 5 of them.
    assert _choose(policy, [0, 1], {0: 0, 1: 1}, {0: 1, 1: 6}, blocks=7) == 1
    # Loads 0 and 2: ceil(1.1 x 3 / 2) = 2, and a third request on engine 1 is past it.
    assert _choose(policy, [0, 1], {0: 0, 1: 2}, {0: 1, 1: 6}, blocks=7) == 0
    # At scale the bound is a share: 20 in flight on 2 engines lets one hold 12.
    assert _choose(policy, [0, 1], {0: 9, 1: 11}, {1: 6}, blocks=7) == 1
    assert _choose(policy, [0, 1], {0: 6, 1: 14}, {1: 6}, blocks=7) == 0


def test_a_prefix_under_the_threshold_does_not_draw(policy) -> None:
    m, _ = policy
    blocks = 11  # 10 prompt blocks; a shared system prompt of 2 is under the threshold
    assert m.THRESHOLD * 10 > 2
    assert _choose(policy, [0, 1], {0: 1, 1: 0}, {0: 3, 1: 1}, blocks=blocks) == 1
    held = 1 + math.ceil(m.THRESHOLD * 10)
    assert _choose(policy, [0, 1], {0: 1, 1: 0}, {0: held, 1: 1}, blocks=blocks) == 0


def test_an_adapter_goes_where_it_was_sent_before_any_prefix(policy) -> None:
    # Engine 1 was sent the adapter; engine 0 holds nothing (not even the adapter block).
    assert _choose(policy, [0, 1], {0: 0, 1: 1}, {1: 1}, blocks=1, adapter=True) == 1
    # The same facts for the base model: only load counts.
    assert _choose(policy, [0, 1], {0: 0, 1: 1}, {1: 1}, blocks=1, adapter=False) == 0


def test_a_session_keeps_its_engine_within_the_bound(policy) -> None:
    assert _choose(policy, [0, 1], {0: 0, 1: 1}, {0: 5}, blocks=6, pinned=1) == 1
    assert _choose(policy, [0, 1], {0: 0, 1: 2}, pinned=1) == 0  # over the bound
    assert _choose(policy, [0, 2], {0: 0, 2: 0}, pinned=1, turn=1) in (0, 2)  # gone: any


def test_some_engine_is_always_chosen_and_the_bound_always_holds(policy) -> None:
    """Whatever the loads and claims: an engine, and one whose load stays within the bound."""
    import random

    m, lua = policy
    rng = random.Random(7)
    for _ in range(2000):
        n = rng.randint(1, 5)
        replicas = rng.sample(range(8), n)
        loads = {r: rng.randint(0, 40) for r in replicas}
        matched = {r: rng.randint(0, 9) for r in replicas if rng.random() < 0.5}
        pinned = rng.choice([*replicas, None])
        chosen = _choose(
            policy, replicas, loads, matched, 9, rng.random() < 0.3, pinned, rng.randint(0, 9)
        )
        bound = -(-m.FACTOR * (sum(loads.values()) + 1) // n)
        assert chosen in replicas and loads[chosen] + 1 <= bound
    assert m.choose(lua.table(), lua.table(), _table(lua, {"matched": {}, "blocks": 1}), 0) is None


def test_the_ready_engines_are_read_from_the_upstream_files_map(policy) -> None:
    m, _ = policy
    ids, addresses, models = m.parse_engines("0=127.0.0.1:8001@alpha 2=127.0.0.1:8003@beta ")
    assert list(ids.values()) == [0, 2]
    assert list(addresses[2].values()) == ["127.0.0.1", 8003]
    assert _dict(models) == {0: "alpha", 2: "beta"}
    assert list(m.of_model(ids, models, "beta").values()) == [2]
    assert len(m.of_model(ids, models, "gamma")) == 0
    assert len(m.parse_engines("")[0]) == 0


def _models(lua: Any, lora: bool) -> Any:
    m = lua.eval('require("vgate_routing_policy")')
    settings = {
        "models": [{"name": "alpha", "names": ["alpha", "a"]}, {"name": "beta", "names": ["beta"]}],
        "adapters": ["sql-lora"],
        "lora": lora,
    }
    return m.model_table(_table(lua, settings))


def test_a_request_names_its_model_or_gets_the_first(policy) -> None:
    m, lua = policy
    t = _models(lua, lora=False)
    assert m.resolve(t, "") == ("alpha", "") and m.resolve(t, None) == ("alpha", "")
    assert m.resolve(t, "beta") == ("beta", "") and m.resolve(t, "a") == ("alpha", "")
    assert m.resolve(t, "nope") == (None, None)  # without LoRA: a 404, no engine asked
    t = _models(lua, lora=True)
    assert m.resolve(t, "beta") == ("beta", "")
    assert m.resolve(t, "tuned") == ("alpha", "tuned")  # an adapter of the first model's
    assert m.resolve(t, "sql-lora") == ("alpha", "")  # every engine has it: no affinity
