"""A real Prometheus scraping a stack under load: every dashboard query and the HPA's
return data, the panels are drawn from its answers, and a killed engine makes the
engine-down alert fire."""

from __future__ import annotations

import os
import shutil
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import urlsplit

import pytest
import yaml

from tests.e2e.conftest import MODEL_URI, Stack, one_replica_stack
from tests.e2e.prometheus import MONITORING, draw, fast_rules, finite, load_dashboard, prometheus
from tests.helpers import wait_for

pytestmark = pytest.mark.e2e

HPA = Path(__file__).parents[2] / "deploy" / "gke" / "hpa.yaml"
WINDOW = "10s"  # $__rate_interval's place: ten scrapes
LOAD_S = 25
# Where `make dashboard-png` wants the picture kept (README's); else only the test's.
PNG_ENV = "VGATE_DASHBOARD_PNG"


@pytest.fixture(scope="module")
def watched(tmp_path_factory: pytest.TempPathFactory, storage: str) -> Iterator[Stack]:
    """One replica with LoRA on, its model from Cloud Storage (the download's figures)."""
    work = tmp_path_factory.mktemp("monitored")
    args = ["--enable-lora", "--max-model-len", "512", "--download-dir", str(work / "models")]
    args += ["--lora-cache-dir", str(work / "lora")]
    env = {"AIP_STORAGE_URI": MODEL_URI, "STORAGE_EMULATOR_HOST": storage}
    with one_replica_stack(work, args, env) as stack:
        yield stack


def _load(stack: Stack, seconds: float) -> dict[int, int]:
    """Both surfaces, from 4 clients, for `seconds`; a bad request now and then."""
    statuses: dict[int, int] = {}
    end = time.monotonic() + seconds
    lock = threading.Lock()

    def client(k: int) -> None:
        n = 0
        while time.monotonic() < end:
            n += 1
            if n % 10 == 0:
                path, body = "/predict", {"instances": [{"prompt": "x", "max_tokns": 4}]}
            elif k % 2:
                path, body = "/v1/completions", {"prompt": f"{k} {n}", "max_tokens": 16}
            else:
                path, body = "/predict", {"instances": [{"prompt": f"{k} {n}", "max_tokens": 16}]}
            status, _ = stack.request(path, body, timeout=60)
            with lock:
                statuses[status] = statuses.get(status, 0) + 1

    threads = [threading.Thread(target=client, args=(k,)) for k in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(seconds + 120)
    return statuses


def _hpa_metric() -> str:
    """The metric the HPA scales on, as plain Prometheus names it (GMP writes
    prometheus.googleapis.com|NAME|KIND)."""
    hpa = yaml.safe_load(HPA.read_text())
    name = hpa["spec"]["metrics"][0]["pods"]["metric"]["name"]
    return name.split("|")[1] if "|" in name else name


def test_dashboard_queries_the_hpas_and_an_engine_down_alert_on_a_real_prometheus(
    watched: Stack, tmp_path: Path
) -> None:
    rules = tmp_path / "alerts.yaml"
    fast_rules(MONITORING / "alerts.yaml", rules)
    target = urlsplit(watched.base).netloc
    with prometheus(tmp_path, target, rules) as server:
        start = time.time()
        statuses = _load(watched, LOAD_S)
        assert statuses.get(200, 0) > 10 and statuses.get(400, 0) > 0, statuses
        loaded = time.time()

        def scraped_since_load() -> bool:
            result = server.api("query", query="timestamp(vgate_requests_waiting)")["result"]
            return bool(result) and float(result[0]["value"][1]) >= loaded

        wait_for(scraped_since_load, 30, "a scrape after the load", every=0.2)
        end = time.time()

        dashboard = load_dashboard()
        empty = []
        for spec in dashboard.panels():
            for query in spec.queries:
                expr = query.expr.replace(dashboard.RATE, WINDOW)
                if not finite(server.series(expr, start, end)):
                    empty.append(f"{spec.title}: {expr}")
        assert not empty, "dashboard queries without data:\n" + "\n".join(empty)
        hpa = _hpa_metric()
        assert finite(server.series(hpa, start, end)), hpa

        png = tmp_path / "dashboard.png"
        draw(server, dashboard, WINDOW, start, end, png)
        assert png.stat().st_size > 20_000
        if os.environ.get(PNG_ENV):
            shutil.copy(png, os.environ[PNG_ENV])

        assert "VgateEngineDown" not in server.firing()
        watched.engine_server(0).kill()
        wait_for(lambda: "VgateEngineDown" in server.firing(), 120, "VgateEngineDown to fire")
