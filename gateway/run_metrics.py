"""What the run dir says about the container, as Prometheus families: engine restarts by
replica (the launchers' exit records), the model download's progress, the LoRA cache's
use against its budget. Read at scrape time, in the render thread (small files)."""

from __future__ import annotations

import json
from pathlib import Path

from prometheus_client.metrics_core import CounterMetricFamily, GaugeMetricFamily, Metric

from engine.fetch_model import PROGRESS_FILE
from engine.launch import read_exits
from engine.lora_cache import AdapterCache


def restarts_family(run_dir: Path, replicas: dict[int, str]) -> Metric:
    """`replicas`: each replica's model."""
    family = CounterMetricFamily(
        "vgate_engine_restarts",
        "Times the engine replica exited without being asked to (and was restarted)",
        labels=["replica", "model"],
    )
    for replica, model in replicas.items():
        family.add_metric([str(replica), model], len(read_exits(run_dir, replica)))
    return family


def download_families(run_dir: Path) -> list[Metric]:
    """The model download's bytes and files, done and in all (nothing without one)."""
    try:
        progress = json.loads((run_dir / PROGRESS_FILE).read_text())
    except (OSError, ValueError):
        return []
    families = []
    for unit, kinds in (("bytes", ("done", "total")), ("files", ("done", "total", "reused"))):
        family = GaugeMetricFamily(
            f"vgate_model_download_{unit}", f"The model download's {unit}", labels=["kind"]
        )
        for kind in kinds:
            family.add_metric([kind], float(progress.get(f"{unit}_{kind}", 0)))
        families.append(family)
    return families


def lora_cache_families(cache_dir: Path, budget_bytes: int) -> list[Metric]:
    """Adapters on disk and their bytes, against the budget (--lora-cache-bytes)."""
    entries = AdapterCache(cache_dir, budget_bytes).entries() if cache_dir.is_dir() else []
    used = sum(f.stat().st_size for e in entries for f in e.rglob("*") if f.is_file())
    figures = (
        ("vgate_lora_cache_adapters", "LoRA adapters in the disk cache", len(entries)),
        ("vgate_lora_cache_bytes", "Bytes of LoRA adapters in the disk cache", used),
        ("vgate_lora_cache_budget_bytes", "The disk cache's budget", budget_bytes),
    )
    return [GaugeMetricFamily(name, text, value=float(value)) for name, text, value in figures]
