"""vgate's Grafana dashboard, built with grafana-foundation-sdk.

`python deploy/monitoring/dashboard.py` writes dashboard.json next to this file;
`--check` exits 1 when the file is not what this builds. The panels are data
(`ROWS`): the end-to-end test runs every query against a real Prometheus scraping
a stack, and `make dashboard-png` draws them from that Prometheus's answers.

Queries that count events which may not have happened yet (429s, 5xx) add `or ...
* 0`, so a quiet deployment shows 0 rather than "No data".
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass
from pathlib import Path

from grafana_foundation_sdk.builders.dashboard import (
    Dashboard,
    DatasourceVariable,
    Row,
)
from grafana_foundation_sdk.builders.prometheus import Dataquery
from grafana_foundation_sdk.builders.timeseries import Panel
from grafana_foundation_sdk.cog.encoder import JSONEncoder
from grafana_foundation_sdk.models.dashboard import DataSourceRef

OUT = Path(__file__).with_name("dashboard.json")
RATE = "$__rate_interval"  # Grafana's; the tests put a fixed window in its place
DATASOURCE = DataSourceRef(type_val="prometheus", uid="${datasource}")
SURFACES = 'surface=~"openai|vertex"'


@dataclass(frozen=True)
class Query:
    expr: str
    legend: str


@dataclass(frozen=True)
class PanelSpec:
    title: str
    unit: str
    queries: tuple[Query, ...]
    description: str = ""


def _quantiles(
    metric: str, by: str = "", selector: str = "", qs: tuple[float, ...] = (0.5, 0.9, 0.99)
) -> tuple[Query, ...]:
    group = f"{by}, le" if by else "le"
    legend = f"{{{{{by}}}}} " if by else ""
    series = f"{metric}_bucket{{{selector}}}" if selector else f"{metric}_bucket"
    return tuple(
        Query(
            f"histogram_quantile({q}, sum by ({group}) (rate({series}[{RATE}])))",
            f"{legend}p{round(q * 100)}",
        )
        for q in qs
    )


def _share_or_zero(selector: str) -> str:
    """Requests per second matching `selector`, by surface; 0 while there are none."""
    every = f"sum by (surface) (rate(vgate_http_requests_total{{{SURFACES}}}[{RATE}]))"
    return (
        f"sum by (surface) (rate(vgate_http_requests_total{{{SURFACES},{selector}}}[{RATE}]))"
        f" or {every} * 0"
    )


ROWS: list[tuple[str, list[PanelSpec]]] = [
    (
        "Traffic",
        [
            PanelSpec(
                "Throughput",
                "short",
                (
                    Query(f"sum(rate(vllm:generation_tokens_total[{RATE}]))", "output tokens/s"),
                    Query(f"sum(rate(vllm:prompt_tokens_total[{RATE}]))", "prompt tokens/s"),
                ),
                "Tokens per second over every engine.",
            ),
            PanelSpec(
                "Requests by surface and status",
                "reqps",
                (
                    Query(
                        "sum by (surface, status) "
                        f"(rate(vgate_http_requests_total{{{SURFACES}}}[{RATE}]))",
                        "{{surface}} {{status}}",
                    ),
                ),
                "Counted at the front door: OpenAI routes and predict alike.",
            ),
            PanelSpec(
                "429s and errors by surface",
                "reqps",
                (
                    Query(_share_or_zero('status="429"'), "{{surface}} 429"),
                    Query(_share_or_zero('status=~"5.."'), "{{surface}} 5xx"),
                ),
                "429: over --max-inflight. 5xx: no engine ready, deadlines, engine errors.",
            ),
        ],
    ),
    (
        "Latency",
        [
            PanelSpec(
                "Time to first token",
                "s",
                _quantiles("vllm:time_to_first_token_seconds", "model_name"),
                "vLLM's own histogram, every engine, by model.",
            ),
            PanelSpec(
                "Inter-token latency",
                "s",
                _quantiles("vllm:inter_token_latency_seconds", "model_name"),
                "vLLM's own histogram, every engine, by model.",
            ),
            PanelSpec(
                "Front-door first byte by surface",
                "s",
                _quantiles("vgate_http_first_byte_seconds", "surface", SURFACES, (0.5, 0.99)),
                "Time to the answer's first byte at nginx (for a stream, its first event).",
            ),
        ],
    ),
    (
        "Capacity",
        [
            PanelSpec(
                "Queue",
                "short",
                (
                    Query("sum(vgate_requests_waiting)", "waiting (the HPA's metric)"),
                    Query(
                        "sum by (model_name) (vllm:num_requests_running)",
                        "{{model_name}} running",
                    ),
                ),
                "Requests waiting in the engines (per pod: what the HPA scales on) and running.",
            ),
            PanelSpec(
                "KV cache usage by replica",
                "percentunit",
                (
                    Query(
                        "max by (model_name, replica) (vllm:kv_cache_usage_perc)",
                        "{{model_name}} replica {{replica}}",
                    ),
                ),
                "Above 95% for long, requests queue or get preempted.",
            ),
            PanelSpec(
                "Replicas ready and restarts",
                "short",
                (
                    Query("sum by (model) (vgate_replica_ready)", "{{model}} replicas ready"),
                    Query(
                        f"sum by (model) (increase(vgate_engine_restarts_total[{RATE}]))",
                        "{{model}} restarts",
                    ),
                ),
                "Ready replicas of each model; restarts are unexpected engine exits.",
            ),
        ],
    ),
    (
        "Models",
        [
            PanelSpec(
                "LoRA adapter cache",
                "bytes",
                (
                    Query("sum(vgate_lora_cache_bytes)", "on disk"),
                    Query("max(vgate_lora_cache_budget_bytes)", "budget"),
                ),
                "Adapters fetched for dynamic-lora and OpenAI model names, against the budget.",
            ),
            PanelSpec(
                "Model download",
                "percentunit",
                (
                    Query(
                        'vgate_model_download_bytes{kind="done"} / ignoring(kind) '
                        'vgate_model_download_bytes{kind="total"}',
                        "{{instance}}",
                    ),
                ),
                "Share of the gs:// model mirrored, per pod.",
            ),
        ],
    ),
]


def panels() -> list[PanelSpec]:
    return [panel for _, row in ROWS for panel in row]


def build() -> Dashboard:
    board = (
        Dashboard("vgate")
        .uid("vgate")
        .tags(["vgate", "vllm"])
        .refresh("30s")
        .time("now-1h", "now")
        .with_variable(DatasourceVariable("datasource").label("Data source").type("prometheus"))
    )
    for title, row in ROWS:
        board = board.with_row(Row(title))
        for spec in row:
            panel = Panel().title(spec.title).unit(spec.unit).description(spec.description)
            panel = panel.datasource(DATASOURCE).height(8).span(8)
            for query in spec.queries:
                panel = panel.with_target(
                    Dataquery().expr(query.expr).legend_format(query.legend).datasource(DATASOURCE)
                )
            board = board.with_panel(panel)
    return board


def render() -> str:
    return JSONEncoder(sort_keys=True, indent=2).encode(build().build()) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="exit 1 if dashboard.json is stale")
    args = parser.parse_args(argv)
    text = render()
    if args.check:
        if OUT.read_text() != text:
            print(f"{OUT} is stale: run python {Path(__file__)}", file=sys.stderr)
            return 1
        return 0
    OUT.write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
