"""How often the resolver looks for the adapter vLLM is loading (review M10)."""

from __future__ import annotations

import itertools

import pytest

from engine.lora_resolver import PIN_AFTER_RESOLVE_S, poll_delays


@pytest.mark.parametrize("total", [0.1, 1.0, 7.0, PIN_AFTER_RESOLVE_S])
def test_looks_come_ever_further_apart_within_the_pin(total: float) -> None:
    delays = poll_delays(total)
    assert sum(delays) == pytest.approx(total)
    assert all(d > 0 for d in delays)
    assert all(b == 2 * a for a, b in itertools.pairwise(delays[:-1]))  # the last: the rest
    assert delays[0] == min(0.25, total)  # a quick load is seen at once


def test_an_adapter_that_never_loads_costs_a_few_looks() -> None:
    assert len(poll_delays(PIN_AFTER_RESOLVE_S)) <= 8  # was 120, each on every engine
