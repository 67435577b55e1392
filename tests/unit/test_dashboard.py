"""The Grafana dashboard: built by its script (grafana-foundation-sdk), committed as built,
every query valid PromQL (promtool checks them as recording rules). The end-to-end test
(tests/e2e/test_monitoring.py) runs them against a real Prometheus."""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import yaml

from tests.e2e.prometheus import MONITORING, load_dashboard


def _promtool() -> str:
    found = shutil.which("promtool") or "/usr/bin/promtool"
    assert Path(found).exists(), "promtool: deploy/install.sh --extras cpu,test installs it"
    return found


def test_the_committed_json_is_what_the_script_builds() -> None:
    assert (MONITORING / "dashboard.json").read_text() == load_dashboard().render()


def test_every_panel_has_queries_with_a_unit_and_is_in_the_json() -> None:
    dashboard = load_dashboard()
    board = json.loads((MONITORING / "dashboard.json").read_text())
    exprs = {t["expr"] for p in board["panels"] for t in p.get("targets") or []}
    for spec in dashboard.panels():
        assert spec.queries and spec.unit, spec.title
        assert {q.expr for q in spec.queries} <= exprs, spec.title
    titles = {p["title"] for p in board["panels"]}
    for needed in ("Throughput", "Time to first token", "Inter-token latency", "Queue"):
        assert needed in titles
    assert all(p["datasource"]["uid"] == "${datasource}" for p in board["panels"] if "targets" in p)


def test_every_query_is_valid_promql(tmp_path: Path) -> None:
    dashboard = load_dashboard()
    exprs = [q.expr.replace(dashboard.RATE, "1m") for s in dashboard.panels() for q in s.queries]
    rules = [{"record": f"vgate:dashboard_query_{i}", "expr": e} for i, e in enumerate(exprs)]
    path = tmp_path / "queries.yaml"
    path.write_text(yaml.safe_dump({"groups": [{"name": "dashboard", "rules": rules}]}))
    result = subprocess.run(
        [_promtool(), "check", "rules", str(path)], capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stdout + result.stderr
