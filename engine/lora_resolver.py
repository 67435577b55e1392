"""vLLM LoRA resolver plugin: an unknown model name that names an adapter gets it loaded.

vLLM calls registered resolvers when a request's `model` is neither the base
model nor a loaded adapter (with VLLM_ALLOW_RUNTIME_LORA_UPDATING, which
`vgate serve --enable-lora` sets). This one fetches the adapter into vgate's
shared disk cache (engine/lora_cache.py) and hands vLLM its path; vLLM loads
it and runs the request with it. Registered through the `vllm.general_plugins`
entry point (pyproject.toml), only where vgate configured a cache.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import urllib.request
from pathlib import Path

from engine.lora_cache import (
    AdapterCache,
    AdapterError,
    AdapterPolicy,
    cache_from_env,
    classify_adapter,
    policy_from_env,
)

log = logging.getLogger("vgate.lora")

# Longest an adapter stays pinned after resolving while vLLM loads it.
PIN_AFTER_RESOLVE_S = 60
_unpinning: set[asyncio.Task] = set()


def loaded_adapters() -> set[str]:
    """Adapters any engine of this container has loaded now (from each one's /v1/models)."""
    from engine.workers import load_workers

    names: set[str] = set()
    run_dir = os.environ.get("VGATE_RUN_DIR")
    if not run_dir:
        return names
    for worker in load_workers(Path(run_dir) / "engines.json"):
        try:
            with urllib.request.urlopen(worker.url + "/v1/models", timeout=5) as resp:
                models = json.load(resp)["data"]
        except (OSError, ValueError, KeyError):
            continue  # a down engine has nothing loaded
        names |= {m["id"] for m in models if m.get("parent")}
    return names


def register() -> None:
    """The plugin entry point; vLLM may call it in several processes: register once each."""
    cache = cache_from_env(loaded_adapters)
    if cache is None:
        return
    from vllm.lora.resolver import LoRAResolverRegistry

    if "vgate" not in LoRAResolverRegistry.get_supported_resolvers():
        LoRAResolverRegistry.register_resolver("vgate", _resolver(cache, policy_from_env()))


def _resolver(cache: AdapterCache, policy: AdapterPolicy) -> object:
    """vLLM's classes are imported here, in the engine, never in vgate's own processes."""
    from vllm.lora.request import LoRARequest
    from vllm.lora.resolver import LoRAResolver

    class VgateResolver(LoRAResolver):
        async def resolve_lora(self, base_model_name: str, lora_name: str) -> LoRARequest | None:
            try:
                policy.check(classify_adapter(lora_name))
            except AdapterError as e:
                log.warning("%s", e)
                return None  # vLLM answers 404 naming the model
            pin = cache.pinned(lora_name)
            try:
                path = await asyncio.to_thread(pin.__enter__)
            except (AdapterError, OSError) as e:
                log.warning("adapter %s: %s", lora_name, e)
                return None  # vLLM answers 404 naming the model
            # vLLM reads the files after this returns: keep the pin until it has them.
            unpin = asyncio.get_running_loop().create_task(_unpin_when_loaded(pin, lora_name))
            _unpinning.add(unpin)  # the loop keeps only a weak reference to a task
            unpin.add_done_callback(_unpinning.discard)
            # vLLM sets the id.
            return LoRARequest(lora_name=lora_name, lora_int_id=1, lora_path=str(path))

    return VgateResolver()


async def _unpin_when_loaded(pin: contextlib.AbstractContextManager, name: str) -> None:
    try:
        for _ in range(int(PIN_AFTER_RESOLVE_S / 0.5)):
            if name in await asyncio.to_thread(loaded_adapters):
                break
            await asyncio.sleep(0.5)
    finally:
        await asyncio.to_thread(pin.__exit__, None, None, None)
