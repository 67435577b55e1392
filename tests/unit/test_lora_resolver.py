"""The LoRA resolver plugin: how often it looks for the adapter vLLM is loading (review
M10), which names it refuses, and how it makes the engines let go of one."""

from __future__ import annotations

import asyncio
import itertools

import pytest

from engine.lora_cache import AdapterPolicy
from engine.lora_resolver import PIN_AFTER_RESOLVE_S, _resolver, poll_delays


@pytest.mark.parametrize("total", [0.1, 1.0, 7.0, PIN_AFTER_RESOLVE_S])
def test_looks_come_ever_further_apart_within_the_pin(total: float) -> None:
    delays = poll_delays(total)
    assert sum(delays) == pytest.approx(total)
    assert all(d > 0 for d in delays)
    assert all(b == 2 * a for a, b in itertools.pairwise(delays[:-1]))  # the last: the rest
    assert delays[0] == min(0.25, total)  # a quick load is seen at once


def test_an_adapter_that_never_loads_costs_a_few_looks() -> None:
    assert len(poll_delays(PIN_AFTER_RESOLVE_S)) <= 8  # was 120, each on every engine


class _NoFetch:
    """A cache that must not be asked: a refused name fetches nothing."""

    asked: list[str]

    def __init__(self) -> None:
        self.asked = []

    def pinned(self, name: str) -> object:
        self.asked.append(name)
        raise AssertionError(f"fetched {name!r}")


@pytest.mark.parametrize("name", ["gs://bkt/" + "a" * 248, "gs://bkt/a b", "org/x\n"])
def test_the_resolver_refuses_unbounded_names_without_a_fetch(name: str) -> None:
    cache = _NoFetch()
    resolver = _resolver(cache, AdapterPolicy())  # type: ignore[arg-type]
    assert asyncio.run(resolver.resolve_lora("base", name)) is None  # vLLM: 404
    assert cache.asked == []
