"""One Prometheus view of the container: the gateway's own metrics plus every engine's.

The gateway workers share their metrics through prometheus_client's
multiprocess mode (PROMETHEUS_MULTIPROC_DIR, set by `vgate serve`); each engine's
own /metrics is fetched at scrape time and relabelled with `replica="<i>"`.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

import aiohttp
from aiohttp import web
from aiohttp.typedefs import Handler
from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
    multiprocess,
)
from prometheus_client.metrics_core import GaugeMetricFamily, Metric
from prometheus_client.parser import text_string_to_metric_families

from engine.workers import EngineWorker
from gateway.front_metrics import FRONT_METRICS_URL, front_families
from gateway.run_metrics import download_families, lora_cache_families, restarts_family
from gateway.state import READY, ReplicaState

REQUESTS = Counter("vgate_requests", "Requests answered by the gateway", ["route", "status"])
LATENCY = Histogram(
    "vgate_request_duration_seconds",
    "Time to answer a request, by route",
    ["route"],
    buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600),
)
IN_FLIGHT = Gauge(
    "vgate_requests_in_flight",
    "Requests being answered, by route",
    ["route"],
    multiprocess_mode="livesum",
)
UPSTREAM_ERRORS = Counter(
    "vgate_upstream_errors", "Failed calls from the gateway to the engines", ["kind"]
)
SCRAPE_TIMEOUT_S = 2.0


@web.middleware
async def track_requests(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Counts, times and tracks in-flight requests by route name (bounded label values)."""
    resource = request.match_info.route.resource
    route = resource.canonical if resource is not None else "unmatched"
    start = time.perf_counter()
    status = 500
    IN_FLIGHT.labels(route).inc()
    try:
        response = await handler(request)
        status = response.status
        return response
    except asyncio.CancelledError:
        status = 499  # the client went away (nginx's code for it)
        raise
    finally:
        IN_FLIGHT.labels(route).dec()
        REQUESTS.labels(route, str(status)).inc()
        LATENCY.labels(route).observe(time.perf_counter() - start)


# vLLM labels it with the names of the adapters running and waiting: clients choose
# them, and each mix is a new series that is never removed.
LORA_INFO = "vllm:lora_requests_info"


def relabel(text: str, replica: int, model: str = "") -> list[Metric]:
    """Parse one engine's exposition and add replica="<i>" to every sample (vLLM's own
    carry their model_name)."""
    families = []
    for family in text_string_to_metric_families(text):
        if family.name == LORA_INFO:
            families += _lora_counts(family, replica, model)
            continue
        family.samples = [
            s._replace(labels={**s.labels, "replica": str(replica)}) for s in family.samples
        ]
        families.append(family)
    return families


def _lora_counts(family: Metric, replica: int, model: str) -> list[Metric]:
    """How many adapters have running and waiting requests now (the newest series),
    not which: bounded labels, and no tenant sees another's adapter names."""
    latest = max(family.samples, key=lambda s: s.value, default=None)
    counts = []
    for kind in ("running", "waiting"):
        names = latest.labels.get(f"{kind}_lora_adapters", "") if latest else ""
        gauge = GaugeMetricFamily(
            f"vgate_lora_adapters_{kind}",
            f"LoRA adapters with {kind} requests",
            labels=["replica", "model"],
        )
        gauge.add_metric([str(replica), model], len([n for n in names.split(",") if n]))
        counts.append(gauge)
    return counts


def merge(families: Iterable[Metric]) -> list[Metric]:
    """One family per name: Prometheus's text format wants a family's samples together."""
    merged: dict[str, Metric] = {}
    for family in families:
        if family.name in merged:
            merged[family.name].samples.extend(family.samples)
        else:
            merged[family.name] = family
    return list(merged.values())


def replica_ready_family(replicas: list[ReplicaState]) -> Metric:
    family = GaugeMetricFamily(
        "vgate_replica_ready",
        "1 when the engine replica is ready",
        labels=["replica", "device", "model"],
    )
    for r in replicas:
        family.add_metric([str(r.replica), r.device, r.model], 1.0 if r.state == READY else 0.0)
    return family


# vLLM's queue, one series per engine; the HPA reads one series per pod.
ENGINE_WAITING = "vllm:num_requests_waiting"


def queue_family(engine_families: list[Metric]) -> Metric:
    """Requests waiting in every engine of this pod, summed: what a per-pod autoscaler reads
    (a Pods metric needs one series per pod; an engine that did not answer adds nothing)."""
    waiting = sum(
        s.value
        for f in engine_families
        if f.name == ENGINE_WAITING
        for s in f.samples
        if s.name == ENGINE_WAITING
    )
    family = GaugeMetricFamily(
        "vgate_requests_waiting", "requests waiting in this pod's engines, summed"
    )
    family.add_metric([], waiting)
    return family


class _Families:
    """A collector that yields families we already hold."""

    def __init__(self, families: list[Metric]):
        self._families = families

    def collect(self) -> list[Metric]:
        return self._families


async def fetch_text(session: aiohttp.ClientSession, url: str) -> str:
    """An exposition's text; empty if it did not come in time."""
    try:
        async with session.get(url, timeout=aiohttp.ClientTimeout(total=SCRAPE_TIMEOUT_S)) as resp:
            if resp.status != 200:
                raise aiohttp.ClientError(f"status {resp.status}")
            return await resp.text()
    except (aiohttp.ClientError, TimeoutError):
        UPSTREAM_ERRORS.labels("metrics_scrape").inc()
        return ""


@dataclass(frozen=True)
class Sources:
    """Where the container's figures come from, besides the engines."""

    run_dir: Path
    lora_cache: tuple[Path, int] | None  # the adapters' disk cache and its budget


def render(
    texts: dict[int, str], replicas: list[ReplicaState], front: str, sources: Sources
) -> bytes:
    """The engines' texts, relabelled and merged, with the front door's and vgate's own."""
    registry = CollectorRegistry()
    multiprocess.MultiProcessCollector(registry)
    models = {r.replica: r.model for r in replicas}
    engine_families = merge(
        f for replica, text in texts.items() for f in relabel(text, replica, models[replica])
    )
    own = [replica_ready_family(replicas), queue_family(engine_families)]
    own.append(restarts_family(sources.run_dir, models))
    own += download_families(sources.run_dir)
    if sources.lora_cache is not None:
        own += lora_cache_families(*sources.lora_cache)
    registry.register(_Families([*own, *front_families(front), *engine_families]))
    return generate_latest(registry)


async def exposition(
    direct: aiohttp.ClientSession,
    internal: aiohttp.ClientSession,
    workers: list[EngineWorker],
    replicas: list[ReplicaState],
    sources: Sources,
) -> bytes:
    """The whole container's metrics, in Prometheus's text format.

    Parsing and rendering take tens of milliseconds: in a thread, so the loop keeps
    serving requests and probes meanwhile (review M11).
    """
    # A starting engine accepts connections but answers nothing until it is ready.
    ready = {r.replica for r in replicas if r.state == READY}
    scraped = [w for w in workers if w.replica in ready]
    front, *texts = await asyncio.gather(
        fetch_text(internal, FRONT_METRICS_URL),
        *(fetch_text(direct, w.url + "/metrics") for w in scraped),
    )
    by_replica = {w.replica: text for w, text in zip(scraped, texts, strict=True)}
    return await asyncio.to_thread(render, by_replica, replicas, front, sources)


class SingleFlight:
    """Callers that arrive while a scrape of the engines runs share it.

    So however many scrape /metrics at once, each engine sees one scrape in flight
    per gateway worker, and the serving loop merges one answer; a caller that comes
    after it finished starts a fresh one, so figures are never older than a scrape.
    """

    def __init__(self, make: Callable[[], Awaitable[bytes]]) -> None:
        self._make = make
        self._running: asyncio.Future[bytes] | None = None

    async def get(self) -> bytes:
        if self._running is None:
            self._running = asyncio.ensure_future(self._make())
            self._running.add_done_callback(self._finished)
        return await asyncio.shield(self._running)  # a caller that leaves stops nobody else

    def _finished(self, _: asyncio.Future[bytes]) -> None:
        self._running = None


def add_route(app: web.Application) -> None:
    """/metrics: the whole container's, one engine scrape at a time per worker."""
    config = app["config"]
    lora_cache = (Path(config.lora_cache_dir), config.lora_cache_bytes)
    sources = Sources(app["run_dir"], lora_cache if config.engine.enable_lora else None)
    flight = SingleFlight(
        lambda: exposition(
            app["direct_session"],
            app["engine_session"],
            app["engines"].workers(),
            app["state"].replicas(),
            sources,
        )
    )

    async def metrics_handler(_: web.Request) -> web.Response:
        body = await flight.get()
        return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})

    app.router.add_get("/metrics", metrics_handler)
