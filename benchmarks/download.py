"""Model download from Cloud Storage: parallel against one file at a time, same run.

A model of several shards sits in the storage emulator behind a front that adds
a fixed latency to every request and caps each download request's bandwidth
(what a real bucket's round trips and single streams cost). The
same mirror is made with vgate's download (files in parallel, large ones in
parallel byte ranges) and with one worker, one file and one range at a time,
alternately; reported in MB/s and as a ratio.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import time
from pathlib import Path

from engine.gcs import download
from tests.gcs_emulator import FaultyFront, client, emulator, upload_dir

URI = "gs://bench/model"


def _model(root: Path, shards: int, shard_bytes: int) -> Path:
    root.mkdir(parents=True)
    (root / "config.json").write_text('{"model_type": "llama"}')
    (root / "tokenizer.json").write_text("{}")
    for i in range(shards):
        (root / f"model-{i + 1:05d}-of-{shards:05d}.safetensors").write_bytes(
            os.urandom(shard_bytes)
        )
    return root


def bench(
    shards: int = 8,
    shard_bytes: int = 4_000_000,
    latency_s: float = 0.05,
    bytes_per_s: float = 10e6,
    workers: int = 16,
    rounds: int = 2,
) -> dict:
    work = Path(tempfile.mkdtemp(prefix="vgate-bench-download-"))
    chunk = shard_bytes // 4  # each shard in 4 ranges when parallel
    try:
        source = _model(work / "source", shards, shard_bytes)
        total = sum(p.stat().st_size for p in source.iterdir())
        runs: dict[str, list[float]] = {"parallel": [], "one at a time": []}
        with emulator() as url:
            upload_dir(client(url), "bench", "model", source)
            with FaultyFront(url, latency_s=latency_s, bytes_per_s=bytes_per_s).running() as front:
                gcs = client(front.url)
                for i in range(rounds):
                    order = list(runs) if i % 2 == 0 else list(runs)[::-1]
                    for way in order:
                        dest = work / f"{way}-{i}".replace(" ", "-")
                        parallel = way == "parallel"
                        start = time.perf_counter()
                        download(
                            URI,
                            dest,
                            workers=workers if parallel else 1,
                            client=gcs,
                            chunked_min_bytes=chunk if parallel else total + 1,
                            chunk_bytes=chunk,
                        )
                        runs[way].append(time.perf_counter() - start)
                        print(
                            f"  download round {i + 1} {way:<14} {runs[way][-1]:6.2f} s", flush=True
                        )
    finally:
        shutil.rmtree(work, ignore_errors=True)
    mb = total / 1e6
    result = {
        "shards": shards,
        "megabytes": mb,
        "latency_ms_per_request": latency_s * 1000,
        "mb_per_s_per_request": bytes_per_s / 1e6,
        "workers": workers,
        "seconds": runs,
        "mb_per_s": {w: mb * len(t) / sum(t) for w, t in runs.items()},
    }
    result["parallel_over_serial"] = (
        result["mb_per_s"]["parallel"] / result["mb_per_s"]["one at a time"]
    )
    return result


def table(result: dict) -> str:
    lines = [
        f"download of {result['shards']} shards + 2 small files, {result['megabytes']:.0f} MB, "
        f"{result['latency_ms_per_request']:.0f} ms added per request, "
        f"{result['mb_per_s_per_request']:.0f} MB/s at most per download request",
    ]
    for way, rate in result["mb_per_s"].items():
        times = ", ".join(f"{t:.2f}" for t in result["seconds"][way])
        lines.append(f"  {way:<14} {rate:7.1f} MB/s  [{times}] s")
    lines.append(f"  parallel / one at a time: {result['parallel_over_serial']:.1f}x")
    return "\n".join(lines)
