"""The query of death: a request that makes its engine exit reaches at most two engines.

nginx retries a request that met a dead engine on one other engine (a kept-alive
connection to an engine that just died fails only once the request is sent),
never on more: 3 replicas, so that a third would show. The engines load a test
hook (tests/e2e/query_of_death.py) that kills the engine core given a marked request.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from engine.demo_model import ensure_demo_model
from tests.e2e.conftest import Stack, one_replica_stack
from tests.e2e.query_of_death import MARKER
from tests.helpers import wait_for

pytestmark = pytest.mark.e2e

REPLICAS = 3
RECOVERY_DEADLINE_S = 240.0  # three engines restarting at once on two cores


@pytest.fixture(scope="module")
def deadly(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Stack, Path]]:
    work = tmp_path_factory.mktemp("query-of-death")
    deaths = work / "deaths"
    deaths.touch()
    args = [str(ensure_demo_model()), "--max-model-len", "256"]
    args += ["--logits-processors", "tests.e2e.query_of_death:DieOnMarker"]
    env = {"VGATE_TEST_DEATHS": str(deaths)}
    with one_replica_stack(work, args, env, replicas=REPLICAS) as stack:
        yield stack, deaths


def _all_ready(stack: Stack) -> bool:
    status, health = stack.request("/health", timeout=5)
    return status == 200 and health["ready_replicas"] == REPLICAS


def test_a_query_of_death_reaches_at_most_two_engines(deadly: tuple[Stack, Path]) -> None:
    stack, deaths = deadly
    ok = {"prompt": "hi", "max_tokens": 4}
    assert stack.request("/v1/completions", ok)[0] == 200  # the hook spares other requests
    status, body = stack.request("/v1/completions", {**ok, "vllm_xargs": {MARKER: 1}})
    assert status >= 500, (status, body)
    # Every engine it reached has died by the time the client has its answer; the rest
    # stayed up, and the dead come back.
    reached = len(deaths.read_text().split())
    wait_for(lambda: _all_ready(stack), RECOVERY_DEADLINE_S, "every replica back")
    assert len(deaths.read_text().split()) == reached
    print(f"\nquery of death: answered {status}, reached {reached} of {REPLICAS} engines")
    assert 1 <= reached <= 2
    assert stack.request("/v1/completions", ok)[0] == 200
