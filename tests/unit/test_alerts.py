"""The alert rules: valid for promtool, passing their unit tests (deploy/monitoring/
alerts_test.yaml: each alert fires, stays silent on healthy series and waits out its
`for:`), every alert among them, and the two Kubernetes wrappers generated from them
(rules.py) up to date and valid against their CRDs' schemas (deploy/monitoring/schemas)."""

from __future__ import annotations

import importlib.util
import shutil
import subprocess
import sys
from pathlib import Path
from types import ModuleType

import pytest
import yaml

MONITORING = Path(__file__).resolve().parents[2] / "deploy" / "monitoring"
ALERTS = MONITORING / "alerts.yaml"
TESTS = MONITORING / "alerts_test.yaml"
# wrapper -> the JSON Schema made from its CRD (see deploy/monitoring/schemas/README.md)
WRAPPERS = {
    "gmp-rules.yaml": MONITORING / "schemas" / "rules-v1.json",
    "prometheus-rule.yaml": MONITORING / "schemas" / "prometheusrule-v1.json",
}


def _promtool() -> str:
    found = shutil.which("promtool") or "/usr/bin/promtool"
    if not Path(found).is_file():
        pytest.fail(
            "promtool not found (on PATH or /usr/bin): deploy/install.sh --extras cpu,test "
            "installs it (Debian's prometheus package)"
        )
    return found


def _promtool_run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [_promtool(), *args], capture_output=True, text=True, timeout=120, cwd=MONITORING
    )


def _check_jsonschema(schema: Path, path: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "check_jsonschema", "--schemafile", str(schema), str(path)],
        capture_output=True,
        text=True,
        timeout=120,
    )


def _alerts(path: Path = ALERTS) -> list[dict]:
    return [r for g in yaml.safe_load(path.read_text())["groups"] for r in g["rules"]]


def _rules_script() -> ModuleType:
    spec = importlib.util.spec_from_file_location("vgate_monitoring_rules", MONITORING / "rules.py")
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_promtool_checks_the_rules() -> None:
    check = _promtool_run("check", "rules", str(ALERTS))
    assert check.returncode == 0, check.stdout + check.stderr


def test_the_rules_pass_their_unit_tests() -> None:
    test = _promtool_run("test", "rules", str(TESTS))
    assert test.returncode == 0, test.stdout + test.stderr


def test_every_alert_has_tests_that_make_it_fire_and_keep_it_silent() -> None:
    names = [r["alert"] for r in _alerts()]
    assert len(names) == len(set(names))
    cases = [
        case
        for test in yaml.safe_load(TESTS.read_text())["tests"]
        for case in test["alert_rule_test"]
    ]
    fired = {c["alertname"] for c in cases if c.get("exp_alerts")}
    silent = {c["alertname"] for c in cases if not c.get("exp_alerts")}
    assert set(names) - fired == set(), "alerts no test makes fire"
    assert set(names) - silent == set(), "alerts no test expects silent"
    assert fired | silent <= set(names), "tests of alerts that do not exist"
    for case in cases:  # a firing alert's labels and annotations are all checked
        for alert in case.get("exp_alerts") or []:
            assert {"severity", "instance"} <= set(alert["exp_labels"]), case["alertname"]
            assert {"summary", "description"} <= set(alert["exp_annotations"]), case["alertname"]


def test_the_unit_tests_hold_each_alert_to_its_for(tmp_path: Path) -> None:
    """Without its `for:`, every alert that has one fires early, and the tests say so."""
    rules = yaml.safe_load(ALERTS.read_text())
    waiting = set()
    for group in rules["groups"]:
        for rule in group["rules"]:
            if rule.pop("for", None):
                waiting.add(rule["alert"])
    assert waiting
    (tmp_path / ALERTS.name).write_text(yaml.safe_dump(rules))
    shutil.copy(TESTS, tmp_path / TESTS.name)
    test = subprocess.run(
        [_promtool(), "test", "rules", TESTS.name],
        capture_output=True, text=True, timeout=120, cwd=tmp_path,
    )  # fmt: skip
    assert test.returncode != 0
    for name in waiting:
        assert f"alertname: {name}," in test.stdout + test.stderr, name


def test_every_alert_says_how_bad_where_and_what_to_do() -> None:
    for rule in _alerts():
        name = rule["alert"]
        assert name.startswith("Vgate"), name
        assert rule["labels"]["severity"] in {"critical", "warning"}, name
        summary, description = rule["annotations"]["summary"], rule["annotations"]["description"]
        assert "{{ $labels.instance }}" in summary, name
        assert "{{ $labels.instance }}" in description, name
        assert len(description) > len(summary), name


def test_the_wrappers_are_what_rules_py_writes() -> None:
    rendered = _rules_script().render()
    assert set(rendered) == set(WRAPPERS)
    for name, text in rendered.items():
        assert (MONITORING / name).read_text() == text, (
            f"{name} is stale: run python deploy/monitoring/rules.py"
        )


@pytest.mark.parametrize("name", sorted(WRAPPERS))
def test_each_wrapper_holds_the_groups_and_fits_its_crd(name: str, tmp_path: Path) -> None:
    path = MONITORING / name
    doc = yaml.safe_load(path.read_text())
    assert doc["spec"]["groups"] == yaml.safe_load(ALERTS.read_text())["groups"]
    check = _check_jsonschema(WRAPPERS[name], path)
    assert check.returncode == 0, check.stdout + check.stderr
    # and the schema can fail: a misspelt field
    doc["spec"]["groups"][0]["rules"][0]["fro"] = doc["spec"]["groups"][0]["rules"][0].pop("for")
    bad = tmp_path / name
    bad.write_text(yaml.safe_dump(doc))
    assert _check_jsonschema(WRAPPERS[name], bad).returncode != 0
