"""`vgate serve`: resolve the configuration once, prepare the run dir, become supervisord.

Every check that can fail does so here, before any process starts, with one
line that says what is wrong.
"""

from __future__ import annotations

import dataclasses
import os
import shutil
import socket
import subprocess
import sys
import tempfile
from pathlib import Path

from engine import placement
from engine.demo_model import DEMO_MODEL_NAME
from engine.fetch_model import JOB_FILE, MODEL_READY, PROGRESS_FILE, write_json
from engine.gcs import MODEL_CONFIG, DownloadError, list_objects, make_client
from engine.model_source import ModelSourceError, classify_model, local_model
from engine.workers import build_workers, lora_env, max_num_seqs, save_workers
from gateway.config import Config, ConfigError, resolve
from gateway.engine_schema import SCHEMA_FILE
from gateway.nginx_config import UPSTREAM_FILE, render_nginx, write_upstream
from gateway.state import STATE_FILE

REPO = Path(__file__).resolve().parent.parent


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


def prepare(config: Config, environ: dict[str, str]) -> tuple[Path, dict[str, str]]:
    """Check everything, write the run dir; return it and supervisord's environment."""
    nginx = find_nginx()
    placements = placement.plan(
        config.device,
        placement.visible_gpus() if config.device != "cpu" else [],
        placement.usable_cpus(),
        config.tensor_parallel_size,
        config.replicas,
    )
    check_port_free(config.host, config.port)
    source = classify_model(config.model)
    served_name = config.served_model_name or {"demo": DEMO_MODEL_NAME, "gcs": config.model}.get(
        source.kind
    )
    if source.kind == "gcs":
        # Fail now, in one line, if the prefix cannot be a model: before anything starts.
        list_objects(make_client(), source.reference or "", required=MODEL_CONFIG)
    model = local_model(source, Path(config.download_dir))

    run_dir = Path(config.run_dir or tempfile.mkdtemp(prefix="vgate-"))
    run_dir.mkdir(parents=True, exist_ok=True)
    for stale in (STATE_FILE, UPSTREAM_FILE, SCHEMA_FILE, JOB_FILE, PROGRESS_FILE, MODEL_READY):
        (run_dir / stale).unlink(missing_ok=True)
    if source.kind == "gcs":
        job = {"uri": source.reference, "dest": model, "workers": config.download_workers}
        write_json(run_dir / JOB_FILE, job)
    prom_dir = run_dir / "prometheus"
    shutil.rmtree(prom_dir, ignore_errors=True)
    prom_dir.mkdir()
    (run_dir / "nginx").mkdir(exist_ok=True)

    workers = build_workers(
        placements,
        free_loopback_ports(len(placements)),
        sys.executable,
        model,
        served_name,
        config.tensor_parallel_size,
        config.engine_args,
        environ,
        lora_env(config.engine_args, config.lora_cache_dir, config.lora_cache_bytes),
    )
    save_workers(workers, run_dir / "engines.json")
    if config.max_inflight is None:
        per_engine = max_num_seqs(
            config.engine_args, placements[0].device, config.tensor_parallel_size
        )
        config = dataclasses.replace(config, max_inflight=per_engine * len(workers))
    config.save(run_dir / "config.json")
    write_upstream(run_dir, workers, ready=set(), generation="start")
    conf = run_dir / "nginx.conf"
    conf.write_text(render_nginx(config, run_dir))
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
        "VGATE_REPLICAS": str(len(workers)),
        "VGATE_GATEWAY_WORKERS": str(config.gateway_workers),
        "VGATE_STOP_GRACE": str(config.stop_grace),
        "PYTHONUNBUFFERED": "1",
    }
    devices = ", ".join(w.device for w in workers)
    print(
        f"vgate: serving {config.model or DEMO_MODEL_NAME} on http://{config.host}:{config.port} "
        f"with {len(workers)} engine replica(s) [{devices}], at most {config.max_inflight} "
        f"requests in flight, run dir {run_dir}",
        flush=True,
    )
    return run_dir, env


def main(argv: list[str]) -> int:
    try:
        config = resolve(argv, os.environ)
        _, env = prepare(config, dict(os.environ))
    except (ConfigError, placement.PlacementError, ModelSourceError, DownloadError) as e:
        print(f"vgate: {e}", file=sys.stderr)
        return 2
    conf = str(REPO / "supervisord.conf")
    # Become supervisord: it owns every process from here on, and SIGTERM/SIGINT
    # to this pid stop them all.
    os.execvpe(
        sys.executable, [sys.executable, "-m", "supervisor.supervisord", "-n", "-c", conf], env
    )
    return 0  # not reached
