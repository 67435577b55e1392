"""The GKE manifests, validated offline: core kinds against Kubernetes' own schema in
strict mode (kubernetes-validate: unknown fields are errors), CRD kinds against their
CRDs' schemas committed in deploy/gke/schemas (check-jsonschema), and every file
listed in a kustomization."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import kubernetes_validate
import pytest
import yaml

GKE = Path(__file__).resolve().parents[2] / "deploy" / "gke"
KUBERNETES = "1.33"  # GKE's regular channel
# kind -> the JSON Schema made from its CRD (see deploy/gke/schemas/README.md)
CRD_SCHEMAS = {
    "PodMonitoring": GKE / "schemas" / "podmonitoring-v1.json",
    "LeaderWorkerSet": GKE / "schemas" / "leaderworkerset-v1.json",
}
MANIFESTS = sorted(
    p for p in GKE.rglob("*.yaml") if p.name != "kustomization.yaml" and "schemas" not in p.parts
)


def _documents(path: Path) -> list[dict]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d]


@pytest.mark.parametrize("path", MANIFESTS, ids=lambda p: str(p.relative_to(GKE)))
def test_every_manifest_is_valid(path: Path) -> None:
    for doc in _documents(path):
        schema = CRD_SCHEMAS.get(doc["kind"])
        if schema is None:
            kubernetes_validate.validate(doc, KUBERNETES, strict=True)
            continue
        check = subprocess.run(
            [sys.executable, "-m", "check_jsonschema", "--schemafile", str(schema), str(path)],
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert check.returncode == 0, check.stdout + check.stderr


def test_every_manifest_is_in_a_kustomization_and_every_listed_file_exists() -> None:
    listed = set()
    for kustomization in GKE.rglob("kustomization.yaml"):
        for name in yaml.safe_load(kustomization.read_text())["resources"]:
            path = kustomization.parent / name
            assert path.is_file(), f"{kustomization}: {name} is missing"
            listed.add(path)
    assert listed == set(MANIFESTS)


def test_strict_validation_catches_a_typo() -> None:
    """The validators above can fail: a misspelt probe and a wrong CRD field."""
    deployment = _documents(GKE / "deployment.yaml")[0]
    container = deployment["spec"]["template"]["spec"]["containers"][0]
    container["readinessprobe"] = container.pop("readinessProbe")
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(deployment, KUBERNETES, strict=True)


def test_the_probes_and_grace_fit_vgate(tmp_path: Path) -> None:
    """Readiness on /ping, liveness on /live, and the grace above vgate's stop."""
    spec = _documents(GKE / "deployment.yaml")[0]["spec"]["template"]["spec"]
    (container,) = spec["containers"]
    assert container["readinessProbe"]["httpGet"]["path"] == "/ping"
    assert container["startupProbe"]["httpGet"]["path"] == "/ping"
    assert container["livenessProbe"]["httpGet"]["path"] == "/live"
    startup = container["startupProbe"]
    assert startup["periodSeconds"] * startup["failureThreshold"] >= 7200  # a 2 h download
    assert spec["terminationGracePeriodSeconds"] >= 30 + 15  # --stop-grace, then stops
    (dshm,) = [v for v in spec["volumes"] if v["name"] == "dshm"]
    assert dshm["emptyDir"]["medium"] == "Memory"
    bad = tmp_path / "podmonitoring.yaml"
    doc = _documents(GKE / "podmonitoring.yaml")[0]
    doc["spec"]["endpoints"][0]["intervall"] = "15s"
    bad.write_text(yaml.safe_dump(doc))
    check = subprocess.run(
        [sys.executable, "-m", "check_jsonschema", "--schemafile",
         str(CRD_SCHEMAS["PodMonitoring"]), str(bad)],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert check.returncode != 0


def test_the_adapter_cache_has_a_volume_of_its_own() -> None:
    """Adapters that clients name cannot fill the disk of the run dir and the model."""
    spec = _documents(GKE / "deployment.yaml")[0]["spec"]["template"]["spec"]
    (container,) = spec["containers"]
    (cache_dir,) = [
        a.split("=", 1)[1] for a in container["args"] if a.startswith("--lora-cache-dir=")
    ]
    (mount,) = [m for m in container["volumeMounts"] if m["mountPath"] == cache_dir]
    (volume,) = [v for v in spec["volumes"] if v["name"] == mount["name"]]
    others = [m["mountPath"] for m in container["volumeMounts"] if m is not mount]
    assert not any(cache_dir.startswith(p.rstrip("/") + "/") for p in others)
    assert volume["emptyDir"]["sizeLimit"]


def test_the_pod_runs_as_the_images_user_with_no_privilege_to_gain() -> None:
    """Review M13: non-root (the image's uid 10001), no capabilities, no escalation."""
    spec = _documents(GKE / "deployment.yaml")[0]["spec"]["template"]["spec"]
    assert spec["securityContext"]["runAsNonRoot"] is True
    assert spec["securityContext"]["runAsUser"] == 10001
    assert spec["securityContext"]["seccompProfile"]["type"] == "RuntimeDefault"
    (container,) = spec["containers"]
    assert container["securityContext"]["allowPrivilegeEscalation"] is False
    assert container["securityContext"]["capabilities"]["drop"] == ["ALL"]
