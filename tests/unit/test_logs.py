"""Every log line is one JSON object Cloud Logging reads, whatever wrote it."""

from __future__ import annotations

import json
import logging
import logging.config
import subprocess
import sys
from collections.abc import Iterator

import pytest

from engine.logs import (
    LineWrapper,
    classify,
    json_formatter,
    readable,
    vllm_logging_config,
)

SEVERITIES = {
    "DEFAULT",
    "DEBUG",
    "INFO",
    "NOTICE",
    "WARNING",
    "ERROR",
    "CRITICAL",
    "ALERT",
    "EMERGENCY",
}


def _entries(lines: Iterator[bytes]) -> list[dict]:
    entries = [json.loads(line) for line in lines]
    for entry in entries:
        assert entry["severity"] in SEVERITIES and entry["time"] and entry["process"], entry
    return entries


def _record(level: int, message: str, exc_info: object = None) -> logging.LogRecord:
    return logging.LogRecord("vgate.test", level, __file__, 1, message, None, exc_info)


@pytest.mark.parametrize(
    ("level", "severity"),
    [
        (logging.DEBUG, "DEBUG"),
        (logging.INFO, "INFO"),
        (logging.WARNING, "WARNING"),
        (logging.ERROR, "ERROR"),
        (logging.CRITICAL, "CRITICAL"),
    ],
)
def test_python_records_carry_cloud_loggings_fields(level: int, severity: str) -> None:
    entry = json.loads(json_formatter("monitor").format(_record(level, "replica 1: ready")))
    assert entry["severity"] == severity and entry["message"] == "replica 1: ready"
    assert entry["process"] == "monitor" and entry["logger"] == "vgate.test"
    assert entry["time"].startswith("20") and "T" in entry["time"]


def test_an_exception_is_in_the_same_entry() -> None:
    try:
        raise ValueError("bad")
    except ValueError:
        entry = json.loads(json_formatter("x").format(_record(40, "failed", sys.exc_info())))
    assert entry["severity"] == "ERROR" and "ValueError: bad" in entry["stack_trace"]


@pytest.mark.parametrize(
    ("line", "severity", "process", "message"),
    [
        (
            "2026-12-01 09:00:00,123 WARN exited: engine-0 (exit status 1; not expected)",
            "WARNING",
            "supervisord",
            "exited: engine-0 (exit status 1; not expected)",
        ),
        ("2026-12-01 09:00:00,123 CRIT running as root", "CRITICAL", "supervisord", None),
        (
            "2026/12/01 09:00:00 [error] 12#12: *3 connect() failed (111: Connection refused)",
            "ERROR",
            "nginx",
            "*3 connect() failed (111: Connection refused)",
        ),
        ("2026/12/01 09:00:00 [notice] 12#12: signal process started", "NOTICE", "nginx", None),
        ("2026/12/01 09:00:00 [emerg] 12#12: bind() failed", "EMERGENCY", "nginx", None),
        ('nginx: [warn] the "user" directive makes sense only as root', "WARNING", "nginx", None),
        ("INFO 12-01 09:00:00 [api_server.py:12] Starting vLLM", "INFO", "engine-0", None),
        ("WARNING 12-01 09:00:00 [config.py:3] bf16 is not supported", "WARNING", "engine-0", None),
        ("INFO:     Started server [12]", "INFO", "engine-0", "Started server [12]"),
        ("ERROR:    Exception in ASGI application", "ERROR", "engine-0", None),
        ("[W1201 09:00:00.000000 12 file.cpp:34] Warning: oneDNN", "WARNING", "engine-0", None),
        ("[E1201 09:00:00.000000 12 file.cpp:34] failed", "ERROR", "engine-0", None),
        (
            "(EngineCore_DP0 pid=77) INFO 12-01 09:00:00 [core.py:1] ready",
            "INFO",
            "engine-0/EngineCore_DP0",
            None,
        ),
        ("Loading safetensors checkpoint shards: 100% 1/1", "DEFAULT", "engine-0", None),
        ("/x/d.py:138: FutureWarning: reduce_op is deprecated", "WARNING", "engine-0", None),
    ],
)
def test_foreign_lines_get_the_severity_their_form_gives(
    line: str, severity: str, process: str, message: str | None
) -> None:
    got_severity, got_message, got_process = classify(line, "engine-0")
    assert (got_severity, got_process) == (severity, process)
    if message is not None:
        assert got_message == message


def test_json_lines_pass_unchanged_and_others_are_wrapped() -> None:
    wrapper = LineWrapper("vgate")
    own = '{"severity": "INFO", "message": "hi", "process": "monitor", "time": "t"}'
    out = [*wrapper.feed(own + "\n"), *wrapper.feed("plain words\n"), *wrapper.feed("\n")]
    assert out[0] == own.encode()
    assert _entries(iter(out[1:])) == [
        {**json.loads(out[1]), "severity": "DEFAULT", "message": "plain words", "process": "vgate"}
    ]
    assert len(out) == 2  # the blank line is nothing


def test_a_traceback_is_one_error_entry() -> None:
    wrapper = LineWrapper("engine-1")
    lines = [
        "Traceback (most recent call last):\n",
        '  File "x.py", line 1, in <module>\n',
        "    boom()\n",
        "RuntimeError: engine core died\n",
        "INFO after\n",
    ]
    entries = _entries(e for line in lines for e in wrapper.feed(line))
    assert [e["severity"] for e in entries] == ["ERROR", "INFO"]
    assert entries[0]["message"].splitlines()[-1] == "RuntimeError: engine core died"
    assert entries[0]["message"].startswith("Traceback") and entries[0]["process"] == "engine-1"


def test_an_unfinished_traceback_comes_out_at_the_end() -> None:
    wrapper = LineWrapper("x")
    assert not list(wrapper.feed("Traceback (most recent call last):\n"))
    assert not list(wrapper.feed('  File "x.py", line 1\n'))
    [entry] = _entries(wrapper.flush())
    assert entry["severity"] == "ERROR" and "x.py" in entry["message"]


def test_a_line_that_goes_on_from_the_last_has_its_severity() -> None:
    wrapper = LineWrapper("x")
    lines = ["/x/a.py:3: UserWarning: careful\n", "  value = lookup(x)\n", "plain\n", "\tmore\n"]
    entries = _entries(e for line in lines for e in wrapper.feed(line))
    assert [e["severity"] for e in entries] == ["WARNING", "WARNING", "DEFAULT", "DEFAULT"]


def test_a_progress_bar_is_its_last_state() -> None:
    [entry] = _entries(LineWrapper("x").feed("shards:  0%\rshards: 50%\rshards: 100%\n"))
    assert entry["message"] == "shards: 100%"


def test_readable_gives_a_json_entrys_message_and_stack() -> None:
    line = json.dumps({"message": "failed", "stack_trace": "Traceback\nValueError: x"})
    assert readable(line) == ["failed", "Traceback", "ValueError: x"]
    assert readable("plain\n") == ["plain"]


def test_vllms_loggers_write_our_format_through_its_config(capsys) -> None:
    config = vllm_logging_config("engine-3", "json")
    config["handlers"]["vgate"]["stream"] = "ext://sys.stderr"  # where capsys looks
    loggers = [logging.getLogger(name) for name in ("vllm", "vgate")]
    saved = [(lg.handlers[:], lg.level, lg.propagate) for lg in loggers]
    try:
        logging.config.dictConfig(config)
        logging.getLogger("vllm.engine").warning("KV cache is %d%% full", 96)
        logging.getLogger("vgate.lora").info("fetched %s", "gs://b/a")
    finally:
        for lg, (handlers, level, propagate) in zip(loggers, saved, strict=True):
            lg.handlers[:], lg.level, lg.propagate = handlers, level, propagate
    entries = _entries(iter(capsys.readouterr().err.splitlines()))
    assert [(e["severity"], e["message"], e["process"]) for e in entries] == [
        ("WARNING", "KV cache is 96% full", "engine-3"),
        ("INFO", "fetched gs://b/a", "engine-3"),
    ]


def test_an_uncaught_exception_is_one_critical_entry() -> None:
    code = "from engine.logs import configure; configure('vgate'); raise ValueError('boom')"
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=False
    )
    assert result.returncode == 1
    [entry] = _entries(iter(result.stderr.splitlines()))
    assert entry["severity"] == "CRITICAL" and "ValueError: boom" in entry["stack_trace"]


def test_text_for_a_terminal() -> None:
    code = (
        "import logging; from engine.logs import configure; configure('monitor'); "
        "logging.getLogger('vgate.monitor').warning('replica %d down', 1)"
    )
    result = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
        env={"VGATE_LOG_FORMAT": "text", "PATH": ""},
    )
    assert result.stderr.rstrip().endswith(" WARNING monitor: replica 1 down")
