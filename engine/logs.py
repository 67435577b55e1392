"""One log format for every process of the container: a JSON object per line, as Cloud
Logging reads it (`severity`, `message`, `time`, and the `process` it came from), or
plain text for a terminal (`--log-format text`).

Here, not in gateway/, because every process uses it: the engines' launcher and vLLM
(through VLLM_LOGGING_CONFIG_PATH), the download, and the gateway and control
programs, which may all use engine/. Python's records are formatted by
python-json-logger; lines from programs that cannot write JSON (supervisord,
nginx's error log, vLLM's uvicorn and C++ libraries, a traceback printed before
logging was set up) are wrapped by `LineWrapper` with the severity their own form
gives.
"""

from __future__ import annotations

import logging
import os
import re
import sys
import time
from collections.abc import Iterator
from types import TracebackType
from typing import Any

import orjson
from pythonjsonlogger.json import JsonFormatter

FORMAT_ENV = "VGATE_LOG_FORMAT"
FORMATS = ("json", "text")
TEXT_FORMAT = "%(asctime)s %(levelname)s %(process_name)s: %(message)s"


def log_format(environ: os._Environ[str] | dict[str, str] = os.environ) -> str:
    value = environ.get(FORMAT_ENV, "json")
    return value if value in FORMATS else "json"


def json_formatter(process: str) -> JsonFormatter:
    return JsonFormatter(
        "%(levelname)s %(message)s %(name)s",
        rename_fields={"levelname": "severity", "name": "logger", "exc_info": "stack_trace"},
        static_fields={"process": process},
        timestamp="time",
    )


class TextFormatter(logging.Formatter):
    def __init__(self, process: str) -> None:
        super().__init__(TEXT_FORMAT, defaults={"process_name": process})


def formatter(process: str, fmt: str) -> logging.Formatter:
    return json_formatter(process) if fmt == "json" else TextFormatter(process)


def configure(process: str, level: int = logging.INFO) -> None:
    """This process's logging, in the container's format, to stderr; warnings and
    uncaught exceptions become records too, so no traceback escapes as raw lines."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(formatter(process, log_format()))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
    logging.captureWarnings(True)

    def log_uncaught(kind: type[BaseException], value: BaseException, tb: TracebackType) -> None:
        if issubclass(kind, KeyboardInterrupt):
            return
        logging.getLogger("vgate").critical("uncaught exception", exc_info=(kind, value, tb))

    sys.excepthook = log_uncaught  # type: ignore[assignment]


def vllm_logging_config(process: str, fmt: str) -> dict[str, Any]:
    """vLLM's logging as a dictConfig (VLLM_LOGGING_CONFIG_PATH): its own loggers and
    vgate's plugins inside the engine (LoRA resolver, media guard) in our format."""
    factory = "engine.logs.json_formatter" if fmt == "json" else "engine.logs.TextFormatter"
    handler = {"class": "logging.StreamHandler", "formatter": "vgate", "stream": "ext://sys.stdout"}
    logger = {"handlers": ["vgate"], "level": "INFO", "propagate": False}
    return {
        "version": 1,
        "disable_existing_loggers": False,
        "formatters": {"vgate": {"()": factory, "process": process}},
        "handlers": {"vgate": handler},
        "loggers": {"vllm": logger, "vgate": logger},
    }


# Cloud Logging's names for the levels of each program whose lines we wrap.
_SUPERVISORD = {"CRIT": "CRITICAL", "ERRO": "ERROR", "WARN": "WARNING", "INFO": "INFO"}
_NGINX = {
    "debug": "DEBUG",
    "info": "INFO",
    "notice": "NOTICE",
    "warn": "WARNING",
    "error": "ERROR",
    "crit": "CRITICAL",
    "alert": "ALERT",
    "emerg": "EMERGENCY",
}
_GLOG = {"I": "INFO", "W": "WARNING", "E": "ERROR", "F": "CRITICAL"}
_PYTHON_LEVELS = "DEBUG|INFO|WARNING|ERROR|CRITICAL"

# A child of vLLM's prefixes its lines with its name and pid: "(EngineCore_DP0 pid=12) ".
_CHILD = re.compile(r"^\((?P<child>[\w.-]+) pid=\d+\) ")
_RECOGNISED: list[tuple[re.Pattern[str], str | None, dict[str, str] | None]] = [
    # supervisord's own: "2026-12-01 09:00:00,123 WARN exited: engine-0 (...)"
    (
        re.compile(r"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d+ (?P<level>[A-Z]{4}) (?P<message>.*)"),
        "supervisord",
        _SUPERVISORD,
    ),
    # nginx's error log, and what it prints before reading its config.
    (
        re.compile(
            r"^\d{4}/\d\d/\d\d \d\d:\d\d:\d\d \[(?P<level>[a-z]+)\] \d+#\d+: (?P<message>.*)"
        ),
        "nginx",
        _NGINX,
    ),
    (re.compile(r"^nginx: \[(?P<level>[a-z]+)\] (?P<message>.*)"), "nginx", _NGINX),
    # vLLM's own text format ("INFO 12-01 09:00:00 [file.py:12] ..."), uvicorn's
    # ("INFO:     ..."), Python's default ("WARNING:name:...").
    (re.compile(rf"^(?P<level>{_PYTHON_LEVELS})[ :](?P<message>.*)"), None, None),
    # glog, as PyTorch's C++ writes: "[W1201 09:00:00.000000 12 file.cpp:34] ..."
    (re.compile(r"^\[(?P<level>[IWEF])\d{4} (?P<message>.*)"), None, _GLOG),
    # Python's warnings module: "/path/x.py:12: FutureWarning: ..."
    (re.compile(r"^(?P<message>\S+:\d+: \w*(?P<level>Warning): .*)"), None, {"Warning": "WARNING"}),
]
TRACEBACK = "Traceback (most recent call last):"
MAX_BLOCK_LINES = 400


def _entry(severity: str, message: str, process: str) -> bytes:
    now = time.time()
    stamp = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(now)) + f".{int(now % 1 * 1e6):06d}Z"
    return orjson.dumps(
        {"severity": severity, "message": message, "process": process, "time": stamp}
    )


def classify(line: str, process: str) -> tuple[str, str, str]:
    """(severity, message, process) of one foreign line. A line with no level of its own
    is Cloud Logging's DEFAULT: no severity, rather than a made-up INFO or ERROR."""
    child = _CHILD.match(line)
    if child:
        process = f"{process}/{child['child']}"
        line = line[child.end() :]
    for pattern, source, levels in _RECOGNISED:
        m = pattern.match(line)
        if m:
            level = m["level"]
            severity = levels.get(level, "DEBUG") if levels is not None else level
            return severity, m["message"].strip() or line, source or process
    return "DEFAULT", line, process


def _json_object(line: str) -> dict[str, Any] | None:
    if not (line.startswith("{") and line.endswith("}")):
        return None
    try:
        value = orjson.loads(line)
    except orjson.JSONDecodeError:
        return None
    return value if isinstance(value, dict) else None


def readable(line: str) -> list[str]:
    """A log line as a person reads it: a JSON entry's message and stack trace."""
    entry = _json_object(line.strip())
    if entry is None:
        return [line.rstrip()]
    text = str(entry.get("message", ""))
    if entry.get("stack_trace"):
        text += "\n" + str(entry["stack_trace"])
    return text.splitlines()


class LineWrapper:
    """Turns a stream of lines into JSON lines, one entry per line, except a Python
    traceback, which becomes one ERROR entry from its first line to the exception's.
    Lines that are JSON objects already pass unchanged."""

    def __init__(self, process: str) -> None:
        self.process = process
        self._block: list[str] = []
        self._block_process = process
        self._last_severity = "DEFAULT"

    def feed(self, raw: str) -> Iterator[bytes]:
        line = raw.rstrip("\r\n").rsplit("\r", 1)[-1]  # a progress bar's last state
        child = _CHILD.match(line)
        body = line[child.end() :] if child else line
        if self._block:
            self._block.append(body)
            ends = body and not body[0].isspace()
            if ends or len(self._block) >= MAX_BLOCK_LINES:
                yield from self.flush()
            return
        if body == TRACEBACK:
            self._block = [body]
            self._block_process = f"{self.process}/{child['child']}" if child else self.process
            return
        if not body.strip():
            return
        if _json_object(body) is not None:
            yield body.encode()
            return
        if body[0].isspace():  # goes on from the line before (a warning's source line)
            yield _entry(self._last_severity, body, self.process)
            return
        severity, message, process = classify(line, self.process)
        self._last_severity = severity
        yield _entry(severity, message, process)

    def flush(self) -> Iterator[bytes]:
        if self._block:
            yield _entry("ERROR", "\n".join(self._block), self._block_process)
            self._block = []
