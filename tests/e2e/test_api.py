"""The stack serves for real: OpenAI API through nginx, Vertex predict, health, metrics."""

from __future__ import annotations

import concurrent.futures

import openai
import pytest

from engine.demo_model import DEMO_MODEL_NAME
from engine.placement import plan, usable_cpus
from tests.e2e.conftest import MODEL_URI, VERTEX_ENV, Stack

pytestmark = pytest.mark.e2e


@pytest.fixture(scope="module")
def client(stack: Stack) -> openai.OpenAI:
    return openai.OpenAI(base_url=stack.base + "/v1", api_key="unused", timeout=60)


def test_ping_said_503_until_an_engine_was_ready(stack: Stack) -> None:
    answered = [s for s in stack.pings if s]  # 0: nothing listening yet
    assert answered[0] == 503 and answered[-1] == 200
    assert set(answered[: answered.index(200)]) == {503}


def test_health_lists_each_replica_ready_with_its_device(stack: Stack) -> None:
    status, body = stack.request("/health")
    assert status == 200 and body["status"] == "ready"
    expected = plan("cpu", [], usable_cpus(), replicas=2)  # cpu:0 and cpu:1 on 2 cores
    assert body["replicas"] == [
        {"replica": p.replica, "state": "ready", "device": p.label, "model": DEMO_MODEL_NAME}
        for p in expected
    ]
    assert body["models"] == {
        DEMO_MODEL_NAME: {"status": "ready", "ready_replicas": 2, "replicas_total": 2}
    }


def test_vertex_health_and_predict_routes(stack: Stack) -> None:
    status, body = stack.request(VERTEX_ENV["AIP_HEALTH_ROUTE"])
    assert status == 200 and body["status"] == "ready"
    status, body = stack.request(
        VERTEX_ENV["AIP_PREDICT_ROUTE"], {"instances": [{"prompt": "hi", "max_tokens": 3}]}
    )
    assert status == 200 and body["predictions"][0].startswith("Prompt:\nhi\nOutput:\n")


def test_models_lists_the_demo_model(client: openai.OpenAI) -> None:
    assert [m.id for m in client.models.list().data] == ["vgate-demo"]


@pytest.mark.parametrize("model", ["", "vgate-demo"])
def test_completion(client: openai.OpenAI, model: str) -> None:
    out = client.completions.create(model=model, prompt="Once upon", max_tokens=5)
    assert out.choices[0].text and out.usage.completion_tokens == 5


def test_chat(client: openai.OpenAI) -> None:
    out = client.chat.completions.create(
        model="", messages=[{"role": "user", "content": "hi"}], max_tokens=6
    )
    assert out.choices[0].message.role == "assistant"
    assert out.usage.completion_tokens == 6


def test_streaming_chat_and_completion(client: openai.OpenAI) -> None:
    chunks = list(
        client.chat.completions.create(
            model="", messages=[{"role": "user", "content": "hi"}], max_tokens=8, stream=True
        )
    )
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert len(chunks) >= 8
    pieces = list(client.completions.create(model="", prompt="a", max_tokens=8, stream=True))
    assert len(pieces) >= 8 and pieces[-1].choices[0].finish_reason == "length"


def test_raw_response_and_the_other_predict_routes(stack: Stack) -> None:
    instance = {"prompt": "  hello  ", "max_tokens": 4, "temperature": 0}
    status, framed = stack.request("/generate", {"instances": [instance]})
    assert status == 200 and framed["predictions"][0].startswith("Prompt:\nhello\nOutput:\n")
    status, raw = stack.request("/predict", {"instances": [{**instance, "raw_response": True}]})
    assert status == 200
    assert framed["predictions"][0] == "Prompt:\nhello\nOutput:\n" + raw["predictions"][0]


def test_metrics_show_the_gateway_and_both_replicas(stack: Stack) -> None:
    metrics = stack.metrics()
    for replica in ("0", "1"):
        assert ("vllm:num_requests_running", replica) in metrics
        assert metrics[("vgate_replica_ready", replica)] == 1.0
    assert any(name == "vgate_requests_total" for name, _ in metrics)
    # The pod's queue for the HPA: one series, the engines' waiting requests summed.
    waiting = [v for (name, _), v in metrics.items() if name == "vllm:num_requests_waiting"]
    assert len(waiting) == 2 and metrics[("vgate_requests_waiting", "")] == sum(waiting)


def test_requests_spread_over_both_engines(stack: Stack, client: openai.OpenAI) -> None:
    def done() -> dict[str, float]:
        m = stack.metrics()
        return {r: m[("vllm:request_success_total", r)] for r in ("0", "1")}

    before = done()
    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        list(
            pool.map(
                lambda i: client.completions.create(model="", prompt=str(i), max_tokens=32),
                range(16),
            )
        )
    after = done()
    served = {r: after[r] - before[r] for r in before}
    assert sum(served.values()) == 16
    assert min(served.values()) >= 3, served


def test_the_model_came_from_cloud_storage(stack: Stack) -> None:
    bucket, prefix = MODEL_URI.removeprefix("gs://").split("/", 1)
    mirror = stack.run_dir / "model_dir" / bucket / prefix  # Google's layout
    assert (mirror / "config.json").is_file()
    for worker in stack.workers():
        assert worker.argv[worker.argv.index("--model") + 1] == str(mirror)
    assert f"{MODEL_URI}: complete" in stack.log.read_text(errors="replace")
    status, health = stack.request("/health")
    assert status == 200 and "download" not in health  # figures only while it runs


@pytest.mark.parametrize(
    "path",
    [
        "/v1/completions/render",
        "/v1/chat/completions/render",
        "/v1/completions/derender",
        "/inference/v1/generate",
        "/render",
    ],
)
def test_the_engines_internal_endpoints_are_not_public(stack: Stack, path: str) -> None:
    # The engines run with --enable-scale-out for the gateway's raw image prompts.
    status, body = stack.request(path, {"prompt": "hi", "token_ids": [1], "sampling_params": {}})
    assert status == 404, body


def test_many_scrapes_at_once_leave_health_answering(stack: Stack) -> None:
    """50 parallel /metrics share engine scrapes; /ping keeps answering within 1 s."""
    import time

    def ping() -> float:
        start = time.monotonic()
        assert stack.request("/ping", timeout=10)[0] == 200
        return time.monotonic() - start

    with concurrent.futures.ThreadPoolExecutor(60) as pool:
        scrapes = [pool.submit(stack.request, "/metrics", None, 60) for _ in range(50)]
        pings = [pool.submit(ping) for _ in range(10)]
        statuses = [f.result()[0] for f in scrapes]
        slowest = max(f.result() for f in pings)
    assert statuses == [200] * 50
    assert slowest < 1.0, f"/ping took {slowest:.2f} s during 50 parallel scrapes"
