"""What each engine worker runs: vLLM's own OpenAI server, its arguments and environment.

vgate depends on vLLM's CLI flags only; everything it does not know about is
passed through to every engine unchanged (engine.vllm_args has read and
checked them by then).
"""

from __future__ import annotations

import json
import logging
from dataclasses import asdict, dataclass, field
from pathlib import Path

from engine.files import write_atomic
from engine.lora_cache import POLICY_ENV
from engine.media_guard import CONNECTOR as MEDIA_CONNECTOR
from engine.placement import Placement, cpu_bind

log = logging.getLogger("vgate.engines")

# vLLM 0.32's server module; `vllm.entrypoints.openai.api_server` is its deprecated alias.
VLLM_SERVER_MODULE = "vllm.entrypoints.launchers.api_server.entry"
# GiB of KV cache per CPU engine unless the user set VLLM_CPU_KVCACHE_SPACE.
DEFAULT_CPU_KVCACHE_GIB = "1"
OMP_BIND_ENV = "VLLM_CPU_OMP_THREADS_BIND"
MEDIA_PER_PROMPT = {"image": 16, "audio": 16, "video": 1}
# Unless the operator set them: vLLM's media fetcher follows no redirect (an allowed URL
# must not lead elsewhere), uses vgate's connector (no internal address) and takes 20 MB
# per item (not 256); vLLM sends no usage statistics out of the container.
ENGINE_ENV_DEFAULTS = {
    "VLLM_MEDIA_URL_ALLOW_REDIRECTS": "0",
    "VLLM_MEDIA_CONNECTOR": MEDIA_CONNECTOR,
    "VLLM_MAX_MEDIA_DOWNLOAD_SIZE_MB": "20",
    "VLLM_NO_USAGE_STATS": "1",
}


@dataclass(frozen=True)
class EngineWorker:
    """Everything needed to exec one engine replica."""

    replica: int
    port: int
    device: str
    argv: list[str]
    env: dict[str, str] = field(default_factory=dict)
    cluster_gpus: int = 0  # multi-host: wait for the Ray cluster to hold this many
    model: str = ""  # the name of the model it serves (engine.model_set.ServedModel.name)
    draining: bool = False  # its model was removed: out of routing, stopped when idle
    gpus: list[int] = field(default_factory=list)  # what it holds, for an update's placement
    memory: float | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def placement(self) -> Placement:
        """Its share of the GPUs (an update places new models around it)."""
        return Placement(self.replica, "cuda", gpus=tuple(self.gpus), memory=self.memory)


def engine_argv(
    python: str,
    model: str,
    port: int,
    served_model_name: str | None,
    passthrough: list[str],
) -> list[str]:
    """The vLLM server command line; engines listen on loopback only.

    `served_model_name`: vgate's name for the model, when the flags name none.
    """
    argv = [python, "-m", VLLM_SERVER_MODULE, "--model", model]
    argv += ["--host", "127.0.0.1", "--port", str(port)]
    # The tokens-in endpoint, for predict's raw prompts with images (nginx keeps the
    # endpoints this adds off the front door).
    argv += ["--enable-scale-out"]
    # Media items per prompt (vLLM's default is 999); a multimodal model only reads it,
    # and the user's own flag, later in the line, wins.
    argv += ["--limit-mm-per-prompt", json.dumps(MEDIA_PER_PROMPT)]
    if served_model_name:
        argv += ["--served-model-name", served_model_name]
    return argv + passthrough


def lora_env(
    enabled: bool,
    cache_dir: str,
    cache_bytes: int,
    max_bytes: int,
    fetch_timeout_s: int,
    allowed: list[str] | None,
) -> dict[str, str]:
    """With --enable-lora: adapters load at run time, through vgate's resolver and cache."""
    if not enabled:
        return {}
    policy = {} if allowed is None else {POLICY_ENV: json.dumps(allowed)}
    return policy | {
        "VLLM_ALLOW_RUNTIME_LORA_UPDATING": "1",
        "VGATE_ENGINE_LORA_CACHE_DIR": cache_dir,
        "VGATE_ENGINE_LORA_CACHE_BYTES": str(cache_bytes),
        "VGATE_ENGINE_LORA_MAX_BYTES": str(max_bytes),
        "VGATE_ENGINE_LORA_FETCH_TIMEOUT": str(fetch_timeout_s),
    }


def engine_env(placement: Placement, environ: dict[str, str]) -> dict[str, str]:
    """Per-replica environment: the replica's GPUs, or its CPU cores and a bounded KV cache.

    The operator's own VLLM_CPU_OMP_THREADS_BIND (`auto`, `nobind`, a core list) wins
    over the placement's cores, for every replica. A CPU engine's share of the KV
    cache space (several models) is its --kv-cache-memory-bytes, which vLLM's legacy
    VLLM_CPU_KVCACHE_SPACE would override: that is emptied (vLLM then ignores it).
    """
    defaults = {name: environ.get(name, value) for name, value in ENGINE_ENV_DEFAULTS.items()}
    if placement.device == "cuda":
        return defaults | {"CUDA_VISIBLE_DEVICES": ",".join(map(str, placement.gpus))}
    kv = environ.get("VLLM_CPU_KVCACHE_SPACE", DEFAULT_CPU_KVCACHE_GIB)
    return defaults | {
        "CUDA_VISIBLE_DEVICES": "",
        OMP_BIND_ENV: environ.get(OMP_BIND_ENV) or cpu_bind(placement),
        "VLLM_CPU_KVCACHE_SPACE": "" if placement.memory is not None else kv,
    }


def cpu_kv_budget(environ: dict[str, str], engines: int) -> int:
    """Bytes of KV cache the container's CPU engines split by their models' shares:
    VLLM_CPU_KVCACHE_SPACE (GiB, vLLM's per-engine setting) or vgate's default, each."""
    per_engine = environ.get("VLLM_CPU_KVCACHE_SPACE") or DEFAULT_CPU_KVCACHE_GIB
    return int(float(per_engine) * 2**30) * engines


def memory_flags(placement: Placement, kv_budget: int) -> list[str]:
    """A share of memory as vLLM's own flags: last in the line, so the partition wins."""
    if placement.memory is None:
        return []
    if placement.device == "cuda":
        return [f"--gpu-memory-utilization={placement.memory:g}"]
    return [f"--kv-cache-memory-bytes={int(placement.memory * kv_budget)}"]


def device_label(placement: Placement, environ: dict[str, str]) -> str:
    """The replica's device as /health shows it: where its OpenMP threads are bound."""
    if placement.device == "cpu" and environ.get(OMP_BIND_ENV):
        return f"cpu:{environ[OMP_BIND_ENV]}"
    return placement.label


def build_workers(
    placements: list[Placement],
    ports: list[int],
    python: str,
    model: str,
    served_model_name: str | None,
    passthrough: list[str],
    environ: dict[str, str],
    extra_env: dict[str, str] | None = None,
    name: str = "",
    kv_budget: int = 0,
) -> list[EngineWorker]:
    """`name`: the model's (several models); `kv_budget`: see cpu_kv_budget."""
    return [
        EngineWorker(
            replica=p.replica,
            port=port,
            device=device_label(p, environ),
            argv=engine_argv(python, model, port, served_model_name, passthrough)
            + memory_flags(p, kv_budget),
            env={**engine_env(p, environ), **(extra_env or {})},
            cluster_gpus=p.cluster_gpus,
            model=name,
            gpus=list(p.gpus),
            memory=p.memory,
        )
        for p, port in zip(placements, ports, strict=True)
    ]


def save_workers(workers: list[EngineWorker], path: Path) -> None:
    """Written by `vgate serve` and /update_models; read by each engine launch, the
    monitor and the gateway."""
    write_atomic(path, json.dumps([asdict(w) for w in workers], indent=1))


def load_workers(path: Path) -> list[EngineWorker]:
    return [EngineWorker(**w) for w in json.loads(path.read_text())]


def find_worker(workers: list[EngineWorker], replica: int) -> EngineWorker:
    """Replica numbers are the engines' own (an update adds and removes some)."""
    return next(w for w in workers if w.replica == replica)


def free_replicas(taken: set[int], count: int) -> list[int]:
    """The lowest replica numbers not in use: the routing's masks have a bit for each."""
    out: list[int] = []
    candidate = 0
    while len(out) < count:
        if candidate not in taken:
            out.append(candidate)
        candidate += 1
    return out


class EngineList:
    """engines.json as it is now: /update_models rewrites it; re-read when it changed
    (a stat per look, cheap enough for every request)."""

    def __init__(self, path: Path):
        self._path = path
        self._mtime_ns = -1
        self._workers: list[EngineWorker] = []
        self.refresh()

    def refresh(self) -> bool:
        """True when the list changed."""
        try:
            mtime = self._path.stat().st_mtime_ns
            if mtime == self._mtime_ns:
                return False
            workers = load_workers(self._path)
        except (OSError, ValueError, KeyError, TypeError):
            if self._mtime_ns < 0:
                raise  # none to stand in: the run is not set up
            log.warning("%s unreadable, the last one stands", self._path, exc_info=True)
            return False
        self._mtime_ns, self._workers = mtime, workers
        return True

    def workers(self) -> list[EngineWorker]:
        self.refresh()
        return self._workers

    @property
    def written(self) -> int:
        """When the list was last written, in seconds since the epoch."""
        return self._mtime_ns // 1_000_000_000
