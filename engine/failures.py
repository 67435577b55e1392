"""Why an engine could not start, in one line, and what to change.

The launcher keeps the last lines vLLM printed; when the engine exits before it
ever got ready, this picks the line that says why (a Python exception's last
line, or vLLM's last ERROR record) and recognises the failures users meet most.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass

# Lines vLLM ends on when it fails: "ValueError: ..." (a traceback's last line),
# "torch.OutOfMemoryError: ...", or a log record at ERROR level.
_EXCEPTION = re.compile(r"^(?:[\w.]+\.)?\w*(?:Error|Exception|Exit)\b:? ?.*")
_ERROR_RECORD = re.compile(r"\bERROR\b")
# pydantic's "1 validation error for ModelConfig" says why on the line after it.
_PYDANTIC = re.compile(r"validation errors? for \w+$")
MAX_CAUSE = 400  # characters: one readable log line
_NOISE = re.compile(r"^\s*(?:\^+|~+|File \"|During handling|The above exception|Traceback)")

HINTS: list[tuple[re.Pattern[str], str]] = [
    (
        re.compile(r"out of memory|OutOfMemoryError|No available memory for the cache", re.I),
        "the model and its KV cache do not fit: lower --max-num-seqs, --max-model-len or "
        "--gpu-memory-utilization, or give each replica more GPUs (--tensor-parallel-size)",
    ),
    (
        re.compile(r"GatedRepoError|gated repo|401 Client Error|Access to model .* is restricted"),
        "the Hugging Face repo is gated: set HF_TOKEN to a token of an account that accepted "
        "the model's licence",
    ),
    (
        re.compile(r"max_model_len .*(greater|larger) than|max_model_len.*exceeds", re.I),
        "lower --max-model-len to at most the model's context length (its config.json's "
        "max_position_embeddings)",
    ),
    (
        re.compile(r"architectures? .*(not supported|are not supported)|Cannot find model module"),
        "this vLLM release cannot serve the model's architecture: check vLLM's supported "
        "models, or use an image with a newer vLLM",
    ),
]


@dataclass(frozen=True)
class Failure:
    cause: str
    hint: str | None = None

    def line(self) -> str:
        return f"{self.cause} ({self.hint})" if self.hint else self.cause


def cause_line(lines: Sequence[str]) -> str:
    """The line that says why: the last exception, else the last ERROR record, else the last."""
    text = [line.strip() for line in lines if line.strip() and not _NOISE.match(line)]
    for pattern in (_EXCEPTION, _ERROR_RECORD):
        for i in range(len(text) - 1, -1, -1):
            line = text[i]
            if pattern.search(line) if pattern is _ERROR_RECORD else pattern.match(line):
                if _PYDANTIC.search(line) and i + 1 < len(text):  # the reason is on the next line
                    line = f"{line}: {text[i + 1]}"
                return line[:MAX_CAUSE] + ("…" if len(line) > MAX_CAUSE else "")
    return text[-1] if text else "it printed nothing"


def classify(lines: Sequence[str], exit_code: int | None = None) -> Failure:
    """The cause of a failed start and, for the failures users meet most, what to change."""
    cause = cause_line(lines)
    if exit_code is not None and exit_code < 0 and not lines:
        cause = f"killed by signal {-exit_code}"
    whole = "\n".join(lines[-200:])
    for pattern, hint in HINTS:
        if pattern.search(cause) or pattern.search(whole):
            return Failure(cause, hint)
    return Failure(cause)


# Exits in a row before a replica ever got ready that make it `failed`.
FAILED_STARTS = 3


@dataclass
class _Starts:
    seen: int | None = None  # exit records read so far (None: none read yet)
    failed: int = 0  # exits in a row that came before the replica got ready
    ready: bool = False  # ready since its last exit
    last: Failure | None = None


class StartWatch:
    """Tells, from each replica's exit records, which replicas cannot start.

    An exit after the replica was ready is an ordinary crash (supervisord
    restarts it); FAILED_STARTS exits in a row before it was ever ready mean it
    never will, whatever the number of retries: a bad flag value, a model that
    does not fit, a missing token.
    """

    def __init__(self, limit: int = FAILED_STARTS) -> None:
        self.limit = limit
        self._starts: dict[int, _Starts] = {}

    def update(self, replica: int, exits: Sequence[Failure], ready: bool) -> Failure | None:
        """The replica's failure once it has failed to start `limit` times in a row."""
        s = self._starts.setdefault(replica, _Starts())
        if s.seen is None:  # a restarted monitor: what happened before is not a failed start
            s.seen = len(exits)
        s.ready = s.ready or ready
        for failure in exits[s.seen :]:
            s.failed = 0 if s.ready else s.failed + 1
            s.ready = False
            s.last = failure
        s.seen = len(exits)
        return s.last if s.failed >= self.limit else None
