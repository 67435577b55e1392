"""nginx's counts (vgate_front_metrics.lua) as Prometheus families; the run dir's figures."""

from __future__ import annotations

import json
from pathlib import Path

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from engine.failures import Failure
from engine.fetch_model import PROGRESS_FILE
from engine.launch import record_exit
from engine.lora_cache import COMPLETE, ENTRIES
from gateway.config import resolve
from gateway.control.nginx_config import metric_routes
from gateway.front_metrics import front_families
from gateway.run_metrics import download_families, lora_cache_families, restarts_family

NGINX = """bounds|latency 0.1,1,10
bounds|first_byte 0.01,1
requests|openai|/v1/completions|200 3
requests|openai|/v1/completions|429 2
requests|vertex|/predict|200 1
latency|openai|/v1/completions|0.1 1
latency|openai|/v1/completions|10 2
latency|openai|/v1/completions|+Inf 2
latency_sum|openai|/v1/completions 123.5
first_byte|openai|/v1/completions|0.01 3
first_byte_sum|openai|/v1/completions 0.02
"""


def _samples(families: list) -> dict[tuple[str, frozenset], float]:
    class Held:
        def collect(self) -> list:
            return families

    registry = CollectorRegistry()
    registry.register(Held())
    text = generate_latest(registry).decode()
    return {
        (s.name, frozenset(s.labels.items())): s.value
        for f in text_string_to_metric_families(text)
        for s in f.samples
    }


def _key(name: str, **labels: str) -> tuple[str, frozenset]:
    return name, frozenset(labels.items())


def test_counts_become_counters_and_cumulative_histograms() -> None:
    got = _samples(front_families(NGINX))
    completions = {"surface": "openai", "route": "/v1/completions"}
    assert got[_key("vgate_http_requests_total", **completions, status="429")] == 2
    assert got[_key("vgate_http_requests_total", surface="vertex", route="/predict", status="200")]
    duration = "vgate_http_request_duration_seconds"
    les = ("0.1", "1.0", "10.0")
    assert [got[_key(f"{duration}_bucket", **completions, le=le)] for le in les] == [1, 1, 3]
    assert got[_key(f"{duration}_bucket", **completions, le="+Inf")] == 5
    assert got[_key(f"{duration}_count", **completions)] == 5
    assert got[_key(f"{duration}_sum", **completions)] == 123.5
    assert got[_key("vgate_http_first_byte_seconds_count", **completions)] == 3


def test_nothing_from_nginx_is_no_series() -> None:
    assert not [s for f in front_families("") for s in f.samples]


def test_routes_are_labelled_by_surface() -> None:
    config = resolve(["--health-route", "/ready", "--predict-route", "/v1/x:predict"], {})
    routes = dict(metric_routes(config, ["/ping", "/health", "/live", "/ready"]))
    assert routes["/ready"] == "health" and routes["/v1/x:predict"] == "vertex"
    assert routes["/generate"] == routes["/predict"] == "vertex"
    assert routes["/metrics"] == "metrics" and routes["/v1/models"] == "openai"


def test_the_run_dirs_figures(tmp_path: Path) -> None:
    record_exit(tmp_path, 1, Failure("killed by signal 9"))
    record_exit(tmp_path, 1, Failure("killed by signal 9"))
    (tmp_path / PROGRESS_FILE).write_text(
        json.dumps({"uri": "gs://b/m", "bytes_done": 5, "bytes_total": 10, "files_done": 1})
    )
    cache = tmp_path / "lora"
    adapter = cache / ENTRIES / "abc"
    adapter.mkdir(parents=True)
    (adapter / "adapter_model.safetensors").write_bytes(b"x" * 1000)
    (adapter / COMPLETE).write_text("sql")
    got = _samples(
        [
            restarts_family(tmp_path, {0: "alpha", 1: "beta"}),
            *download_families(tmp_path),
            *lora_cache_families(cache, 4096),
        ]
    )
    assert got[_key("vgate_engine_restarts_total", replica="0", model="alpha")] == 0
    assert got[_key("vgate_engine_restarts_total", replica="1", model="beta")] == 2
    assert got[_key("vgate_model_download_bytes", kind="done")] == 5
    assert got[_key("vgate_model_download_bytes", kind="total")] == 10
    assert got[_key("vgate_lora_cache_adapters")] == 1
    assert got[_key("vgate_lora_cache_bytes")] >= 1000
    assert got[_key("vgate_lora_cache_budget_bytes")] == 4096
    assert download_families(tmp_path / "none") == []
