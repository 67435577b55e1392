"""Admission on a stack with a small bound: 429 when full, 400 for what could never fit.

A stack of its own (one replica, two gateway workers, --max-inflight 16, so each worker
admits 8 sequences). The bound is filled by holders that are seen running before the
burst is sent, so what is tested does not depend on how fast the engine is; that they
were still running after it is checked too.
"""

from __future__ import annotations

import concurrent.futures
import json
from collections.abc import Iterator
from typing import Any

import pytest

from engine.demo_model import MAX_POSITIONS, ensure_demo_model
from tests.e2e.conftest import Stack, one_replica_stack
from tests.helpers import http_json, wait_for

pytestmark = pytest.mark.e2e

LIMIT = 16
# A holder's sequences are as long as the model allows: thousands of decode steps, while
# the burst after them arrives in milliseconds.
HOLD = {"max_tokens": MAX_POSITIONS - 16, "ignore_eos": True}


@pytest.fixture(scope="module")
def small(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    args = [str(ensure_demo_model()), "--gateway-workers", "2", f"--max-inflight={LIMIT}"]
    with one_replica_stack(tmp_path_factory.mktemp("admission"), args) as stack:
        yield stack


def _in_engine(stack: Stack) -> float:
    return stack.total("vllm:num_requests_running") + stack.total("vllm:num_requests_waiting")


def _burst(count: int, path: str, body: object, stack: Stack) -> list[tuple[int, dict, Any]]:
    with concurrent.futures.ThreadPoolExecutor(count) as pool:
        return list(
            pool.map(lambda _: http_json(stack.base + path, body, timeout=60), range(count))
        )


def _check_refused(answers: list[tuple[int, dict, Any]]) -> None:
    assert [a[0] for a in answers] == [429] * len(answers), answers
    for _, headers, body in answers:
        assert headers["Retry-After"] and body["error"]["status"] == "RESOURCE_EXHAUSTED"


def _hold(stack: Stack, holders: list[tuple[str, dict]]) -> list:
    conns = [stack.send(path, body) for path, body in holders]
    wait_for(lambda: _in_engine(stack) >= LIMIT, 60, f"{LIMIT} sequences in the engine")
    return conns


def _finish(stack: Stack, conns: list) -> None:
    assert _in_engine(stack) >= LIMIT, "the holders ended before the burst was answered"
    for conn in conns:
        resp = conn.getresponse()
        assert resp.status == 200, resp.read()[:300]
        resp.read()
        conn.close()


def test_predict_over_max_inflight_gets_429(small: Stack) -> None:
    # Two holders of 8 sequences: least_conn gives each gateway worker one, which fills
    # its share; any further predict request is refused, whichever worker takes it.
    holder = {"instances": [{"prompt": "go", "n": LIMIT // 2, **HOLD}]}
    conns = _hold(small, [("/predict", holder)] * 2)
    _check_refused(_burst(6, "/predict", {"instances": [{"prompt": "a", "max_tokens": 2}]}, small))
    _finish(small, conns)


def test_openai_routes_over_max_inflight_get_429(small: Stack) -> None:
    # nginx admits LIMIT connections to the OpenAI routes.
    conns = _hold(small, [("/v1/completions", {"prompt": "go", **HOLD})] * LIMIT)
    _check_refused(_burst(6, "/v1/completions", {"prompt": "a", "max_tokens": 2}, small))
    _finish(small, conns)


@pytest.mark.parametrize(
    ("body", "message"),
    [
        (
            {"instances": [{"prompt": "a", "n": LIMIT + 1}]},
            f"instances[0].n: {LIMIT + 1} sequences; at most {LIMIT} run at once (--max-inflight)",
        ),
        (
            # `parameters` apply to every instance: 9 x 2 sequences.
            {"instances": [{"prompt": "a"}] * 9, "parameters": {"n": 2}},
            "instances: 18 sequences in all (instances x n)",
        ),
    ],
)
def test_predict_that_could_never_be_admitted_is_a_400(
    small: Stack, body: dict, message: str
) -> None:
    status, answer = small.request("/predict", body)
    assert status == 400 and answer["error"]["message"].startswith(message), answer


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({"prompt": "a", "n": LIMIT + 1}, "n must be at most"),
        ({"prompt": ["a"] * (LIMIT + 1)}, "prompt"),
    ],
)
def test_openai_requests_that_could_never_be_admitted_are_a_400(
    small: Stack, body: dict, field: str
) -> None:
    status, answer = small.request("/v1/completions", {**body, "max_tokens": 2})
    assert status == 400, answer
    assert field in json.dumps(answer), answer
