"""The one typed configuration, resolved once at start.

Precedence for every setting: CLI flag, then VGATE_* environment, then Vertex's
AIP_* environment, then the default. Flags vgate does not know are vLLM engine
flags: they pass through to every engine unchanged.
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from engine.placement import DEVICES


class ConfigError(ValueError):
    """A setting that cannot work; reported as one line, exit code 2."""


@dataclass(frozen=True)
class Config:
    model: str | None = None
    served_model_name: str | None = None
    replicas: int | None = None
    tensor_parallel_size: int = 1
    device: str = "auto"
    host: str = "0.0.0.0"
    port: int = 8080
    gateway_workers: int = 1
    max_request_bytes: int = 1_572_864  # 1.5 MiB: Vertex's shared endpoint limit
    request_timeout: float = 600.0
    max_instances: int = 64
    # None: the engines' --max-num-seqs times replicas, resolved by `vgate serve`.
    max_inflight: int | None = None
    stop_grace: int = 30
    health_route: str | None = None
    predict_route: str | None = None
    run_dir: str | None = None
    download_dir: str = "/tmp/model_dir"  # Google's container's layout
    download_workers: int = 16
    lora_cache_dir: str = "/tmp/vgate-lora"
    lora_cache_bytes: int = 10 * 1024**3
    engine_args: list[str] = field(default_factory=list)

    def save(self, path: Path) -> None:
        path.write_text(json.dumps(asdict(self), indent=1))

    @classmethod
    def load(cls, path: Path) -> Config:
        return cls(**json.loads(path.read_text()))


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise ValueError(text)
    return value


def _positive_float(text: str) -> float:
    value = float(text)
    if value <= 0:
        raise ValueError(text)
    return value


def _port(text: str) -> int:
    value = int(text)
    if not 0 < value < 65536:
        raise ValueError(text)
    return value


def _device(text: str) -> str:
    if text not in DEVICES:
        raise ValueError(text)
    return text


# name: (parser, VGATE_* env, AIP_* env (or other platform env), help)
_SETTINGS: dict[str, tuple[Callable[[str], Any], str, tuple[str, ...], str]] = {
    "model": (
        str,
        "VGATE_MODEL",
        ("AIP_STORAGE_URI", "MODEL_ID"),
        "HF id, local dir or gs:// URI; none: the built-in demo model",
    ),
    "served_model_name": (str, "VGATE_SERVED_MODEL_NAME", (), "model name the API reports"),
    "replicas": (
        _positive_int,
        "VGATE_REPLICAS",
        (),
        "engine replicas (default: GPUs / tensor-parallel size; 2 on the CPU)",
    ),
    "tensor_parallel_size": (
        _positive_int,
        "VGATE_TENSOR_PARALLEL_SIZE",
        (),
        "GPUs per engine replica",
    ),
    "device": (_device, "VGATE_DEVICE", (), "auto, cpu or cuda"),
    "host": (str, "VGATE_HOST", (), "address of the front door"),
    "port": (_port, "VGATE_PORT", ("AIP_HTTP_PORT",), "port of the front door"),
    "gateway_workers": (_positive_int, "VGATE_GATEWAY_WORKERS", (), "gateway processes"),
    "max_request_bytes": (
        _positive_int,
        "VGATE_MAX_REQUEST_BYTES",
        (),
        "largest request body accepted",
    ),
    "request_timeout": (_positive_float, "VGATE_REQUEST_TIMEOUT", (), "seconds a request may take"),
    "max_instances": (
        _positive_int,
        "VGATE_MAX_INSTANCES",
        (),
        "most instances in one predict request",
    ),
    "max_inflight": (
        _positive_int,
        "VGATE_MAX_INFLIGHT",
        (),
        "engine requests in flight before new ones get 429 "
        "(default: the engines' --max-num-seqs times replicas)",
    ),
    "stop_grace": (
        _positive_int,
        "VGATE_STOP_GRACE",
        (),
        "seconds in-flight work may finish after SIGTERM",
    ),
    "health_route": (str, "VGATE_HEALTH_ROUTE", ("AIP_HEALTH_ROUTE",), "extra health route"),
    "predict_route": (str, "VGATE_PREDICT_ROUTE", ("AIP_PREDICT_ROUTE",), "extra predict route"),
    "run_dir": (str, "VGATE_RUN_DIR", (), "where sockets, pid files and rendered configs go"),
    "download_dir": (str, "VGATE_DOWNLOAD_DIR", (), "local mirror of gs:// models"),
    "lora_cache_dir": (str, "VGATE_LORA_CACHE_DIR", (), "disk cache of fetched LoRA adapters"),
    "lora_cache_bytes": (
        _positive_int,
        "VGATE_LORA_CACHE_BYTES",
        (),
        "most bytes of adapters kept on disk (least recently used go first)",
    ),
    "download_workers": (
        _positive_int,
        "VGATE_DOWNLOAD_WORKERS",
        (),
        "files (and byte ranges of large files) downloaded at once",
    ),
}


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="vgate serve",
        description="Serve a model: nginx, the gateway and vLLM engines under supervisord. "
        "Unknown flags (and everything after --) go to every vLLM engine.",
        allow_abbrev=False,
    )
    for name, (_, env, platform_env, help_text) in _SETTINGS.items():
        sources = " > ".join([env, *platform_env])
        parser.add_argument(_flag(name), dest=name, default=None, help=f"{help_text} [{sources}]")
    return parser


def resolve(argv: list[str], environ: Mapping[str, str]) -> Config:
    """Build the Config from command-line arguments and the environment."""
    if "--" in argv:
        cut = argv.index("--")
        argv, after = argv[:cut], argv[cut + 1 :]
    else:
        after = []
    parser = build_parser()
    args, unknown = parser.parse_known_args(argv)
    values: dict[str, Any] = {}
    for name, (convert, env, platform_env, _) in _SETTINGS.items():
        for source, raw in [
            (_flag(name), getattr(args, name)),
            *((key, environ.get(key)) for key in (env, *platform_env)),
        ]:
            if raw is None or raw == "":
                continue
            try:
                values[name] = convert(raw)
            except ValueError:
                raise ConfigError(f"{source}: invalid value {raw!r}") from None
            break
    # --tensor-parallel-size and --served-model-name are ours and vLLM's:
    # engine.workers gives them to every engine.
    return Config(**values, engine_args=unknown + after)
