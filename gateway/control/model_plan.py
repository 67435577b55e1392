"""The models a configuration serves and the engines that serve them: for `vgate serve`
and for an update of the models (/update_models), the same checks in the same order.

Each model's engine flags are read by vLLM's own parser before anything starts (a
bad flag of any model is one line); names are checked for the routing; the
machine is split by placement (one model: its default plan; several: by their
shares). Nothing here starts a process.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable
from pathlib import Path

from engine import placement
from engine.demo_model import DEMO_MODEL_NAME
from engine.gcs import MODEL_CONFIG, list_objects, make_client
from engine.model_set import ModelSetError, ModelSpec, ServedModel, check_name, split_models
from engine.model_source import classify_model, local_model
from engine.vllm_args import EngineArgs, EngineArgsError, read_engine_args
from engine.workers import EngineWorker, build_workers, cpu_kv_budget, free_replicas, lora_env
from gateway.config import Config, ConfigError


def model_specs(config: Config) -> list[ModelSpec]:
    """The configuration's models, each with its own engine flags (Google's lists split)."""
    try:
        return split_models(
            config.models, config.engine_args, config.replicas, config.gpu_memory_partition
        )
    except ModelSetError as e:
        raise ConfigError(str(e)) from None


def read_flags(args: list[str], which: str = "") -> EngineArgs:
    """The engine flags as vLLM's parser reads them, or the one line it refuses them with."""
    try:
        engine = read_engine_args(args)
    except EngineArgsError as e:
        raise ConfigError(f"vLLM refuses the engine flags{which}: {e}") from None
    if engine.model_tag is not None:
        raise ConfigError(
            f"{engine.model_tag!r} is not a flag: give the model first "
            "(vgate serve MODEL ...) or as --model"
        )
    return engine


def serve_models(
    specs: list[ModelSpec], download_dir: Path, name_each: bool = False
) -> tuple[list[ServedModel], list[EngineArgs]]:
    """Each model checked, with its names and vLLM's view of its flags.

    A gs:// model's prefix is looked at now (it must hold a model), not fetched.
    `name_each`: errors name the model even when it is the only one.
    """
    models, engines = [], []
    for spec in specs:
        which = f" of {spec.source}" if len(specs) > 1 or name_each else ""
        engine = read_flags(spec.engine_args, which)
        source = classify_model(spec.source)
        if source.kind == "gcs":
            list_objects(make_client(), source.reference or "", required=MODEL_CONFIG)
        model = local_model(source, download_dir)
        # vgate's names where vLLM's would be a path: the demo's, a gs:// model's URI.
        default = {"demo": DEMO_MODEL_NAME, "gcs": spec.source}.get(source.kind) or model
        names = engine.served_model_name or [default]
        try:
            for name in names:
                check_name(name)
        except ModelSetError as e:
            raise ConfigError(str(e)) from None
        models.append(ServedModel(names[0], list(names), spec, model, engine.gpus_per_replica))
        engines.append(engine)
    seen: dict[str, str] = {}
    for m in models:
        for name in m.names:
            if name in seen:
                raise ConfigError(f"two models are served as {name!r}: give each its own name")
            seen[name] = m.name
    return models, engines


def place(
    config: Config,
    models: list[ServedModel],
    engines: list[EngineArgs],
    taken: Iterable[placement.Placement] = (),
) -> list[list[placement.Placement]]:
    """Each model's share of the machine: one model, its default plan; several, by share."""
    usable = placement.usable_cpus()
    gpus = placement.visible_gpus() if config.device != "cpu" else []
    if len(models) == 1 and not list(taken):
        engine, spec = engines[0], models[0].spec
        plan = placement.plan(
            config.device,
            gpus,
            usable,
            engine.gpus_per_replica,
            spec.replicas,
            ray=engine.spans_hosts,
            topology=placement.read_cpu_topology(),
        )
        if spec.memory_share is None or plan[0].device != "cuda":
            return [plan]
        fraction = spec.memory_share * len(gpus) / (len(plan) * engine.gpus_per_replica)
        return [[dataclasses.replace(p, memory=round(min(fraction, 1.0), 4)) for p in plan]]
    if any(e.spans_hosts for e in engines):
        raise ConfigError("--distributed-executor-backend ray serves one model per container")
    demands = [
        placement.ModelDemand(m.name, m.group, m.spec.replicas, m.spec.memory_share) for m in models
    ]
    return placement.plan_models(config.device, gpus, usable, demands, taken)


def shared_engine_env(config: Config, pinned_front: bool) -> dict[str, str]:
    """What every engine's environment has, whatever its model: Google's flags' settings,
    the LoRA cache's, the admission bounds, and every core back (`pinned_front`: vgate's
    own processes are pinned)."""
    env = lora_env(
        config.engine.enable_lora,
        config.lora_cache_dir,
        config.lora_cache_bytes,
        config.lora_max_bytes,
        config.lora_fetch_timeout,
        config.allowed_lora_sources,
    )
    # The engines refuse what no stack could admit (an OpenAI request's n, or its prompt
    # list, above --max-inflight), as the gateway does for predict.
    env["VLLM_MAX_N_SEQUENCES"] = env["VLLM_MAX_COMPLETION_PROMPTS"] = str(config.max_inflight)
    if pinned_front:
        env[placement.ENGINE_CPUS_ENV] = placement.cpu_list(placement.usable_cpus())
    return {**config.engine_env, **env}


def _names_itself(args: list[str]) -> bool:
    return any(a.split("=", 1)[0] == "--served-model-name" for a in args)


def engine_workers(
    models: list[ServedModel],
    plans: list[list[placement.Placement]],
    ports: list[int],
    python: str,
    environ: dict[str, str],
    config: Config,
    taken: Iterable[int] = (),
    others: int = 0,
) -> list[EngineWorker]:
    """The engines of `models`, numbered from the lowest replica numbers not `taken`.

    `config.engine_env`: every engine's environment (shared_engine_env); `others`: the
    engines that keep running beside these (an update's), which share the KV budget."""
    taken = set(taken)
    count = sum(len(p) for p in plans)
    replicas = iter(free_replicas(set(taken), count))
    ports_left = iter(ports)
    kv_budget = cpu_kv_budget(environ, count + others)
    workers: list[EngineWorker] = []
    for model, plan in zip(models, plans, strict=True):
        numbered = [dataclasses.replace(p, replica=next(replicas)) for p in plan]
        workers += build_workers(
            numbered,
            [next(ports_left) for _ in numbered],
            python,
            model.model,
            None if _names_itself(model.spec.engine_args) else model.name,
            [*model.spec.engine_args, *model.extra_args],
            environ,
            {**config.engine_env, **model.spec.env},
            name=model.name,
            kv_budget=kv_budget,
        )
    return workers
