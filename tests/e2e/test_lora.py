"""LoRA adapters from Cloud Storage on a stack of its own, with --enable-lora."""

from __future__ import annotations

import os
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from engine.demo_model import ensure_demo_model
from tests.gcs_emulator import client, upload_dir
from tests.helpers import free_port, http_json, spawn, stop_tree, wait_for

pytestmark = pytest.mark.e2e

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


@pytest.fixture(scope="module")
def lora_stack(storage: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    base = ensure_demo_model()
    work = tmp_path_factory.mktemp("lora")
    for i, uri in enumerate((ADAPTER, OTHER_ADAPTER)):
        bucket, prefix = uri.removeprefix("gs://").split("/", 1)
        upload_dir(client(storage), bucket, prefix, make_adapter(base, work / f"a{i}", seed=i))
    port = free_port()
    argv = [
        sys.executable, "-m", "gateway.control.cli", "serve", "--model", str(base),
        "--host", "127.0.0.1", "--port", str(port), "--run-dir", str(work / "run"),
        "--replicas", "1", "--gateway-workers", "1", "--max-model-len", "512",
        "--enable-lora", "--max-lora-rank", "8", "--lora-cache-dir", str(work / "cache"),
    ]  # fmt: skip
    log = work / "stack.log"
    proc = spawn(argv, log, {**os.environ, "STORAGE_EMULATOR_HOST": storage})
    base_url = f"http://127.0.0.1:{port}"

    def ready() -> bool:
        assert proc.poll() is None, log.read_text(errors="replace")[-3000:]
        return http_json(base_url + "/ping", timeout=5)[0] == 200

    try:
        wait_for(ready, 600, "the LoRA stack to be ready")
        yield base_url
    finally:
        stop_tree(proc)


def _predict(base_url: str, instance: dict) -> tuple[int, object]:
    status, _, body = http_json(base_url + "/predict", {"instances": [instance]}, timeout=120)
    return status, body


def test_dynamic_lora_from_cloud_storage_changes_the_output(lora_stack: str) -> None:
    status, plain = _predict(lora_stack, PROMPT)
    assert status == 200, plain
    status, tuned = _predict(lora_stack, {**PROMPT, "dynamic-lora": ADAPTER})
    assert status == 200, tuned
    assert tuned["predictions"] != plain["predictions"]
    status, again = _predict(lora_stack, {**PROMPT, "dynamic-lora": ADAPTER})
    assert again == tuned  # greedy: the same adapter gives the same text
    status, _, models = http_json(lora_stack + "/v1/models")
    assert ADAPTER in {m["id"] for m in models["data"]}


def test_an_openai_request_may_name_an_adapter_as_its_model(lora_stack: str) -> None:
    body = {"model": OTHER_ADAPTER, "prompt": "Once upon a time", "max_tokens": 4}
    status, _, answer = http_json(lora_stack + "/v1/completions", body, timeout=120)
    assert status == 200, answer
    assert answer["model"] == OTHER_ADAPTER


def test_a_missing_adapter_is_a_404_that_names_it(lora_stack: str) -> None:
    status, body = _predict(lora_stack, {**PROMPT, "dynamic-lora": "gs://adapters/demo/nope"})
    assert status == 404, body
    assert "gs://adapters/demo/nope" in body["error"]["message"]
