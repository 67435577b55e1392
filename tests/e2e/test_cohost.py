"""Several models in one container, started as Google's co-host notebook does, and changed
at run time through /update_models with the notebook's YAML.

The stack's arguments are `deploy_model_vllm_multi_model_cohost()`'s list as written,
launcher and Google-only flags included; two local copies of the demo model stand in
for the notebook's two models (CPU-sized values: --max-model-len).
"""

from __future__ import annotations

import os
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families

from engine.demo_model import ensure_demo_model
from engine.workers import EngineWorker, load_workers
from tests.e2e.conftest import Stack
from tests.helpers import free_port, http_json, spawn, stop_tree, wait_for

pytestmark = pytest.mark.e2e

KEY = "cohost-test-key"
AUTH = {"Authorization": f"Bearer {KEY}"}
# The deployment's own environment, which Google's YAML entries repeat.
DEPLOY_ENV = {"MODEL_ID": "/m/model-a", "DEPLOY_SOURCE": "notebook"}
PER_SURFACE = 20
PAUSE_S = 0.25  # between two requests of one client of the load


def cohost_args(models: list[str], names: list[str], port: int, host: str = "0.0.0.0") -> list[str]:
    n = len(models)
    return [
        "python", "-m", "vllm.entrypoints.model_cohost_server", f"--host={host}",
        f"--port={port}", f"--model={','.join(models)}",
        f"--gpu-memory-partition={','.join(['0.45'] * n)}", "--pipeline-parallel-size=1",
        "--tensor-parallel-size=1", f"--model-replicas={','.join(['1'] * n)}",
        "--data-parallel-size=1", "--swap-space=16", "--total-gpus=1",
        f"--served-model-name={','.join(names)}", "--max-model-len=1024",
    ]  # fmt: skip


def yaml_entry(model: str, name: str, deployed: str | None = None) -> dict:
    """One model of Google's update config, as the notebook writes it."""
    entry: dict = {
        "Args": cohost_args([model], [name], 8080),
        "Env": [{"name": k, "value": v} for k, v in DEPLOY_ENV.items()],
    }
    if deployed:
        entry["DeployedModel"] = deployed
    return entry


@dataclass
class Cohost:
    base: str
    run_dir: Path
    log: Path
    models: dict[str, Path]  # served name: its local directory
    work: Path

    def call(
        self, path: str, body: object | None = None, timeout: float = 120
    ) -> tuple[int, object]:
        status, _, answer = http_json(self.base + path, body, headers=AUTH, timeout=timeout)
        return status, answer

    def workers(self) -> list[EngineWorker]:
        return load_workers(self.run_dir / "engines.json")

    def health(self) -> dict:
        return http_json(self.base + "/health", timeout=10)[2]

    def served(self) -> dict[int, float]:
        """{replica: requests its engine finished}, from each engine's own metrics."""
        out = {}
        for w in self.workers():
            text = http_json(w.url + "/metrics", timeout=10)[2]
            out[w.replica] = sum(
                s.value
                for f in text_string_to_metric_families(text)
                for s in f.samples
                if s.name == "vllm:request_success_total"
            )
        return out

    def replicas_of(self, name: str) -> set[int]:
        return {w.replica for w in self.workers() if w.model == name}


@pytest.fixture(scope="module")
def cohost(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cohost]:
    demo = ensure_demo_model()
    work = tmp_path_factory.mktemp("cohost")
    models = {}
    for name in ("alpha", "beta", "gamma"):
        (work / f"model-{name}").symlink_to(demo, target_is_directory=True)
        models[name] = work / f"model-{name}"
    port = free_port()
    argv = cohost_args([str(models["alpha"]), str(models["beta"])], ["alpha", "beta"], port)
    env = {
        **os.environ,
        **DEPLOY_ENV,
        "VGATE_RUN_DIR": str(work / "run"),
        "VGATE_API_KEY": KEY,
        "VGATE_ENABLE_ADMIN_ROUTES": "1",
        "VGATE_STOP_GRACE": "20",
    }
    log = work / "stack.log"
    proc = spawn([sys.executable, "-m", "gateway.control.cli", "serve", *argv], log, env)
    stack = Cohost(f"http://127.0.0.1:{port}", work / "run", log, models, work)

    def ready() -> bool:
        assert proc.poll() is None, log.read_text(errors="replace")[-3000:]
        body = http_json(stack.base + "/health", timeout=5)[2]
        return isinstance(body, dict) and body.get("ready_replicas") == 2

    try:
        wait_for(ready, 600, "both models' engines to be ready")
        yield stack
    finally:
        stop_tree(proc)


def test_the_notebooks_cohost_arguments_serve_both_models(cohost: Cohost) -> None:
    health = cohost.health()
    assert {name: m["ready_replicas"] for name, m in health["models"].items()} == {
        "alpha": 1,
        "beta": 1,
    }
    assert {r["model"] for r in health["replicas"]} == {"alpha", "beta"}
    status, _, text = http_json(cohost.base + "/metrics", headers=AUTH, timeout=10)
    ready = {
        s.labels["model"]: s.value
        for f in text_string_to_metric_families(text)
        for s in f.samples
        if s.name == "vgate_replica_ready"
    }
    assert status == 200 and ready == {"alpha": 1.0, "beta": 1.0}
    names = {
        s.labels.get("model_name")
        for f in text_string_to_metric_families(text)
        for s in f.samples
        if s.name == "vllm:num_requests_running"
    }
    assert names == {"alpha", "beta"}


def test_each_model_name_reaches_only_its_engines_on_both_surfaces(cohost: Cohost) -> None:
    for name in ("alpha", "beta"):
        before = cohost.served()
        for i in range(PER_SURFACE):
            body = {"model": name, "prompt": f"story {i}", "max_tokens": 2}
            status, answer = cohost.call("/v1/completions", body)
            assert status == 200 and answer["model"] == name, answer
            chat = {
                "@requestFormat": "chatCompletions",
                "model": name,
                "messages": [{"role": "user", "content": f"hi {i}"}],
                "max_tokens": 2,
            }
            status, answer = cohost.call("/predict", {"instances": [chat]})
            assert status == 200 and answer["predictions"]["model"] == name, answer  # a lone chat
        after = cohost.served()
        mine = cohost.replicas_of(name)
        assert sum(after[r] - before[r] for r in mine) == 2 * PER_SURFACE
        assert all(after[r] == before[r] for r in after if r not in mine)


def test_mixed_models_in_one_predict_request_stay_in_order(cohost: Cohost) -> None:
    instances = [
        {"@requestFormat": "chatCompletions", "model": name, "max_tokens": 2,
         "messages": [{"role": "user", "content": "hello"}]}
        for name in ("beta", "alpha", "beta")
    ]  # fmt: skip
    status, answer = cohost.call("/predict", {"instances": instances})
    assert status == 200, answer
    assert [p["model"] for p in answer["predictions"]] == ["beta", "alpha", "beta"]
    # No model named: the first model, as MODEL_ID is for one.
    status, answer = cohost.call("/v1/completions", {"prompt": "x", "max_tokens": 2})
    assert status == 200 and answer["model"] == "alpha"


def test_an_unknown_model_is_a_404_that_names_it_and_reaches_no_engine(cohost: Cohost) -> None:
    before = cohost.served()
    status, answer = cohost.call("/v1/completions", {"model": "nope", "prompt": "x"})
    assert status == 404 and "nope" in answer["error"]["message"], answer
    status, answer = cohost.call("/predict", {"instances": [{"prompt": "x", "model": "nope"}]})
    assert status == 404 and "nope" in answer["error"]["message"], answer
    assert cohost.served() == before


def test_the_model_list_is_every_engines_and_the_same_each_time(cohost: Cohost) -> None:
    answers = [cohost.call("/v1/models")[1] for _ in range(10)]
    assert [m["id"] for m in answers[0]["data"]] == ["alpha", "beta"]
    assert all(a == answers[0] for a in answers)


def test_a_config_that_cannot_work_is_refused_whole(cohost: Cohost) -> None:
    bad = [yaml_entry(str(cohost.models["alpha"]), "alpha"), yaml_entry("/no/such/model", "x")]
    bad[1]["Args"].append("--max-num-seqs=many")
    path = cohost.work / "bad.yaml"
    path.write_text(yaml.safe_dump(bad))
    status, answer = cohost.call("/update_models", {"model_config_path": str(path)})
    assert status == 400 and "--max-num-seqs" in answer["error"]["message"], answer
    status, answer = cohost.call("/update_models", {"model_config": str(path)})
    assert status == 400 and "model_config_path" in answer["error"]["message"], answer
    assert set(cohost.health()["models"]) == {"alpha", "beta"}


@dataclass
class AlphaLoad:
    """Requests to the kept model from two threads, on both surfaces, until stopped: a
    steady stream with a pause between requests, so the update's own work (vLLM's parser)
    gets some of the two cores too."""

    base: str
    failures: list[str] = field(default_factory=list)
    done: int = 0
    _stop: threading.Event = field(default_factory=threading.Event)

    def _client(self, openai: bool) -> None:
        while not self._stop.is_set():
            if openai:
                path, body = "/v1/completions", {"model": "alpha", "prompt": "go", "max_tokens": 8}
            else:
                path, body = "/predict", {"instances": [{"prompt": "go", "model": "alpha"}]}
            status, _, answer = http_json(self.base + path, body, headers=AUTH, timeout=60)
            if status == 200:
                self.done += 1
            else:
                self.failures.append(f"{path}: {status} {str(answer)[:200]}")
            self._stop.wait(PAUSE_S)

    def __enter__(self) -> AlphaLoad:
        self._threads = [
            threading.Thread(target=self._client, args=(openai,), daemon=True)
            for openai in (True, False)
        ]
        for t in self._threads:
            t.start()
        return self

    def __exit__(self, *_: object) -> None:
        self._stop.set()
        for t in self._threads:
            t.join(70)


def test_an_update_adds_one_model_and_removes_another_while_the_kept_one_serves(
    cohost: Cohost,
) -> None:
    kept = cohost.replicas_of("alpha")
    config = [
        yaml_entry(str(cohost.models["alpha"]), "alpha"),
        yaml_entry(str(cohost.models["gamma"]), "gamma", deployed="model_1"),
    ]
    path = cohost.work / "update.yaml"
    path.write_text(yaml.safe_dump(config))
    with AlphaLoad(cohost.base) as load:
        wait_for(lambda: load.done >= 4, 120, "the load on alpha to flow")
        started = time.monotonic()
        status, answer = cohost.call(
            "/update_models", {"model_config_path": str(path)}, timeout=900
        )
        planned_s = time.monotonic() - started
        assert status == 200, answer
        assert answer == {
            "status": "success",
            "kept": ["alpha"],
            "added": ["gamma"],
            "removed": ["beta"],
        }

        def swapped() -> bool:
            models = cohost.health()["models"]
            return set(models) == {"alpha", "gamma"} and models["gamma"]["ready_replicas"] == 1

        wait_for(swapped, 600, "gamma to be ready and beta gone")
        swap_s = time.monotonic() - started
        wait_for(lambda: not cohost.replicas_of("beta"), 120, "beta's engine to be stopped")
        during = load.done
    print(
        f"update: answered in {planned_s:.1f} s, {swap_s:.1f} s to swap beta for gamma; "
        f"{during} alpha requests served meanwhile"
    )
    assert load.failures == []
    assert cohost.replicas_of("alpha") == kept  # the same engine: never restarted
    status, answer = cohost.call("/v1/completions", {"model": "gamma", "prompt": "x"})
    assert status == 200 and answer["model"] == "gamma", answer
    status, answer = cohost.call("/v1/completions", {"model": "beta", "prompt": "x"})
    assert status == 404 and "beta" in answer["error"]["message"], answer
    assert [m["id"] for m in cohost.call("/v1/models")[1]["data"]] == ["alpha", "gamma"]


def test_the_update_route_is_closed_without_admin_routes(stack: Stack) -> None:
    status, answer = stack.request("/update_models", {"model_config_path": "/etc/passwd"})
    assert status == 404 and "--enable-admin-routes" in answer["error"]["message"]
