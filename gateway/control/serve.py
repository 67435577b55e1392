"""`vgate serve`: resolve the configuration once, prepare the run dir, run supervisord.

Every check that can fail does so here, before any process starts, with one
line that says what is wrong: vgate's settings, and the engine flags, read by
vLLM's own parser. Once running, a run that cannot serve at all (no replica can
start) ends with a non-zero exit and its cause.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import resource
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
from pathlib import Path

from engine import placement
from engine.fetch_model import DOWNLOAD_FAILED, JOB_FILE, MODEL_READY, PROGRESS_FILE, write_json
from engine.files import write_atomic
from engine.gcs import DownloadError
from engine.launch import SUPERVISOR_TOKEN_ENV
from engine.logs import FORMAT_ENV, configure
from engine.model_set import MODELS_FILE, save_models
from engine.model_source import ModelSourceError, classify_model
from engine.vllm_args import EngineArgs
from engine.workers import OMP_BIND_ENV, save_workers
from gateway.config import Config, ConfigError, resolve
from gateway.control.drain import DRAIN_FILE, drain
from gateway.control.engine_programs import write_engine_programs
from gateway.control.gcp_project import find_project
from gateway.control.google_args import host_kv_offload, translate
from gateway.control.log_sink import LogSink, open_sink, open_wrapper
from gateway.control.model_plan import (
    engine_workers,
    model_specs,
    place,
    serve_models,
    shared_engine_env,
)
from gateway.control.monitor import FATAL_FILE
from gateway.control.nginx_config import (
    UPSTREAM_FILE,
    lua_modules,
    render_nginx,
    routing,
    write_routing,
    write_upstream,
)
from gateway.engine_schema import SCHEMA_FILE
from gateway.state import STATE_FILE

SUPERVISORD_CONF = Path(__file__).with_name("supervisord.conf")
log = logging.getLogger("vgate")


def find_nginx(search_path: str | None = None) -> str:
    """nginx on PATH or in the sbin dirs, where Debian puts it for non-root PATHs too."""
    path = search_path or os.pathsep.join(
        [os.environ.get("PATH", ""), "/usr/sbin", "/usr/local/sbin"]
    )
    found = shutil.which("nginx", path=path)
    if found is None:
        raise ConfigError("nginx is not installed (deploy/install.sh installs it)")
    return found


def check_port_free(host: str, port: int) -> None:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError as e:
            raise ConfigError(f"port {port} on {host} is busy ({e.strerror})") from None


def free_loopback_ports(count: int) -> list[int]:
    """Ports for the engines, chosen by the kernel, held together so they differ."""
    sockets = []
    try:
        for _ in range(count):
            s = socket.socket()
            s.bind(("127.0.0.1", 0))
            sockets.append(s)
        return [s.getsockname()[1] for s in sockets]
    finally:
        for s in sockets:
            s.close()


def available_memory() -> int:
    """Bytes of host memory free for use (MemAvailable)."""
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    return 0


def sequences_per_engine(engine: EngineArgs, first: placement.Placement) -> int:
    """--max-num-seqs of each engine: the flag, else vLLM's default for the device
    (on a GPU it depends on its memory and name: nvidia-smi says, or the smallest)."""
    facts = None
    if first.device == "cuda" and first.gpus and engine.max_num_seqs is None:
        facts = placement.gpu_facts(first.gpus[0])
    if facts is None:
        return engine.sequences_per_engine(first.device)
    return engine.sequences_per_engine(first.device, facts.memory_bytes, facts.name)


def prepare(config: Config, environ: dict[str, str], log_path: str) -> tuple[Path, dict[str, str]]:
    """Check everything, write the run dir; return it and supervisord's environment."""
    nginx = find_nginx()
    check_port_free(config.host, config.port)
    if config.enable_admin_routes and not config.api_keys:
        raise ConfigError("--enable-admin-routes needs --api-key: admin routes are never open")
    models, engines = serve_models(model_specs(config), Path(config.download_dir))
    config = dataclasses.replace(config, engine=engines[0])
    chosen = routing(config.routing, lua_modules())
    if len(models) > 1 and chosen != "prefix":
        raise ConfigError(
            "several models are routed by nginx's Lua balancer (--routing prefix; Debian: "
            "libnginx-mod-http-lua lua-cjson, which deploy/install.sh installs)"
        )
    if chosen != config.routing and chosen == "least-conn":
        log.warning("routing by load alone (least-conn): nginx lacks its Lua module or lua-cjson")
    config = dataclasses.replace(config, routing=chosen)
    plans = place(config, models, engines)
    engine_count = sum(len(plan) for plan in plans)
    offload, note = host_kv_offload(
        config.host_kv_cache_fraction, available_memory(), engine_count, plans[0][0].device
    )
    if note:
        log.warning("%s", note)
    models = [
        dataclasses.replace(
            m,
            extra_args=offload,
            sequences=sequences_per_engine(e, plan[0]),
        )
        for m, e, plan in zip(models, engines, plans, strict=True)
    ]
    run_dir = Path(config.run_dir or tempfile.mkdtemp(prefix="vgate-"))
    run_dir.mkdir(parents=True, exist_ok=True)
    stale = [STATE_FILE, UPSTREAM_FILE, SCHEMA_FILE, JOB_FILE, PROGRESS_FILE, MODEL_READY]
    stale += [FATAL_FILE, DOWNLOAD_FAILED]
    for path in [run_dir / name for name in stale] + list(run_dir.glob("engine-*.exits")):
        path.unlink(missing_ok=True)
    jobs = [
        {"uri": m.spec.source, "dest": m.model, "workers": config.download_workers}
        for m in models
        if classify_model(m.spec.source).kind == "gcs"
    ]
    if jobs:
        write_json(run_dir / JOB_FILE, jobs)
    prom_dir = run_dir / "prometheus"
    shutil.rmtree(prom_dir, ignore_errors=True)
    prom_dir.mkdir()
    (run_dir / "nginx").mkdir(exist_ok=True)

    if config.max_inflight is None:
        inflight = sum(m.sequences * len(plan) for m, plan in zip(models, plans, strict=True))
        config = dataclasses.replace(config, max_inflight=inflight)
    if config.log_format == "json":
        config = dataclasses.replace(config, log_project=find_project(config.log_project))
    # vgate's own processes on the cores the engines' threads keep free; the engines get
    # every core back (their API servers float, as plain vLLM's does).
    placements = [p for plan in plans for p in plan]
    front = () if environ.get(OMP_BIND_ENV) else placement.front_cpus(placements)
    config = dataclasses.replace(config, engine_env=shared_engine_env(config, bool(front)))
    workers = engine_workers(
        models, plans, free_loopback_ports(len(placements)), sys.executable, environ, config
    )
    save_workers(workers, run_dir / "engines.json")
    write_engine_programs(workers, run_dir)
    save_models(models, run_dir / MODELS_FILE)
    config.save(run_dir / "config.json")
    write_routing(run_dir, config.routing, models, config.engine)
    write_upstream(run_dir, workers, ready=set(), generation="start")
    write_atomic(run_dir / DRAIN_FILE, "")
    conf = run_dir / "nginx.conf"
    conf.write_text(render_nginx(config, run_dir, log_path))
    test = subprocess.run(
        [nginx, "-t", "-q", "-c", str(conf)], capture_output=True, text=True, timeout=30
    )
    if test.returncode != 0:
        raise ConfigError(f"nginx rejects the rendered config: {test.stderr.strip()}")

    env = {
        **environ,
        "VGATE_RUN_DIR": str(run_dir),
        "VGATE_PYTHON": sys.executable,
        "VGATE_NGINX": nginx,
        "VGATE_GATEWAY_WORKERS": str(config.gateway_workers),
        "VGATE_STOP_GRACE": str(config.stop_grace),
        "VGATE_LOG_PATH": log_path,
        FORMAT_ENV: config.log_format,
        SUPERVISOR_TOKEN_ENV: secrets.token_urlsafe(24),
        "VGATE_API_KEYS": ",".join(config.api_keys),  # for nginx (nginx/auth.js) alone
        "PYTHONUNBUFFERED": "1",
    }
    devices = ", ".join(w.device for w in workers)
    if front:
        env[placement.FRONT_CPUS_ENV] = placement.cpu_list(front)
        log.info(
            "CPU engines' threads kept off core(s) %s, for their API servers and schedulers, "
            "and nginx, the gateway and the monitor kept on them, as vLLM's own binding "
            "does (%s overrides)",
            placement.cpu_list(front),
            OMP_BIND_ENV,
        )
    log.info(
        "serving %s on http://%s:%d with %d engine replica(s) [%s], at most %d requests in "
        "flight, run dir %s",
        ", ".join(m.name for m in models),
        config.host,
        config.port,
        len(workers),
        devices,
        config.max_inflight,
        run_dir,
    )
    return run_dir, env


def open_files_target(soft: int, hard: int) -> int:
    """The soft limit on open files to run with: all the host allows (each connection
    through nginx takes two descriptors, and container runtimes often start at 1024)."""
    if hard == resource.RLIM_INFINITY:
        return max(soft, 1 << 20) if soft != resource.RLIM_INFINITY else soft
    return max(soft, hard)


def raise_open_files() -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = open_files_target(soft, hard)
    if target != soft:
        resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))


def supervise(run_dir: Path, env: dict[str, str], grace_s: float, log_fd: int = 1) -> int:
    """Run supervisord until it stops; exit 1 with the cause if the run could not serve.

    SIGTERM or SIGINT drains first (new requests get 503, those in flight finish
    within the grace), then stops everything; a second one stops at once. Every
    child that ends is reaped: in a container this process is PID 1, and orphans
    of vLLM's processes come to it.

    supervisord gets a process group of its own: a signal to this process's group
    (Ctrl-C in a terminal, `kill -TERM -PGID`, an init that signals the group) must
    reach only this process, or supervisord would stop nginx before the drain.
    """
    raise_open_files()  # every process inherits it
    placement.pin(env.get(placement.FRONT_CPUS_ENV))  # and its cores
    conf = str(SUPERVISORD_CONF)
    argv = [sys.executable, "-m", "supervisor.supervisord", "-n", "-c", conf]
    if os.geteuid() == 0:  # said, so supervisord does not log a CRIT line about it
        argv += ["--user", "root"]
    # supervisord's own lines, and its programs' that are not JSON (nginx's error log),
    # become JSON entries on their way.
    wrapper: LogSink | None = None
    if env.get(FORMAT_ENV) == "json":
        wrapper = open_wrapper(log_fd, "vgate")
    out = wrapper.fd if wrapper else log_fd
    try:
        child = subprocess.Popen(argv, env=env, process_group=0, stdout=out, stderr=out)
    finally:
        if wrapper:
            os.close(wrapper.fd)  # supervisord holds it now: its end is the wrapper's end
    stopping = threading.Event()

    def drain_then_stop() -> None:
        drain(run_dir, grace_s)
        child.send_signal(signal.SIGTERM)

    def on_stop(received: int, _: object) -> None:
        if stopping.is_set():
            child.send_signal(received)
            return
        stopping.set()
        threading.Thread(target=drain_then_stop, daemon=True).start()

    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, on_stop)
    for sig in (signal.SIGHUP, signal.SIGQUIT):
        signal.signal(sig, lambda received, _: child.send_signal(received))
    while True:
        try:
            pid, status = os.wait()
        except ChildProcessError:  # already reaped
            status = 0
            break
        if pid == child.pid:
            break
    child.returncode = os.waitstatus_to_exitcode(status)  # so Popen does not wait for it again
    if wrapper and wrapper.relay:
        wrapper.relay.join(2.0)  # what supervisord wrote last
    try:
        cause = json.loads((run_dir / FATAL_FILE).read_text())["cause"]
    except (OSError, ValueError, KeyError):
        return child.returncode
    log.critical("%s", cause)
    return 1


def main(argv: list[str]) -> int:
    configure("vgate")  # in VGATE_LOG_FORMAT's format until the flags are read
    try:
        try:
            translated = translate(argv)
        except ValueError as e:
            raise ConfigError(str(e)) from None
        config = resolve(translated.argv, os.environ)
        os.environ[FORMAT_ENV] = config.log_format
        configure("vgate")
        for note in translated.notes:
            log.warning("%s", note)
        config = dataclasses.replace(config, engine_env=translated.engine_env)
        sink = open_sink()
        run_dir, env = prepare(config, dict(os.environ), sink.path)
    except (ConfigError, placement.PlacementError, ModelSourceError, DownloadError) as e:
        log.error("%s", e)
        return 2
    try:
        return supervise(run_dir, env, config.stop_grace, sink.fd)
    finally:
        sink.close()
