"""Makes a JSON Schema for check-jsonschema from a CRD's YAML (see README.md here).

usage: python deploy/gke/schemas/from_crd.py CRD.yaml VERSION OUT.json
"""

from __future__ import annotations

import json
import sys
from typing import Any

import yaml


def strict(node: Any) -> None:
    """Unknown fields are errors, as with the API server's strict field validation,
    except where the CRD preserves them."""
    if isinstance(node, dict):
        if (
            node.get("type") == "object"
            and "properties" in node
            and not node.get("x-kubernetes-preserve-unknown-fields")
            and "additionalProperties" not in node
        ):
            node["additionalProperties"] = False
        for value in node.values():
            strict(value)
    elif isinstance(node, list):
        for value in node:
            strict(value)


def from_crd(crd: dict[str, Any], version: str) -> dict[str, Any]:
    served = next(v for v in crd["spec"]["versions"] if v["name"] == version)
    schema = served["schema"]["openAPIV3Schema"]
    group, kind = crd["spec"]["group"], crd["spec"]["names"]["kind"]
    properties = schema.setdefault("properties", {})
    properties["apiVersion"] = {"const": f"{group}/{version}", "type": "string"}
    properties["kind"] = {"const": kind, "type": "string"}
    properties["metadata"] = {"type": "object"}
    strict(schema)
    required = set(schema.get("required", [])) | {"apiVersion", "kind", "metadata", "spec"}
    return {
        "$schema": "http://json-schema.org/draft-07/schema#",
        "title": f"{kind} ({group}/{version})",
        **schema,
        "required": sorted(required),
    }


if __name__ == "__main__":
    source, version, out = sys.argv[1:4]
    with open(source) as f:
        schema = from_crd(yaml.safe_load(f), version)
    with open(out, "w") as f:
        json.dump(schema, f, sort_keys=True, separators=(",", ":"))
