"""Mirroring a gs:// prefix against a real Cloud Storage API (the emulator), real client."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from engine import fetch_model
from engine.gcs import DownloadError, Progress, download, matches, mirror_dir
from tests.gcs_emulator import FaultyFront, client, emulator, upload_dir

BUCKET = "models"


@pytest.fixture(scope="module")
def storage_url() -> Iterator[str]:
    with emulator() as url:
        yield url


@pytest.fixture
def model(tmp_path: Path, storage_url: str) -> tuple[str, Path]:
    """A small model tree (subfolders, a multi-chunk shard) uploaded under a fresh prefix."""
    source = tmp_path / "source"
    (source / "tokenizer").mkdir(parents=True)
    (source / "config.json").write_text('{"model_type": "llama"}')
    (source / "tokenizer" / "vocab.json").write_text('{"a": 1}')
    (source / "model-00001.safetensors").write_bytes(os.urandom(300_000))
    (source / "model-00002.safetensors").write_bytes(os.urandom(5_000))
    prefix = f"llama-{tmp_path.name}"
    upload_dir(client(storage_url), BUCKET, prefix, source)
    return f"gs://{BUCKET}/{prefix}", source


def _same_tree(a: Path, b: Path) -> None:
    files = sorted(p.relative_to(a) for p in a.rglob("*") if p.is_file())
    assert files == sorted(p.relative_to(b) for p in b.rglob("*") if p.is_file())
    for f in files:
        assert (a / f).read_bytes() == (b / f).read_bytes(), f


def _fetch(uri: str, dest: Path, **kw: object) -> Progress:
    # Small chunks, so that the 300 kB shard goes in parallel byte ranges.
    return download(uri, dest, workers=4, chunked_min_bytes=100_000, chunk_bytes=64_000, **kw)


def test_the_whole_prefix_lands_verified(model: tuple[str, Path], tmp_path: Path) -> None:
    uri, source = model
    dest = mirror_dir(tmp_path / "mirror", uri)
    seen: list[Progress] = []
    done = _fetch(uri, dest, on_progress=seen.append, every_s=0.05)
    _same_tree(source, dest)
    assert (done.files_done, done.files_total, done.files_reused) == (4, 4, 0)
    assert (
        done.bytes_done
        == done.bytes_total
        == sum(f.stat().st_size for f in source.rglob("*") if f.is_file())
    )
    assert seen and seen[-1].as_dict()["files_done"] == 4
    assert not list(dest.rglob("*.vgate-part"))


def test_a_second_run_fetches_only_what_is_missing_or_wrong(
    model: tuple[str, Path], tmp_path: Path, storage_url: str
) -> None:
    uri, source = model
    dest = tmp_path / "mirror"
    _fetch(uri, dest)
    (dest / "tokenizer" / "vocab.json").unlink()  # missing
    shard = dest / "model-00002.safetensors"
    shard.write_bytes(b"\0" * shard.stat().st_size)  # same size, wrong bytes
    (dest / "config.json.vgate-part").write_bytes(b"half")  # a crash's leftover
    with FaultyFront(storage_url).running() as front:
        done = _fetch(uri, dest, client=client(front.url))
    assert (done.files_reused, done.files_total) == (2, 4)
    assert sorted(p.rsplit("/", 1)[-1] for p in front.downloads) == [
        "model-00002.safetensors",
        "vocab.json",
    ]
    _same_tree(source, dest)


def test_a_corrupt_download_is_fetched_again_then_refused(
    model: tuple[str, Path], tmp_path: Path, storage_url: str
) -> None:
    uri, _ = model
    name = uri.removeprefix(f"gs://{BUCKET}/") + "/model-00002.safetensors"
    with (
        FaultyFront(storage_url, corrupt_objects={name}).running() as front,
        pytest.raises(DownloadError, match=r"model-00002\.safetensors: checksum mismatch 3 times"),
    ):
        _fetch(uri, tmp_path / "mirror", client=client(front.url))
    assert sum(p.endswith("model-00002.safetensors") for p in front.downloads) == 3
    assert not (tmp_path / "mirror" / "model-00002.safetensors").exists()
    assert not list((tmp_path / "mirror").rglob("*.vgate-part"))


@pytest.mark.parametrize(
    ("uri", "message"),
    [
        ("gs://no-such-bucket/m", "gs://no-such-bucket/m: bucket 'no-such-bucket' does not exist"),
        (
            f"gs://{BUCKET}/nothing-here",
            f"gs://{BUCKET}/nothing-here: no objects under this prefix",
        ),
        ("gs://models/../etc", "gs://models/../etc: not a valid gs://bucket/path URI"),
    ],
)
def test_clear_failures(uri: str, message: str, tmp_path: Path, storage_url: str) -> None:
    with pytest.raises(DownloadError) as info:
        download(uri, tmp_path, client=client(storage_url))
    assert str(info.value).startswith(message)


def test_a_prefix_without_config_json_is_not_a_model(tmp_path: Path, storage_url: str) -> None:
    (tmp_path / "src").mkdir()
    (tmp_path / "src" / "notes.txt").write_text("x")
    upload_dir(client(storage_url), BUCKET, "notes", tmp_path / "src")
    with pytest.raises(DownloadError, match=f"gs://{BUCKET}/notes: no config.json"):
        download(f"gs://{BUCKET}/notes", tmp_path / "out", client=client(storage_url))


def test_no_permission(model: tuple[str, Path], tmp_path: Path, storage_url: str) -> None:
    uri, _ = model
    with (
        FaultyFront(storage_url, forbidden_buckets={BUCKET}).running() as front,
        pytest.raises(DownloadError, match=f"^{re.escape(uri)}: no permission to list it"),
    ):
        download(uri, tmp_path, client=client(front.url))


def test_an_object_name_cannot_leave_the_directory(tmp_path: Path) -> None:
    from engine.gcs import _local_path

    for bad in ("../x", "a/../../x", "/etc/passwd", "a//b"):
        with pytest.raises(DownloadError, match="would leave the download directory"):
            _local_path(tmp_path, bad)


def test_matches_needs_size_and_checksum(
    model: tuple[str, Path], tmp_path: Path, storage_url: str
) -> None:
    uri, source = model
    (blob,) = [
        b
        for b in client(storage_url).list_blobs(
            BUCKET, prefix=uri.split("/", 3)[3] + "/config.json"
        )
    ]
    assert matches(source / "config.json", blob)
    (tmp_path / "c").write_text('{"model_type": "llamb"}')  # same size
    assert not matches(tmp_path / "c", blob)
    assert not matches(tmp_path / "absent", blob)


def test_the_download_program_reports_progress_and_marks_the_model_ready(
    model: tuple[str, Path], tmp_path: Path, storage_url: str
) -> None:
    uri, source = model
    dest = tmp_path / "mirror"
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / fetch_model.JOB_FILE).write_text(
        json.dumps([{"uri": uri, "dest": str(dest), "workers": 2}])
    )
    with FaultyFront(storage_url, latency_s=0.5).running() as front:  # slow enough to report
        out = subprocess.run(
            [sys.executable, "-m", "engine.fetch_model"],
            env={**os.environ, "VGATE_RUN_DIR": str(run_dir), "STORAGE_EMULATOR_HOST": front.url},
            capture_output=True,
            text=True,
            timeout=120,
        )
    assert out.returncode == 0, out.stderr
    assert (run_dir / fetch_model.MODEL_READY).exists()
    progress = json.loads((run_dir / fetch_model.PROGRESS_FILE).read_text())
    assert progress["uri"] == uri and progress["files_done"] == progress["files_total"] == 4
    assert f"{uri}: " in out.stderr and " MB/s, eta " in out.stderr  # the progress line
    _same_tree(source, dest)


def test_vgate_download_alone(model: tuple[str, Path], tmp_path: Path, storage_url: str) -> None:
    uri, source = model
    env = {**os.environ, "STORAGE_EMULATOR_HOST": storage_url}
    vgate = [sys.executable, "-m", "gateway.control.cli", "download"]
    ok = subprocess.run(
        [*vgate, uri, str(tmp_path / "d")], env=env, capture_output=True, text=True, timeout=120
    )
    assert ok.returncode == 0, ok.stderr
    _same_tree(source, tmp_path / "d")
    bad = subprocess.run(
        [*vgate, "gs://no-such-bucket/x", str(tmp_path / "e")],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert bad.returncode == 1
    assert (
        bad.stderr.strip() == "vgate: gs://no-such-bucket/x: bucket 'no-such-bucket' does not exist"
    )
