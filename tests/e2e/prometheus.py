"""A real Prometheus server (Debian's) on loopback, its HTTP API, and the dashboard's panels
drawn from its answers (matplotlib), for the monitoring end-to-end test."""

from __future__ import annotations

import contextlib
import importlib.util
import json
import math
import shutil
import subprocess
import sys
import time
import urllib.parse
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any

import yaml

from tests.helpers import free_port, stop_tree, wait_for

MONITORING = Path(__file__).parents[2] / "deploy" / "monitoring"


def load_dashboard() -> ModuleType:
    """deploy/monitoring/dashboard.py, which is a script, not a package module."""
    spec = importlib.util.spec_from_file_location("vgate_dashboard", MONITORING / "dashboard.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look themselves up there
    spec.loader.exec_module(module)
    return module


def fast_rules(source: Path, target: Path) -> None:
    """The alert rules as shipped, with every `for:` cut to nothing: promtool's tests cover
    the durations; here a real Prometheus shows the expressions fire on a real stack."""
    rules = yaml.safe_load(source.read_text())
    for group in rules["groups"]:
        for rule in group["rules"]:
            rule.pop("for", None)
    target.write_text(yaml.safe_dump(rules))


@dataclass
class Prometheus:
    url: str

    def api(self, path: str, **params: str) -> Any:
        query = urllib.parse.urlencode(params)
        with urllib.request.urlopen(f"{self.url}/api/v1/{path}?{query}", timeout=30) as resp:
            body = json.loads(resp.read())
        assert body["status"] == "success", body
        return body["data"]

    def series(self, expr: str, start: float, end: float, step: str = "1") -> list[dict]:
        """query_range's result: [{"metric": {...}, "values": [[t, "v"], ...]}, ...]."""
        data = self.api("query_range", query=expr, start=str(start), end=str(end), step=step)
        return data["result"]

    def firing(self) -> set[str]:
        alerts = self.api("alerts")["alerts"]
        return {a["labels"]["alertname"] for a in alerts if a["state"] == "firing"}


def finite(series: list[dict]) -> list[float]:
    return [float(v) for s in series for _, v in s["values"] if math.isfinite(float(v))]


@contextlib.contextmanager
def prometheus(work: Path, target: str, rules: Path) -> Iterator[Prometheus]:
    """Prometheus scraping `target` (host:port) every second, evaluating `rules`."""
    binary = shutil.which("prometheus") or "/usr/bin/prometheus"
    config = {
        "global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
        "rule_files": [str(rules)],
        "scrape_configs": [{"job_name": "vgate", "static_configs": [{"targets": [target]}]}],
    }
    (work / "prometheus.yml").write_text(yaml.safe_dump(config))
    port = free_port()
    log = (work / "prometheus.log").open("ab")
    proc = subprocess.Popen(
        [
            binary,
            f"--config.file={work / 'prometheus.yml'}",
            f"--storage.tsdb.path={work / 'tsdb'}",
            f"--web.listen-address=127.0.0.1:{port}",
        ],
        stdout=log,
        stderr=subprocess.STDOUT,
        process_group=0,
    )
    server = Prometheus(f"http://127.0.0.1:{port}")

    def ready() -> bool:
        assert proc.poll() is None, (work / "prometheus.log").read_text()[-2000:]
        with (
            contextlib.suppress(OSError),
            urllib.request.urlopen(server.url + "/-/ready", timeout=2) as resp,
        ):
            return resp.status == 200
        return False

    try:
        wait_for(ready, 60, "Prometheus to be ready")
        yield server
    finally:
        stop_tree(proc, grace_s=20)
        log.close()


def draw(server: Prometheus, dashboard: ModuleType, window: str, start: float, end: float,
         out: Path) -> None:  # fmt: skip
    """Every panel of the dashboard, as Grafana would draw it, from Prometheus's answers."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    specs = dashboard.panels()
    columns = 3
    rows = math.ceil(len(specs) / columns)
    fig, axes = plt.subplots(rows, columns, figsize=(5.2 * columns, 3.1 * rows), squeeze=False)
    for ax, spec in zip(axes.flat, specs, strict=False):
        for query in spec.queries:
            for s in server.series(query.expr.replace(dashboard.RATE, window), start, end):
                xs = [float(t) - start for t, _ in s["values"]]
                ys = [float(v) for _, v in s["values"]]
                label = query.legend
                for name, value in s["metric"].items():
                    label = label.replace("{{" + name + "}}", value)
                ax.plot(xs, ys, label=label[:40], linewidth=1.2)
        ax.set_title(f"{spec.title} ({spec.unit})", fontsize=10)
        ax.set_xlabel("seconds", fontsize=8)
        ax.tick_params(labelsize=7)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=6, loc="upper left")
    for ax in list(axes.flat)[len(specs) :]:
        ax.axis("off")
    day = time.strftime("%Y-%m-%d")
    fig.suptitle(f"vgate's dashboard from a real Prometheus scraping a stack under load ({day})")
    fig.tight_layout()
    fig.savefig(out, dpi=80)
    plt.close(fig)
