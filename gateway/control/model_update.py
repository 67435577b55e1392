"""/update_models: change the served models while the rest keep serving.

Run by gateway/control/update_models.py, in a process of its own, one at a time. It
reads Google's model config (gateway/control/model_config.py) and plans the change in
full before anything stops: each new model's flags through vLLM's parser, its names,
its place on the machine, its download; a config that cannot work is refused whole. It then prints
the plan as one JSON line (the route's answer) and carries it out:

1. the routing table gets the new set, the removed models' engines are marked
   draining: the monitor takes them out of nginx's upstream (a reload: requests in
   flight finish on the old workers), then they finish what they have, up to the
   stop grace, and supervisord stops and forgets them (reloadConfig,
   stopProcessGroup, removeProcessGroup: what `supervisorctl update` does);
2. the new models' engines are added to supervisord's programs and start; the
   monitor routes to each once it is ready, as at start.

Kept models' engines are never touched. Progress shows in /health, per model.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import sys
import time
import urllib.request
import xmlrpc.client
from collections.abc import Callable
from pathlib import Path

import orjson

from engine import placement
from engine.gcs import DownloadError, download
from engine.launch import exits_path
from engine.model_set import MODELS_FILE, ServedModel, load_models, save_models, spec_key
from engine.model_source import classify_model
from engine.placement import PlacementError
from engine.workers import EngineWorker, load_workers, save_workers
from gateway.config import Config, ConfigError
from gateway.control.engine_programs import program_name, write_engine_programs
from gateway.control.model_config import config_specs, read_config_file
from gateway.control.model_plan import engine_workers, place, serve_models
from gateway.control.monitor import Supervisor
from gateway.control.nginx_config import write_routing
from gateway.control.serve import free_loopback_ports, sequences_per_engine
from gateway.state import DRAINING, STATE_FILE

log = logging.getLogger("vgate.update")

ROUTED_OUT_S = 30.0  # for nginx to stop routing to the removed engines (a reload)
POLL_S = 0.5
REFUSED = 2  # exit code before the plan: the config cannot work


@dataclasses.dataclass(frozen=True)
class Plan:
    kept: list[ServedModel]
    added: list[ServedModel]
    removed: list[ServedModel]
    models: list[ServedModel]  # the new set, in the config's order
    workers: list[EngineWorker]  # the new engines

    def answer(self) -> dict[str, object]:
        return {
            "status": "success",
            "kept": [m.name for m in self.kept],
            "added": [m.name for m in self.added],
            "removed": [m.name for m in self.removed],
        }


def plan_update(
    config: Config,
    current: list[ServedModel],
    workers: list[EngineWorker],
    text: str,
    environ: dict[str, str],
) -> Plan:
    """What the config changes, checked in full; raises ConfigError or PlacementError."""
    specs = config_specs(text, {**environ, **config.engine_env})
    by_key = {spec_key(m.spec): m for m in current}
    kept, new_specs, order = [], [], []
    for spec in specs:
        same = by_key.pop(spec_key(spec), None)
        if same is not None:
            kept.append(same)
            order.append(same)
        else:
            new_specs.append(spec)
            order.append(None)
    removed = list(by_key.values())
    added, engines = (
        serve_models(new_specs, Path(config.download_dir), True) if new_specs else ([], [])
    )
    fresh = iter(added)
    models = [m if m is not None else next(fresh) for m in order]
    if not models:
        raise ConfigError("model config: lists no model")
    seen: dict[str, str] = {}
    for m in models:
        for name in m.names:
            if name in seen:
                raise ConfigError(f"two models are served as {name!r}: give each its own name")
            seen[name] = m.name
    if len(models) > 1 and config.routing != "prefix":
        raise ConfigError("several models need --routing prefix (nginx's Lua balancer)")
    if not added:
        return Plan(kept, [], removed, models, [])
    kept_names = {m.name for m in kept}
    if any(w.gpus for w in workers):  # GPUs: new models where the kept leave memory
        taken = [w.placement() for w in workers if w.model in kept_names]
        plans = place(config, added, engines, taken)
    elif len(models) == 1:
        plans = place(config, added, engines)
    else:  # CPU: the cores split by every model's share; the kept keep their own
        demands = [
            placement.ModelDemand(m.name, m.group, m.spec.replicas, m.spec.memory_share)
            for m in models
        ]
        whole = placement.plan_models(config.device, [], placement.usable_cpus(), demands)
        plans = [plan for m, plan in zip(models, whole, strict=True) if m.name not in kept_names]
    added = [
        dataclasses.replace(m, sequences=sequences_per_engine(e, plan[0]))
        for m, e, plan in zip(added, engines, plans, strict=True)
    ]
    new_workers = engine_workers(
        added,
        plans,
        free_loopback_ports(sum(len(p) for p in plans)),
        sys.executable,
        environ,
        config,
        taken={w.replica for w in workers},
        others=sum(w.model in kept_names for w in workers),
    )
    fresh = iter(added)
    models = [m if m.name in kept_names else next(fresh) for m in models]
    return Plan(kept, added, removed, models, new_workers)


def download_models(config: Config, models: list[ServedModel]) -> None:
    """The new gs:// models, fetched before anything changes (a failed fetch changes nothing)."""
    for m in models:
        if classify_model(m.spec.source).kind == "gcs":
            log.info("%s: downloading into %s", m.spec.source, m.model)
            download(m.spec.source or "", Path(m.model), workers=config.download_workers)


def _states(run_dir: Path) -> dict[int, str]:
    try:
        body = orjson.loads((run_dir / STATE_FILE).read_bytes())
        return {r["replica"]: r["state"] for r in body["replicas"]}
    except (OSError, ValueError, KeyError, TypeError):
        return {}


def wait_until(what: str, done: Callable[[], bool], deadline_s: float) -> bool:
    deadline = time.monotonic() + deadline_s
    while time.monotonic() < deadline:
        if done():
            return True
        time.sleep(POLL_S)
    log.warning("%s: not within %g s; going on", what, deadline_s)
    return False


def in_flight(worker: EngineWorker) -> float:
    """Requests the engine runs or holds (vLLM's own gauges); 0 when it does not answer."""
    try:
        with urllib.request.urlopen(worker.url + "/metrics", timeout=5) as resp:
            text = resp.read().decode()
    except OSError:
        return 0.0
    return sum(
        float(line.rsplit(" ", 1)[1])
        for line in text.splitlines()
        if line.startswith(("vllm:num_requests_running{", "vllm:num_requests_waiting{"))
    )


def apply(plan: Plan, config: Config, run_dir: Path, supervisor: Supervisor) -> None:
    """Carry the plan out: the removed drained and stopped, then the new started."""
    workers = load_workers(run_dir / "engines.json")
    gone = {m.name for m in plan.removed}
    draining = [w for w in workers if w.model in gone]
    save_models(plan.models, run_dir / MODELS_FILE)
    write_routing(run_dir, config.routing, plan.models, config.engine)
    if draining:
        marked = [dataclasses.replace(w, draining=w.model in gone) for w in workers]
        save_workers(marked, run_dir / "engines.json")
        out = {w.replica for w in draining}
        wait_until(
            "nginx to stop routing to the removed models",
            lambda: all(_states(run_dir).get(r) == DRAINING for r in out),
            ROUTED_OUT_S,
        )
        wait_until(
            "the removed models' requests to finish",
            lambda: all(in_flight(w) == 0 for w in draining),
            config.stop_grace,
        )
        workers = [w for w in workers if w.model not in gone]
        write_engine_programs(workers, run_dir)
        supervisor.reload_config()
        for w in draining:
            supervisor.remove_program(program_name(w.replica))
        save_workers(workers, run_dir / "engines.json")
        log.info("removed %s", ", ".join(sorted(gone)))
    if plan.workers:
        for w in plan.workers:
            exits_path(run_dir, w.replica).unlink(missing_ok=True)
        workers = workers + plan.workers
        save_workers(workers, run_dir / "engines.json")
        write_engine_programs(workers, run_dir)
        supervisor.reload_config()
        for w in plan.workers:
            supervisor.add_program(program_name(w.replica))
        log.info("started %s", ", ".join(m.name for m in plan.added))


def run(config_path: str, run_dir: Path) -> int:
    """Plan, answer (one JSON line on stdout), carry out; the exit code says how it went."""
    started = time.monotonic()
    log.info("update of the models from %s", config_path)
    config = Config.load(run_dir / "config.json")
    try:
        text = read_config_file(config_path)
        current = load_models(run_dir / MODELS_FILE)
        workers = load_workers(run_dir / "engines.json")
        plan = plan_update(config, current, workers, text, dict(os.environ))
        download_models(config, plan.added)
    except (ConfigError, PlacementError, DownloadError) as e:
        return refuse(REFUSED, str(e))
    answer = plan.answer()
    log.info("update planned in %.1f s: %s", time.monotonic() - started, json.dumps(answer))
    print(json.dumps(answer), flush=True)
    sys.stdout.close()  # the route has its answer; the rest shows in /health and the log
    try:
        apply(plan, config, run_dir, Supervisor(run_dir))
    except (OSError, xmlrpc.client.Error) as e:
        log.error("update not carried out in full: %r", e)
        return 1
    log.info("update carried out in %.1f s (new engines start now)", time.monotonic() - started)
    return 0


def refuse(code: int, message: str) -> int:
    log.error("update refused: %s", message)
    print(json.dumps({"status": "error", "message": message}), flush=True)
    return code
