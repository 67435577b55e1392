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
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
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
UNLOAD_TIMEOUT_S = 5.0  # an engine that has not answered an unload by then may hold it
_unpinning: set[asyncio.Task] = set()
# vgate's blocking work, off vLLM's default executor (which vLLM uses too), and fetches
# apart from the short calls, so that long downloads never hold up an unpin or eviction.
_FETCHES = ThreadPoolExecutor(4, thread_name_prefix="vgate-lora-fetch")
_CALLS = ThreadPoolExecutor(2, thread_name_prefix="vgate-lora-calls")


def poll_delays(total_s: float, first_s: float = 0.25) -> list[float]:
    """Waits between looks for a loaded adapter, each twice the last, summing to total_s:
    a load is seen soon, and one that never comes costs a few calls, not one per 0.5 s."""
    delays: list[float] = []
    while sum(delays) + first_s * 2 ** len(delays) < total_s:
        delays.append(first_s * 2 ** len(delays))
    return [*delays, total_s - sum(delays)]


def _engine_urls() -> list[str]:
    from engine.workers import load_workers

    run_dir = os.environ.get("VGATE_RUN_DIR")
    return [w.url for w in load_workers(Path(run_dir) / "engines.json")] if run_dir else []


def loaded_adapters() -> set[str]:
    """Adapters any engine of this container has loaded now (from each one's /v1/models)."""
    names: set[str] = set()
    for url in _engine_urls():
        try:
            with urllib.request.urlopen(url + "/v1/models", timeout=5) as resp:
                models = json.load(resp)["data"]
        except (OSError, ValueError, KeyError):
            continue  # a down engine has nothing loaded
        names |= {m["id"] for m in models if m.get("parent")}
    return names


def unload_everywhere(name: str) -> bool:
    """Every engine forgets the adapter, over loopback; False if one may still hold it.

    vLLM keeps every adapter it resolved by name and reads its files again whenever it
    reloads it, so the files may go only once no engine has the name: then its next
    request asks the resolver again. An engine that does not answer in time may hold
    it (fail closed); one that refuses the connection has nothing loaded.
    """
    body = json.dumps({"lora_name": name}).encode()
    for url in _engine_urls():
        request = urllib.request.Request(
            url + "/v1/unload_lora_adapter", body, {"Content-Type": "application/json"}
        )
        try:
            urllib.request.urlopen(request, timeout=UNLOAD_TIMEOUT_S).close()
        except urllib.error.HTTPError as e:
            e.close()
            if e.code != 404:  # 404: it never had it
                log.warning("adapter %r: engine %s did not unload it (%s)", name, url, e.code)
                return False
        except urllib.error.URLError as e:
            if not isinstance(e.reason, ConnectionRefusedError):
                log.warning("adapter %r: engine %s did not answer (%s)", name, url, e.reason)
                return False
        except OSError as e:
            log.warning("adapter %r: engine %s did not answer (%s)", name, url, e)
            return False
    return True


def register() -> None:
    """The plugin entry point; vLLM may call it in several processes: register once each."""
    cache = cache_from_env(unload_everywhere)
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
                log.warning("%r", str(e))
                return None  # vLLM answers 404 naming the model
            pin = cache.pinned(lora_name)
            try:
                path = await asyncio.get_running_loop().run_in_executor(_FETCHES, pin.__enter__)
            except (AdapterError, OSError) as e:
                log.warning("%r", str(e))
                return None  # vLLM answers 404 naming the model
            # vLLM reads the files after this returns: keep the pin until it has them.
            unpin = asyncio.get_running_loop().create_task(_unpin_when_loaded(pin, lora_name))
            _unpinning.add(unpin)  # the loop keeps only a weak reference to a task
            unpin.add_done_callback(_unpinning.discard)
            # vLLM sets the id.
            return LoRARequest(lora_name=lora_name, lora_int_id=1, lora_path=str(path))

    return VgateResolver()


async def _unpin_when_loaded(pin: contextlib.AbstractContextManager, name: str) -> None:
    loop = asyncio.get_running_loop()
    try:
        for delay in poll_delays(PIN_AFTER_RESOLVE_S):
            await asyncio.sleep(delay)
            if name in await loop.run_in_executor(_CALLS, loaded_adapters):
                break
    finally:
        await loop.run_in_executor(_CALLS, pin.__exit__, None, None, None)
