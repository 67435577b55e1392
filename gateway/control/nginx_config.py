"""Renders nginx's configuration from the templates in gateway/control/nginx/.

The engines upstream lives in its own small file so the health monitor can list
only ready engines and reload nginx: a vLLM engine accepts connections long
before it can answer, and nginx (open source) has no active health checks.
"""

from __future__ import annotations

import glob
import json
import math
import os
import pwd
from pathlib import Path

import jinja2

from engine.files import write_atomic
from engine.model_set import ServedModel
from engine.vllm_args import EngineArgs
from engine.workers import EngineWorker
from gateway.config import Config, ConfigError, gateway_socket
from gateway.predict.media import MAX_MEDIA_BYTES

TEMPLATE_DIR = Path(__file__).with_name("nginx")
UPSTREAM_FILE = "engines-upstream.conf"
# How the engines upstream picks an engine: `least_conn;` or the Lua balancer.
BALANCING_FILE = "engines-balancing.conf"
# What prefix-aware routing needs to know of the engines (vgate_routing.lua configure()).
ROUTING_FILE = "routing.json"
# vLLM 0.32's public OpenAI routes under /v1/ (/v1/models is the gateway's); the rest
# there is administrative.
OPENAI_ROUTES = (
    "chat/completions",
    "completions",
    "embeddings",
    "responses",
    "responses/[^/]+",
    "responses/[^/]+/cancel",
    "messages",
    "messages/count_tokens",
    "audio/transcriptions",
    "audio/translations",
    "score",
    "rerank",
)
HEALTH_ROUTES = ("/ping", "/health", "/live")
# Where Debian (and nginx.org's packages) put dynamic modules.
MODULE_DIRS = ("/usr/lib/nginx/modules", "/usr/share/nginx/modules", "/etc/nginx/modules")
JS_MODULE = "ngx_http_js_module.so"
# The Lua module and the development kit it needs (Debian: libnginx-mod-http-lua).
LUA_MODULES = ("ndk_http_module.so", "ngx_http_lua_module.so")
# The JSON decoder prefix-aware routing reads request bodies with (Debian: lua-cjson).
CJSON_GLOBS = ("/usr/lib/*/lua/5.1/cjson.so", "/usr/local/lib/lua/5.1/cjson.so")


def find_module(name: str, dirs: tuple[str, ...] = MODULE_DIRS) -> str | None:
    for d in dirs:
        if (Path(d) / name).is_file():
            return str(Path(d) / name)
    return None


def js_module(dirs: tuple[str, ...] = MODULE_DIRS) -> str:
    """nginx's njs module, which checks the API keys."""
    found = find_module(JS_MODULE, dirs)
    if found is None:
        raise ConfigError(
            "--api-key needs nginx's njs module (Debian: libnginx-mod-http-js; "
            "deploy/install.sh installs it)"
        )
    return found


def lua_modules(dirs: tuple[str, ...] = MODULE_DIRS) -> list[str]:
    """nginx's Lua module, which counts the front door's requests, or nothing: without
    it vgate serves, and /metrics has the gateway's and the engines' figures only."""
    found = [find_module(name, dirs) for name in LUA_MODULES]
    return [path for path in found if path] if all(found) else []


def routing(requested: str | None, modules: list[str], cjson: bool | None = None) -> str:
    """The routing nginx can do: prefix-aware needs the Lua module and lua-cjson.

    `requested`: --routing, or None for the best available.
    """
    if cjson is None:
        cjson = any(glob.glob(pattern) for pattern in CJSON_GLOBS)
    available = bool(modules) and cjson
    if requested == "prefix" and not available:
        raise ConfigError(
            "--routing prefix needs nginx's Lua module and lua-cjson (Debian: "
            "libnginx-mod-http-lua lua-cjson; deploy/install.sh installs them), "
            "or --routing least-conn"
        )
    return requested or ("prefix" if available else "least-conn")


def metric_routes(config: Config, health: list[str]) -> list[tuple[str, str]]:
    """The front door's own routes and their surfaces, as the metrics label them."""
    predict = ["/generate", "/predict", *([config.predict_route] if config.predict_route else [])]
    routes = [(r, "health") for r in health] + [(r, "vertex") for r in predict]
    routes += [("/metrics", "metrics"), ("/v1/models", "openai")]
    surfaces: dict[str, str] = {}
    for route, surface in routes:
        surfaces.setdefault(route, surface)  # a route named twice: its first surface
    return list(surfaces.items())


def _worker_user() -> str | None:
    """nginx workers run as the user that runs vgate.

    They connect to the gateways' unix sockets in the run dir, which may sit
    below a directory only that user can enter; as root nginx would otherwise
    drop to an unprivileged user that cannot.
    """
    return pwd.getpwuid(os.geteuid()).pw_name if os.geteuid() == 0 else None


def _template(name: str) -> jinja2.Template:
    env = jinja2.Environment(
        loader=jinja2.FileSystemLoader(TEMPLATE_DIR),
        undefined=jinja2.StrictUndefined,
        trim_blocks=True,
        lstrip_blocks=True,
        keep_trailing_newline=True,
    )
    return env.get_template(name)


def render_nginx(config: Config, run_dir: Path, access_log: str = "/dev/stdout") -> str:
    host = f"[{config.host}]" if ":" in config.host else config.host
    health = [*HEALTH_ROUTES, *([config.health_route] if config.health_route else [])]
    return _template("nginx.conf.j2").render(
        lua_modules=lua_modules(),
        prefix_routing=config.routing == "prefix",
        routing_file=ROUTING_FILE,
        lua_dir=TEMPLATE_DIR,
        metric_routes=metric_routes(config, health),
        api_keys=bool(config.api_keys),
        js_module=js_module() if config.api_keys else None,
        auth_js=TEMPLATE_DIR / "auth.js",
        admin_routes=config.enable_admin_routes,
        openai_routes="|".join(OPENAI_ROUTES),
        health_routes=list(dict.fromkeys(health)),
        predict_routes=[config.predict_route] if config.predict_route else [],
        user=_worker_user(),
        run_dir=run_dir,
        access_log=access_log,
        log_format=config.log_format,
        log_project=config.log_project,
        listen=f"{host}:{config.port}",
        max_request_bytes=config.max_request_bytes,
        # The gateway's engine requests carry gs:// media inline (base64: 4/3 larger).
        internal_max_bytes=config.max_request_bytes + MAX_MEDIA_BYTES * 4 // 3 + 65536,
        read_timeout=math.ceil(config.request_timeout),
        max_inflight=config.max_inflight,
        per_client=config.max_inflight_per_client,
        gateway_sockets=[gateway_socket(run_dir, k) for k in range(config.gateway_workers)],
    )


def render_upstream(
    workers: list[EngineWorker], ready: set[int], generation: str, run_dir: Path
) -> str:
    """The engines upstream: engines not ready are marked down."""
    return _template("engines-upstream.conf.j2").render(
        workers=workers,
        ready=ready,
        generation=generation,
        run_dir=run_dir,
        balancing_file=BALANCING_FILE,
    )


def write_upstream(
    run_dir: Path, workers: list[EngineWorker], ready: set[int], generation: str
) -> None:
    write_atomic(run_dir / UPSTREAM_FILE, render_upstream(workers, ready, generation, run_dir))


def render_balancing(route: str) -> str:
    """The upstream's method: nginx's least_conn, or the prefix-aware Lua balancer
    (keepalive, after it in the upstream block, keeps its connections)."""
    if route == "prefix":
        return 'balancer_by_lua_block { require("vgate_routing").balance() }\n'
    return "least_conn;\n"


def routing_table(models: list[ServedModel], engine: EngineArgs) -> dict[str, object]:
    """What nginx's routing knows of the models (vgate_routing_policy.lua model_table):
    each model's names, the first model first (an empty `model` is it); the operator's
    --lora-modules, which every engine has from the start; whether any other name may be
    an adapter (--enable-lora)."""
    return {
        "models": [{"name": m.name, "names": m.names} for m in models],
        "adapters": list(engine.lora_modules),
        "lora": engine.enable_lora,
    }


def write_routing(
    run_dir: Path, route: str | None, models: list[ServedModel], engine: EngineArgs
) -> None:
    """The upstream's method, and the models nginx routes by (read at each reload)."""
    write_atomic(run_dir / BALANCING_FILE, render_balancing(route or "least-conn"))
    write_atomic(run_dir / ROUTING_FILE, json.dumps(routing_table(models, engine)))
