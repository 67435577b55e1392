"""Failure semantics on the real stack: disconnects, a dying engine, a clean stop.

These run after test_api.py (file order) and the last one stops the stack.
"""

from __future__ import annotations

import signal
import time

import psutil
import pytest

from tests.e2e.conftest import Stack
from tests.helpers import descendants, hang_up, log_entries

pytestmark = pytest.mark.e2e


def test_a_client_that_disconnects_aborts_its_generation(stack: Stack) -> None:
    # MARGIN x 10 s of work (one request, n sequences): most of it is left when the
    # client goes, whatever the machine's speed.
    work = stack.work_for(10, instances=1)
    before = stack.total("vllm:generation_tokens_total")
    conn = stack.send("/v1/completions", {"prompt": "go", **work.fields(), "stream": True})
    resp = conn.getresponse()
    assert resp.status == 200
    for _ in range(3):
        assert resp.readline().startswith(b"data: ")
        resp.readline()
    hang_up(conn)  # the client goes away mid-stream
    generated = stack.generated_once_idle(before)
    assert generated < work.tokens / 2, f"{generated} of {work.tokens} tokens were generated"


def _replica_state(stack: Stack, replica: int) -> str:
    status, body = stack.request("/health", timeout=5)
    assert status == 200, f"/health said {status} while one engine was still ready"
    return body["replicas"][replica]["state"]


def test_a_killed_engine_restarts_while_requests_keep_succeeding(stack: Stack) -> None:
    victim = stack.engine_server(1)
    left_behind = victim.children(recursive=True)  # vLLM's engine core and workers
    assert left_behind
    victim.kill()  # SIGKILL to the server alone, as an OOM kill would
    seen: set[str] = set()
    answered = answered_while_down = 0
    deadline = time.monotonic() + 600
    while True:
        state = _replica_state(stack, 1)
        seen.add(state)
        if state == "ready" and seen - {"ready"}:
            break
        status, body = stack.request(
            "/v1/completions", {"model": "", "prompt": "still there?", "max_tokens": 4}
        )
        assert status == 200, f"request {answered} failed during the restart: {status} {body}"
        answered += 1
        status, body = stack.request(
            "/predict", {"instances": [{"prompt": "and you?", "max_tokens": 2}]}
        )
        assert status == 200, f"predict failed during the restart: {status} {body}"
        answered_while_down += state != "ready"
        assert time.monotonic() < deadline, f"replica 1 did not come back; states seen: {seen}"
        time.sleep(0.2)
    assert seen & {"down", "starting"}, seen
    assert not [p for p in left_behind if p.is_running()], "the dead server's children live on"
    # Requests succeeded while replica 1 was out, however quickly it came back.
    assert answered_while_down >= 1, (answered, seen)
    assert stack.engine_server(1).pid != victim.pid
    out = [stack.request("/v1/completions", {"prompt": "x", "max_tokens": 2})[0] for _ in range(4)]
    assert out == [200] * 4


def test_sigterm_stops_every_process(stack: Stack) -> None:
    family = descendants(stack.proc.pid)
    assert len(family) >= 6  # 2 engines (+ their children), monitor, 2 gateways, nginx
    start = time.monotonic()
    stack.proc.send_signal(signal.SIGTERM)
    stack.proc.wait(timeout=60)
    took = time.monotonic() - start
    alive = [p for p in family if p.is_running() and p.status() != psutil.STATUS_ZOMBIE]
    assert not alive, [p.cmdline() for p in alive]
    assert took < 20 + 10, f"stop took {took:.1f} s, grace is 20 s"
    assert stack.request("/ping", timeout=2)[0] == 0  # nothing listens any more


def test_every_line_the_stack_wrote_is_a_cloud_logging_entry(stack: Stack) -> None:
    """The whole log of a stack that served, refused requests, restarted an engine and
    stopped: what the tests before this one (in this order) made it do."""
    assert stack.proc.poll() is not None, "the stack must have stopped (run the module whole)"
    entries = log_entries(stack.log.read_text(errors="replace"))
    by_process = {e["process"].split("/")[0] for e in entries}
    expected = {"vgate", "supervisord", "download", "monitor", "nginx", "engine-0", "engine-1"}
    assert expected <= by_process, by_process
    served = [e for e in entries if "httpRequest" in e]
    statuses = {e["httpRequest"]["status"] for e in served}
    assert 200 in statuses and any(400 <= s < 500 for s in statuses), statuses  # 499: gone
    for e in served:  # severity from the status
        status = e["httpRequest"]["status"]
        assert e["severity"] == ("INFO" if status < 400 else "WARNING" if status < 500 else "ERROR")
    # The engine killed in the restart test: its launcher says so, supervisord too.
    assert any(
        e["process"] == "engine-1"
        and e["severity"] == "WARNING"
        and e["message"].startswith("engine replica 1 exited (-9)")
        for e in entries
    )
    assert any(
        e["process"] == "supervisord" and e["message"].startswith("exited: engine-1")
        for e in entries
    )
    # vLLM's own records through its logging config, with their levels.
    engine = [e for e in entries if e["process"] == "engine-0"]
    assert {"INFO", "WARNING"} <= {e["severity"] for e in engine}
    assert any(e.get("logger", "").startswith("vllm") for e in engine)
    # The stop, from vgate serve's drain.
    assert any(e["process"] == "vgate" and e["message"].startswith("stopping: ") for e in entries)
