"""LoRA adapters from Cloud Storage on a stack of its own, started as Google's notebook does.

The stack's arguments are the Model Garden notebook's `deploy_model_vllm` list exactly,
launcher and Google-only flags included, as Vertex appends them to the image's
entrypoint (`vgate serve`); CPU values only where the demo model needs them.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from engine.demo_model import ensure_demo_model
from engine.lora_cache import NAME
from engine.workers import load_workers
from tests.gcs_emulator import client, upload_dir
from tests.helpers import free_port, http_json, log_messages, spawn, stop_tree, wait_for

pytestmark = pytest.mark.e2e

ALLOWED = "gs://adapters/demo/"
OUTSIDE = "gs://adapters/elsewhere/sql-lora"  # a real adapter, outside the allow-list
ADAPTER = "gs://adapters/demo/sql-lora"
OTHER_ADAPTER = "gs://adapters/demo/chat-lora"
PROMPT = {"prompt": "Once upon a time", "max_tokens": 16, "temperature": 0, "raw_response": True}


def make_adapter(base: Path, out: Path, seed: int) -> Path:
    """A LoRA adapter for the demo model, with peft; random B weights, so it changes outputs."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_pretrained(base, torch_dtype=torch.float32)
    config = LoraConfig(
        r=8, lora_alpha=32, target_modules=["q_proj", "v_proj", "o_proj"], init_lora_weights=False
    )
    get_peft_model(model, config).save_pretrained(out)
    return out


@dataclass(frozen=True)
class LoraStack:
    base: str
    log: Path
    cache: Path
    engine: str  # the engine itself, as vgate's own code reaches it over loopback

    def loaded(self) -> set[str]:
        """Adapters the engine has now (the public /v1/models does not list them)."""
        return {m["id"] for m in http_json(self.engine + "/v1/models")[2]["data"]}


@pytest.fixture(scope="module")
def lora_stack(storage: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[LoraStack]:
    base = ensure_demo_model()
    work = tmp_path_factory.mktemp("lora")
    for i, uri in enumerate((ADAPTER, OTHER_ADAPTER, OUTSIDE)):
        bucket, prefix = uri.removeprefix("gs://").split("/", 1)
        upload_dir(client(storage), bucket, prefix, make_adapter(base, work / f"a{i}", seed=i))
    # The adapter cache holds one adapter: every change of adapter evicts the other.
    one_adapter = sum(f.stat().st_size for f in (work / "a0").rglob("*") if f.is_file())
    port = free_port()
    notebook = [
        "python", "-m", "vllm.entrypoints.api_server", "--host=127.0.0.1", f"--port={port}",
        f"--model={base}", "--tensor-parallel-size=1", "--swap-space=16",
        "--gpu-memory-utilization=0.9",
        "--max-model-len=512",  # the notebook's 4096 is beyond the demo model's 2048 positions
        "--dtype=auto", "--max-loras=1", "--max-cpu-loras=8", "--max-num-seqs=256",
        "--disable-log-stats", "--trust-remote-code", "--enforce-eager", "--enable-lora",
        "--model-type=llama3.1",
    ]  # fmt: skip
    # vgate's own settings from the environment, so the argument list stays the notebook's.
    env = {
        **os.environ,
        "STORAGE_EMULATOR_HOST": storage,
        "MODEL_ID": "meta-llama/Llama-3.1-8B-Instruct",
        "DEPLOY_SOURCE": "notebook",
        "HF_TOKEN": "hf_vgate_test_token",
        "VGATE_RUN_DIR": str(work / "run"),
        "VGATE_REPLICAS": "1",
        "VGATE_LORA_CACHE_DIR": str(work / "cache"),
        "VGATE_LORA_CACHE_BYTES": str(one_adapter * 3 // 2),
        "VGATE_ALLOWED_LORA_SOURCES": ALLOWED,
    }
    log = work / "stack.log"
    proc = spawn([sys.executable, "-m", "gateway.control.cli", "serve", *notebook], log, env)
    base_url = f"http://127.0.0.1:{port}"

    def ready() -> bool:
        assert proc.poll() is None, log.read_text(errors="replace")[-3000:]
        return http_json(base_url + "/ping", timeout=5)[0] == 200

    try:
        wait_for(ready, 600, "the LoRA stack to be ready")
        (engine,) = load_workers(work / "run" / "engines.json")
        yield LoraStack(base_url, log, work / "cache", engine.url)
    finally:
        stop_tree(proc)


def test_the_notebooks_arguments_serve_generate_ping_and_metrics(lora_stack: LoraStack) -> None:
    status, _, body = http_json(lora_stack.base + "/generate", {"instances": [{"prompt": "hi"}]})
    assert status == 200 and body["predictions"][0].startswith("Prompt:\nhi\nOutput:\n")
    assert http_json(lora_stack.base + "/ping")[0] == 200
    status, _, text = http_json(lora_stack.base + "/metrics")
    # --disable-log-stats would have removed them: vgate keeps them and says so.
    assert status == 200 and "vllm:generation_tokens_total{" in text
    said = log_messages(lora_stack.log)
    for flag in ("--swap-space=16", "--disable-log-stats", "--model-type=llama3.1"):
        assert any(m.startswith(f"{flag}: ") for m in said), flag
    assert any(m.startswith("python -m vllm.entrypoints.api_server: dropped") for m in said)


def _predict(base_url: str, instance: dict) -> tuple[int, object]:
    status, _, body = http_json(base_url + "/predict", {"instances": [instance]}, timeout=120)
    return status, body


def test_dynamic_lora_from_cloud_storage_changes_the_output(lora_stack: LoraStack) -> None:
    status, plain = _predict(lora_stack.base, PROMPT)
    assert status == 200, plain
    status, tuned = _predict(lora_stack.base, {**PROMPT, "dynamic-lora": ADAPTER})
    assert status == 200, tuned
    assert tuned["predictions"] != plain["predictions"]
    status, again = _predict(lora_stack.base, {**PROMPT, "dynamic-lora": ADAPTER})
    assert again == tuned  # greedy: the same adapter gives the same text
    assert ADAPTER in lora_stack.loaded()
    # Callers see the served model (here the notebook's --model), not the adapters
    # others named nor where anything is stored.
    status, _, models = http_json(lora_stack.base + "/v1/models")
    assert status == 200 and [m["id"] for m in models["data"]] == [str(ensure_demo_model())]
    assert models["data"][0]["root"] == models["data"][0]["id"]


def test_an_openai_request_may_name_an_adapter_as_its_model(lora_stack: LoraStack) -> None:
    body = {"model": OTHER_ADAPTER, "prompt": "Once upon a time", "max_tokens": 4}
    status, _, answer = http_json(lora_stack.base + "/v1/completions", body, timeout=120)
    assert status == 200, answer
    assert answer["model"] == OTHER_ADAPTER


def test_the_cache_budget_holds_by_unloading_what_it_evicts(lora_stack: LoraStack) -> None:
    def cached() -> set[str]:
        return {p.read_text() for p in lora_stack.cache.glob(f"adapters/*/{NAME}")}

    def settled(used: str, gone: str) -> bool:
        loaded = lora_stack.loaded()
        return cached() == {used} and used in loaded and gone not in loaded

    status, first = _predict(lora_stack.base, {**PROMPT, "dynamic-lora": OTHER_ADAPTER})
    assert status == 200, first
    wait_for(lambda: settled(OTHER_ADAPTER, ADAPTER), 60, "only this adapter, cached and loaded")
    status, other = _predict(lora_stack.base, {**PROMPT, "dynamic-lora": ADAPTER})
    assert status == 200, other
    # Room for one: the first is unloaded from the engine, then its files go.
    wait_for(lambda: settled(ADAPTER, OTHER_ADAPTER), 60, "the first adapter to be evicted")
    # Asked again, it is fetched and loaded again: the same adapter, the same text.
    status, again = _predict(lora_stack.base, {**PROMPT, "dynamic-lora": OTHER_ADAPTER})
    assert status == 200, again
    assert again == first
    wait_for(lambda: settled(OTHER_ADAPTER, ADAPTER), 60, "the other adapter to be evicted")


def test_a_missing_adapter_is_a_404_that_names_it(lora_stack: LoraStack) -> None:
    status, body = _predict(lora_stack.base, {**PROMPT, "dynamic-lora": "gs://adapters/demo/nope"})
    assert status == 404, body
    assert "gs://adapters/demo/nope" in body["error"]["message"]


@pytest.mark.parametrize("route", ["/v1/load_lora_adapter", "/v1/unload_lora_adapter"])
def test_runtime_adapter_admin_routes_are_not_public(lora_stack: LoraStack, route: str) -> None:
    # vLLM registers them with --enable-lora; anyone could swap the adapter others get.
    body = {"lora_name": "sql", "lora_path": "attacker/evil-lora", "load_inplace": True}
    status, _, answer = http_json(lora_stack.base + route, body)
    assert status == 404 and answer["error"]["message"] == "no such route", answer


def test_adapter_sources_outside_the_allow_list_are_refused_on_both_surfaces(
    lora_stack: LoraStack,
) -> None:
    outside = OUTSIDE
    status, body = _predict(lora_stack.base, {**PROMPT, "dynamic-lora": outside})
    assert status == 400, body
    assert body["error"]["message"] == (
        f"instances[0].dynamic-lora: adapter {outside!r} is not allowed here "
        "(--allowed-lora-sources)"
    )
    # The OpenAI route: vLLM asks vgate's resolver, which refuses this adapter (it exists
    # and would load from anywhere allowed); vLLM answers 404 for a model it cannot find.
    request = {"model": outside, "prompt": "hi", "max_tokens": 2}
    status, _, answer = http_json(lora_stack.base + "/v1/completions", request, timeout=120)
    assert status == 404, answer
    assert outside in answer["error"]["message"]
