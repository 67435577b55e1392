"""The one typed configuration, resolved once at start.

Precedence for every setting: CLI flag, then VGATE_* environment, then Vertex's
AIP_* environment, then the default. Flags vgate does not know are vLLM engine
flags: they pass through to every engine, and vLLM's own parser reads them once
(engine.vllm_args) into `Config.engine`, the view everything else asks.
"""

from __future__ import annotations

import argparse
import json
import re
import typing
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from engine.logs import FORMATS as LOG_FORMATS
from engine.placement import DEVICES
from engine.vllm_args import EngineArgs

# How nginx picks an engine: by prompt prefix, adapter and session, bounded by load
# (gateway/control/nginx/vgate_routing_policy.lua); or by load alone (nginx's least_conn).
ROUTINGS = ("prefix", "least-conn")


class ConfigError(ValueError):
    """A setting that cannot work; reported as one line, exit code 2."""


@dataclass(frozen=True)
class Config:
    # Several: Google's co-host form (engine.model_set); none: the built-in demo model.
    models: list[str] = field(default_factory=list)
    replicas: list[int] | None = None  # one per model, or one for all
    gpu_memory_partition: list[float] | None = None  # each model's share of GPU memory
    device: str = "auto"
    host: str = "0.0.0.0"
    port: int = 8080
    gateway_workers: int = 1
    max_request_bytes: int = 1_572_864  # 1.5 MiB: Vertex's shared endpoint limit
    request_timeout: float = 600.0
    max_instances: int = 64
    # None: the engines' --max-num-seqs times replicas, resolved by `vgate serve`.
    max_inflight: int | None = None
    max_inflight_per_client: int | None = None
    stop_grace: int = 30
    health_route: str | None = None
    predict_route: str | None = None
    run_dir: str | None = None
    download_dir: str = "/tmp/model_dir"  # Google's container's layout
    download_workers: int = 16
    lora_cache_dir: str = "/tmp/vgate-lora"
    lora_cache_bytes: int = 10 * 1024**3
    lora_max_bytes: int = 4 * 1024**3
    lora_fetch_timeout: int = 600
    host_kv_cache_fraction: float | None = None
    api_keys: list[str] = field(default_factory=list)
    # None: any gs:// URI and Hugging Face id, no local path (as Google's container).
    allowed_lora_sources: list[str] | None = None
    allowed_media_buckets: list[str] = field(default_factory=list)
    enable_admin_routes: bool = False
    # None: prefix-aware when nginx can (its Lua module, lua-cjson), else least-conn.
    routing: str | None = None
    log_format: str = "json"
    log_project: str | None = None
    engine_args: list[str] = field(default_factory=list)
    # Set by `vgate serve` once vLLM's parser has read engine_args.
    engine: EngineArgs = field(default_factory=EngineArgs)
    engine_env: dict[str, str] = field(default_factory=dict)

    def save(self, path: Path) -> None:
        """The API keys stay out of the file: nginx has them from the environment."""
        path.write_text(json.dumps(asdict(self) | {"api_keys": []}, indent=1))

    @classmethod
    def load(cls, path: Path) -> Config:
        values = json.loads(path.read_text())
        engine = values["engine"]
        engine["lora_modules"] = tuple(engine.get("lora_modules", ()))
        return cls(**{**values, "engine": EngineArgs(**engine)})


def gateway_socket(run_dir: Path, worker: int) -> Path:
    """Where gateway worker `worker` listens (nginx's gateways upstream)."""
    return run_dir / f"gateway-{worker}.sock"


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise ValueError(text)
    return value


def _positive_ints(text: str) -> list[int]:
    return [_positive_int(t) for t in text.split(",")]


def _shares(text: str) -> list[float]:
    values = [float(t) for t in text.split(",")]
    if not all(0 < v <= 1 for v in values):
        raise ValueError(text)
    return values


def _names(text: str) -> list[str]:
    names = [t.strip() for t in text.split(",")]
    if not all(names):
        raise ValueError(text)
    return names


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


# An API key: what an Authorization header can carry, without the separator of a list.
_KEY = re.compile(r"[A-Za-z0-9._~+/=:@-]{8,}")


def _keys(text: str) -> list[str]:
    keys = [k for k in text.split(",") if k]
    if not keys or not all(_KEY.fullmatch(k) for k in keys):
        raise ValueError(text)
    return keys


def _sources(text: str) -> list[str]:
    sources = [s.strip() for s in text.split(",") if s.strip()]
    if not sources or any(".." in s for s in sources):
        raise ValueError(text)
    return sources


# A Google Cloud project id, with the domain of a domain-scoped one ("example.com:proj").
PROJECT_ID = re.compile(r"[a-z0-9][a-z0-9.:-]{0,99}")


def _project(text: str) -> str:
    if not PROJECT_ID.fullmatch(text):
        raise ValueError(text)
    return text


def _switch(text: str) -> bool:
    value = text.strip().lower()
    if value not in ("true", "false", "1", "0"):
        raise ValueError(text)
    return value in ("true", "1")


def _fraction(text: str) -> float:
    value = float(text)
    if not 0 <= value < 1:
        raise ValueError(text)
    return value


EXPECTED: dict[Callable[[str], Any], str] = {
    _positive_int: "a positive integer",
    _positive_ints: "a positive integer, or one per model, comma-separated",
    _shares: "a share above 0 and at most 1, or one per model, comma-separated",
    _names: "a model, or several, comma-separated",
    _positive_float: "a positive number",
    _port: "a port number, 1 to 65535",
    _fraction: "a number from 0 up to 1",
    _keys: "keys of 8 or more letters, digits or ._~+/=:@- (several: comma-separated)",
    _switch: "true or false",
    _sources: "comma-separated prefixes such as gs://bucket/adapters/,my-org/",
    _project: "a Google Cloud project id",
}


@dataclass(frozen=True)
class Setting:
    parse: Callable[[str], Any]
    env: str  # VGATE_*
    platform_env: tuple[str, ...]  # Vertex's AIP_* (or Google's) environment, in order
    help: str
    group: str
    choices: tuple[str, ...] | None = None
    metavar: str | None = None
    repeat: bool = False  # the flag may be given more than once
    switch: bool = False  # a flag without a value


MODEL, FRONT, ENGINES, REQUESTS, FILES = "model", "front door", "engines", "requests", "files"
SECURITY, OPERATIONS = "security", "operations"

_SETTINGS: dict[str, Setting] = {
    "models": Setting(
        _names,
        "VGATE_MODEL",
        ("AIP_STORAGE_URI", "MODEL_ID"),
        "Hugging Face id, local dir or gs:// URI (also the first argument: vgate serve MODEL); "
        "several: repeat the flag or separate them with commas, and give --served-model-name, "
        "--max-model-len, --tensor-parallel-size, --pipeline-parallel-size one value per "
        "model the same way (or one for all), as Google's co-host server takes them; "
        "none: the built-in demo model",
        MODEL,
        metavar="MODEL",
        repeat=True,
    ),
    "replicas": Setting(
        _positive_ints,
        "VGATE_REPLICAS",
        (),
        "engine replicas, one value per model or one for all (Google's --model-replicas; "
        "default, one model: visible GPUs / (tensor x pipeline parallel size), on the CPU "
        "one per NUMA node, bound as vLLM binds one engine, a core left free; several "
        "models: one each)",
        ENGINES,
        metavar="N",
    ),
    "gpu_memory_partition": Setting(
        _shares,
        "VGATE_GPU_MEMORY_PARTITION",
        (),
        "each model's share of the machine's GPU memory, one value per model (Google's "
        "co-host flag): its engines' --gpu-memory-utilization, so that models may share GPUs; "
        "on the CPU it splits the cores and the KV cache (default: 0.9 split evenly)",
        ENGINES,
        metavar="F",
    ),
    "device": Setting(str, "VGATE_DEVICE", (), "where engines run", ENGINES, choices=DEVICES),
    "routing": Setting(
        str,
        "VGATE_ROUTING",
        (),
        "how a request's engine is chosen: the one holding its prompt's prefix, its adapter "
        "or its X-Session-Id, within a bounded share of the load (prefix); or the least "
        "busy (least-conn). Default: prefix when nginx has its Lua module and lua-cjson",
        ENGINES,
        choices=ROUTINGS,
    ),
    "host_kv_cache_fraction": Setting(
        _fraction,
        "VGATE_HOST_KV_CACHE_FRACTION",
        (),
        "share of free host memory for the GPU engines' second-tier KV cache (vLLM's "
        "--kv-offloading-size, split over replicas); Google's "
        "--host-prefix-kv-cache-utilization-target",
        ENGINES,
        metavar="F",
    ),
    "host": Setting(str, "VGATE_HOST", (), "address of the front door", FRONT),
    "port": Setting(_port, "VGATE_PORT", ("AIP_HTTP_PORT",), "port of the front door", FRONT),
    "gateway_workers": Setting(
        _positive_int, "VGATE_GATEWAY_WORKERS", (), "gateway processes", FRONT, metavar="N"
    ),
    "health_route": Setting(
        str, "VGATE_HEALTH_ROUTE", ("AIP_HEALTH_ROUTE",), "extra health route", FRONT
    ),
    "predict_route": Setting(
        str, "VGATE_PREDICT_ROUTE", ("AIP_PREDICT_ROUTE",), "extra predict route", FRONT
    ),
    "api_keys": Setting(
        _keys,
        "VGATE_API_KEY",
        ("VLLM_API_KEY",),
        "a key every request but health must carry (Authorization: Bearer KEY); repeat for "
        "several. Use it wherever the port is reachable directly (GKE, a VM); behind Vertex, "
        "which authenticates callers itself, it is not needed. vLLM's --api-key is the same",
        SECURITY,
        metavar="KEY",
        repeat=True,
    ),
    "allowed_lora_sources": Setting(
        _sources,
        "VGATE_ALLOWED_LORA_SOURCES",
        (),
        "the only adapter sources dynamic-lora and an OpenAI model may fetch, comma-separated "
        "prefixes: gs://bucket/prefix/, a Hugging Face org/ or org/name, a local /dir/ "
        "(default: any gs:// and Hugging Face id, no local path)",
        SECURITY,
        metavar="PREFIXES",
    ),
    "allowed_media_buckets": Setting(
        _sources,
        "VGATE_ALLOWED_MEDIA_BUCKETS",
        (),
        "Cloud Storage buckets predict may read gs:// images from, with the container's "
        "credentials, comma-separated (default: none)",
        SECURITY,
        metavar="BUCKETS",
    ),
    "enable_admin_routes": Setting(
        _switch,
        "VGATE_ENABLE_ADMIN_ROUTES",
        (),
        "put vLLM's administrative routes (adapters loaded at run time, render, batch) on the "
        "front door, behind the API key",
        SECURITY,
        switch=True,
    ),
    "log_format": Setting(
        str,
        "VGATE_LOG_FORMAT",
        (),
        "every process's log lines: one JSON object each, with Cloud Logging's fields "
        "(json), or plain text for a terminal (text)",
        OPERATIONS,
        choices=LOG_FORMATS,
    ),
    "log_project": Setting(
        _project,
        "VGATE_LOG_PROJECT",
        ("GOOGLE_CLOUD_PROJECT", "CLOUD_ML_PROJECT_ID"),
        "Google Cloud project whose traces nginx's access log links (X-Cloud-Trace-Context, "
        "traceparent; default: the metadata server's project on Google Cloud, else none)",
        OPERATIONS,
        metavar="PROJECT",
    ),
    "max_request_bytes": Setting(
        _positive_int,
        "VGATE_MAX_REQUEST_BYTES",
        (),
        "largest request body accepted (413 beyond)",
        REQUESTS,
        metavar="BYTES",
    ),
    "request_timeout": Setting(
        _positive_float,
        "VGATE_REQUEST_TIMEOUT",
        (),
        "seconds a request may take (504 beyond)",
        REQUESTS,
        metavar="S",
    ),
    "max_instances": Setting(
        _positive_int,
        "VGATE_MAX_INSTANCES",
        (),
        "most instances in one predict request",
        REQUESTS,
        metavar="N",
    ),
    "max_inflight": Setting(
        _positive_int,
        "VGATE_MAX_INFLIGHT",
        (),
        "engine requests in flight before new ones get 429 "
        "(default: the engines' --max-num-seqs, or vLLM's default for the device, times "
        "replicas)",
        REQUESTS,
        metavar="N",
    ),
    "max_inflight_per_client": Setting(
        _positive_int,
        "VGATE_MAX_INFLIGHT_PER_CLIENT",
        (),
        "requests in flight from one client address before its new ones get 429 "
        "(default: no such cap; behind a load balancer every client may share its address)",
        REQUESTS,
        metavar="N",
    ),
    "stop_grace": Setting(
        _positive_int,
        "VGATE_STOP_GRACE",
        (),
        "seconds in-flight work may finish after SIGTERM",
        REQUESTS,
        metavar="S",
    ),
    "run_dir": Setting(
        str,
        "VGATE_RUN_DIR",
        (),
        "where sockets, pid files and rendered configs go (default: a new temp dir)",
        FILES,
        metavar="DIR",
    ),
    "download_dir": Setting(
        str, "VGATE_DOWNLOAD_DIR", (), "local mirror of gs:// models", FILES, metavar="DIR"
    ),
    "lora_max_bytes": Setting(
        _positive_int,
        "VGATE_LORA_MAX_BYTES",
        (),
        "largest adapter fetched (a gs:// one is refused before anything is fetched)",
        FILES,
        metavar="BYTES",
    ),
    "lora_fetch_timeout": Setting(
        _positive_int,
        "VGATE_LORA_FETCH_TIMEOUT",
        (),
        "seconds an adapter fetch may take before it is stopped and its request refused",
        FILES,
        metavar="SECONDS",
    ),
    "download_workers": Setting(
        _positive_int,
        "VGATE_DOWNLOAD_WORKERS",
        (),
        "files (and byte ranges of large files) downloaded at once",
        FILES,
        metavar="N",
    ),
    "lora_cache_dir": Setting(
        str,
        "VGATE_LORA_CACHE_DIR",
        (),
        "disk cache of fetched LoRA adapters",
        FILES,
        metavar="DIR",
    ),
    "lora_cache_bytes": Setting(
        _positive_int,
        "VGATE_LORA_CACHE_BYTES",
        (),
        "most bytes of adapters kept on disk (least recently used go first)",
        FILES,
        metavar="BYTES",
    ),
}

ENGINE_FLAGS_HELP = """engine flags:
  Every other flag is a vLLM engine flag, given to every engine replica as it is
  (--max-model-len 4096, --max-model-len=4096, -tp 2, or anything after --).
  vLLM's own parser checks them before anything starts; they are listed by
  `python -m vllm.entrypoints.launchers.api_server.entry --help=all`. Google's Model Garden
  container arguments are accepted as its notebooks write them.

Each setting also reads the environment variables in [brackets], in that order
after the flag."""


# Settings whose flag is not their name's.
_FLAGS = {"api_keys": "--api-key", "models": "--model"}


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> typing.NoReturn:
        """One line in the run's log format, as every other refusal (not argparse's usage)."""
        raise ConfigError(f"{message} (vgate serve --help)")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="vgate serve",
        usage="vgate serve [MODEL] [vgate flags] [engine flags] [-- engine flags]",
        description="Serve a model: nginx, the Vertex gateway and vLLM engine replicas "
        "under supervisord, on one port.",
        epilog=ENGINE_FLAGS_HELP,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        allow_abbrev=False,
    )
    defaults = Config()
    groups = {
        title: parser.add_argument_group(title)
        for title in (MODEL, ENGINES, FRONT, SECURITY, REQUESTS, FILES, OPERATIONS)
    }
    for name, setting in _SETTINGS.items():
        sources = " > ".join([setting.env, *setting.platform_env])
        default = getattr(defaults, name)
        shown = "" if default is None else f" (default: {default})"
        choices = "{" + ",".join(setting.choices) + "}" if setting.choices else None
        group = groups[setting.group]
        flag = _FLAGS.get(name, _flag(name))
        help_text = f"{setting.help}{'' if default in ([], False) else shown} [{sources}]"
        if setting.switch:
            group.add_argument(flag, dest=name, action="store_const", const="true", help=help_text)
            continue
        group.add_argument(
            flag,
            dest=name,
            default=None,
            action="append" if setting.repeat else "store",
            metavar=choices or setting.metavar or name.split("_")[-1].upper(),
            help=help_text,
        )
    return parser


def _joined(given: str | list[str] | None) -> str | None:
    """A repeated flag's values as one list in text, as its environment variable has them."""
    return ",".join(given) if isinstance(given, list) else given


def resolve(argv: list[str], environ: Mapping[str, str]) -> Config:
    """Build the Config from command-line arguments and the environment."""
    if "--" in argv:
        cut = argv.index("--")
        argv, after = argv[:cut], argv[cut + 1 :]
    else:
        after = []
    positional = None
    if argv and not argv[0].startswith("-"):  # vgate serve MODEL ..., as vllm serve MODEL
        positional, argv = argv[0], argv[1:]
    args, unknown = build_parser().parse_known_args(argv)
    if positional is not None:
        if args.models is not None:
            given = ",".join(args.models)
            raise ConfigError(f"the model is given twice: {positional} and --model {given}")
        args.models = [positional]
    values: dict[str, Any] = {}
    for name, setting in _SETTINGS.items():
        given = getattr(args, name)
        for source, raw in [
            (_FLAGS.get(name, _flag(name)), _joined(given)),
            *((key, environ.get(key)) for key in (setting.env, *setting.platform_env)),
        ]:
            if raw is None or raw == "":
                continue
            try:
                values[name] = setting.parse(raw)
                if setting.choices and values[name] not in setting.choices:
                    raise ValueError(raw)
            except ValueError:
                expected = (
                    "one of " + ", ".join(setting.choices)
                    if setting.choices
                    else EXPECTED.get(setting.parse)
                )
                value = "" if name == "api_keys" else f" {raw!r}"  # a key is not for the log
                raise ConfigError(
                    f"{source}: invalid value{value}"
                    + (f" (expected {expected})" if expected else "")
                ) from None
            break
    return Config(**values, engine_args=unknown + after)
