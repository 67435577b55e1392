"""The front door's requests on both surfaces, as nginx counted them (Lua, in shared
memory: gateway/control/nginx/vgate_front_metrics.lua), as Prometheus families.

nginx sees every request, the OpenAI routes it sends straight to the engines as well
as predict, and its own answers (429 over capacity, 503 with no engine, 401, 413), so
one set of counters covers both surfaces without passing OpenAI bodies through Python.
"""

from __future__ import annotations

import math
from collections import defaultdict

from prometheus_client.metrics_core import CounterMetricFamily, HistogramMetricFamily, Metric

FRONT_METRICS_URL = "http://engines/vgate/front-metrics"
LABELS = ["surface", "route"]
_HISTOGRAMS = {
    "latency": ("vgate_http_request_duration_seconds", "Time to answer, at the front door"),
    "first_byte": (
        "vgate_http_first_byte_seconds",
        "Time to the first byte of the answer, at the front door (a stream's first event)",
    ),
}


def _float(text: str) -> float:
    return math.inf if text == "+Inf" else float(text)


def front_families(text: str) -> list[Metric]:
    """Counters and histograms from nginx's "name|surface|route|label value" lines."""
    bounds: dict[str, list[str]] = {}
    requests = CounterMetricFamily(
        "vgate_http_requests", "Requests answered at the front door", labels=[*LABELS, "status"]
    )
    buckets: dict[str, dict[tuple[str, str], dict[str, float]]] = defaultdict(
        lambda: defaultdict(dict)
    )
    sums: dict[str, dict[tuple[str, str], float]] = defaultdict(dict)
    for line in text.splitlines():
        key, _, value = line.rpartition(" ")
        parts = key.split("|")
        if parts[0] == "bounds" and len(parts) == 2:
            bounds[parts[1]] = value.split(",")
        elif parts[0] == "requests" and len(parts) == 4:
            requests.add_metric(parts[1:], float(value))
        elif parts[0] in _HISTOGRAMS and len(parts) == 4:
            le = parts[3] if parts[3] == "+Inf" else repr(float(parts[3]))
            buckets[parts[0]][(parts[1], parts[2])][le] = float(value)
        elif parts[0].removesuffix("_sum") in _HISTOGRAMS and len(parts) == 3:
            sums[parts[0].removesuffix("_sum")][(parts[1], parts[2])] = float(value)
    families: list[Metric] = [requests]
    for name, (metric, help_text) in _HISTOGRAMS.items():
        family = HistogramMetricFamily(metric, help_text, labels=LABELS)
        les = [repr(float(b)) for b in bounds.get(name, [])] + ["+Inf"]
        for labels, counts in sorted(buckets[name].items()):
            total, cumulative = 0.0, []
            for le in les:  # every bucket, cumulative, as Prometheus wants them
                total += counts.get(le, 0.0)
                cumulative.append((le, total))
            family.add_metric(list(labels), cumulative, sums[name].get(labels, 0.0))
        families.append(family)
    return families
