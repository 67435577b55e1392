"""supervisord's download program: mirror a gs:// model before any engine starts.

`vgate serve` has already checked that the prefix exists and holds a
config.json, and wrote the job to download.json in the run dir. This mirrors it
(parallel, verified, resumable), writes its progress for /health and the log
every few seconds, and finally MODEL_READY, which the engines wait for. With no
job it marks the model ready at once. A failure (after the storage
client's own retries) is for good: it is written down for the monitor, which
ends the run with its cause.
"""

from __future__ import annotations

import functools
import json
import logging
import os
import sys
from pathlib import Path

from engine.files import write_atomic
from engine.gcs import DownloadError, Progress, download
from engine.logs import configure

JOB_FILE = "download.json"
PROGRESS_FILE = "download-progress.json"
MODEL_READY = "model-ready"
# Written when the download fails for good (after google-cloud-storage's own retries):
# the monitor ends the run with its cause rather than let the engines wait for 2 h.
DOWNLOAD_FAILED = "download-failed.json"

log = logging.getLogger("vgate.download")


def write_json(path: Path, value: object) -> None:
    write_atomic(path, json.dumps(value))


def _report(run_dir: Path, uri: str, progress: Progress) -> None:
    log.info("%s: %s", uri, progress.line())
    write_json(run_dir / PROGRESS_FILE, {"uri": uri, **progress.as_dict()})


def main() -> int:
    configure("download")
    run_dir = Path(os.environ["VGATE_RUN_DIR"])
    job_file = run_dir / JOB_FILE
    for job in json.loads(job_file.read_text()) if job_file.exists() else []:
        uri = job["uri"]
        report = functools.partial(_report, run_dir, uri)
        log.info("%s: downloading into %s with %d workers", uri, job["dest"], job["workers"])
        try:
            done = download(uri, Path(job["dest"]), workers=job["workers"], on_progress=report)
        except DownloadError as e:
            log.error("%s", e)
            write_json(run_dir / DOWNLOAD_FAILED, {"cause": f"the model download failed: {e}"})
            return 1
        log.info(
            "%s: complete, %d of %d files were already here",
            uri,
            done.files_reused,
            done.files_total,
        )
    (run_dir / MODEL_READY).touch()
    return 0


if __name__ == "__main__":
    sys.exit(main())
