"""The front door with API keys: every route but health behind them, admin routes on request.

A stack of its own: `vgate serve DIR --api-key K1 --api-key K2 --enable-admin-routes
--enable-lora --lora-modules sql=ADAPTER_DIR`, one replica, Vertex's AIP_* routes set.
"""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import openai
import psutil
import pytest

from engine.demo_model import ensure_demo_model
from tests.e2e.conftest import VERTEX_ENV, Stack, one_replica_stack
from tests.e2e.test_lora import make_adapter
from tests.helpers import descendants, http_json

pytestmark = pytest.mark.e2e

KEYS = ("vgate-test-key-one", "vgate-test-key-two")
EXAMPLES = Path(__file__).resolve().parents[2] / "examples"
PROTECTED = [
    ("/v1/models", None),
    ("/v1/completions", {"prompt": "hi", "max_tokens": 2}),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}),
    ("/tokenize", {"prompt": "hi"}),
    ("/detokenize", {"tokens": [72, 105]}),
    ("/invocations", {"prompt": "hi", "max_tokens": 2}),
    ("/predict", {"instances": [{"prompt": "hi", "max_tokens": 2}]}),
    ("/generate", {"instances": [{"prompt": "hi", "max_tokens": 2}]}),
    (VERTEX_ENV["AIP_PREDICT_ROUTE"], {"instances": [{"prompt": "hi", "max_tokens": 2}]}),
    ("/metrics", None),
]
OPEN = ["/ping", "/health", "/live", VERTEX_ENV["AIP_HEALTH_ROUTE"]]


@pytest.fixture(scope="module")
def operator_adapter(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A local adapter the operator loads at start (--lora-modules sql=DIR)."""
    return make_adapter(ensure_demo_model(), tmp_path_factory.mktemp("adapter") / "sql", seed=0)


@pytest.fixture(scope="module")
def guarded(tmp_path_factory: pytest.TempPathFactory, operator_adapter: Path) -> Iterator[Stack]:
    args = [
        str(ensure_demo_model()), "--gateway-workers", "1", "--max-model-len", "256",
        "--api-key", KEYS[0], f"--api-key={KEYS[1]}", "--enable-admin-routes", "--enable-lora",
        "--lora-modules", f"sql={operator_adapter}",
    ]  # fmt: skip
    # vLLM's own variable too: it must not reach the engines (they would refuse vgate).
    env = {**VERTEX_ENV, "VLLM_API_KEY": "vllm-variable-key"}
    with one_replica_stack(tmp_path_factory.mktemp("auth"), args, env) as stack:
        yield stack


def _call(stack: Stack, path: str, body: object, key: str | None) -> tuple[int, object]:
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    status, _, answer = http_json(stack.base + path, body, headers=headers, timeout=60)
    return status, answer


@pytest.mark.parametrize(("path", "body"), PROTECTED)
def test_every_route_but_health_needs_a_key(guarded: Stack, path: str, body: object) -> None:
    for key in (None, "vgate-test-key-wrong", KEYS[0][:-1], "vllm-variable-key"):
        status, answer = _call(guarded, path, body, key)
        assert status == 401, (key, answer)
        assert answer["error"]["status"] == "UNAUTHENTICATED"
    for key in KEYS:
        status, answer = _call(guarded, path, body, key)
        assert status == 200, (key, answer)


@pytest.mark.parametrize("path", OPEN)
def test_health_is_open(guarded: Stack, path: str) -> None:
    assert _call(guarded, path, None, None)[0] == 200


def test_the_openai_sdk_sends_the_key_as_vllm_clients_do(guarded: Stack) -> None:
    client = openai.OpenAI(base_url=guarded.base + "/v1", api_key=KEYS[1], timeout=60)
    assert client.completions.create(model="", prompt="hi", max_tokens=2).usage.completion_tokens
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=guarded.base + "/v1", api_key="nope-nope-nope").models.list()


def test_models_name_an_operators_adapter_without_its_path(
    guarded: Stack, operator_adapter: Path
) -> None:
    status, answer = _call(guarded, "/v1/models", None, KEYS[0])
    assert status == 200, answer
    assert "sql" in {m["id"] for m in answer["data"]}
    assert str(operator_adapter) not in json.dumps(answer)
    # The engine itself lists the path: the front door is what hides it.
    engine = http_json(guarded.workers()[0].url + "/v1/models")[2]
    assert str(operator_adapter) in json.dumps(engine)


def test_admin_routes_need_the_key_when_enabled(guarded: Stack) -> None:
    body = {"lora_name": "x", "lora_path": "/nonexistent/adapter"}
    assert _call(guarded, "/v1/load_lora_adapter", body, None)[0] == 401
    status, answer = _call(guarded, "/v1/load_lora_adapter", body, KEYS[0])
    # vLLM's own handler answered (it cannot load that path), not the front door.
    assert answer["error"]["message"].startswith("Loading lora x failed"), (status, answer)


def test_the_engines_get_no_key(guarded: Stack) -> None:
    servers = [p for p in descendants(guarded.proc.pid) if "--model" in _cmdline(p)]
    assert servers
    for server in servers:
        assert not {"VLLM_API_KEY", "VGATE_API_KEYS"} & set(server.environ())
        assert "--api-key" not in server.cmdline()


def _cmdline(p: psutil.Process) -> list[str]:
    try:
        return p.cmdline()
    except psutil.NoSuchProcess:
        return []


@pytest.mark.parametrize(
    "argv",
    [
        [sys.executable, str(EXAMPLES / "openai_client.py"), "--prompt", "hi"],
        ["bash", str(EXAMPLES / "curl.sh")],
    ],
    ids=["openai_client.py", "curl.sh"],
)
def test_the_examples_run_with_the_key_as_on_gke(guarded: Stack, argv: list[str]) -> None:
    if argv[0] == "bash":
        argv = [*argv, guarded.base, KEYS[0]]
    else:
        argv = [*argv, "--base-url", guarded.base + "/v1", "--api-key", KEYS[0]]
    done = subprocess.run(argv, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stdout + done.stderr
    assert done.stdout.strip(), "the example printed no answer"
    without_key = subprocess.run([*argv[:-1], "nope"], capture_output=True, text=True, timeout=120)
    assert without_key.returncode != 0  # the key is what let it through
