"""Google's Model Garden container arguments, as its notebooks write them, made vgate's.

Vertex appends a model's `serving_container_args` to the image's entrypoint
(`vgate serve`). Google's notebooks put the launcher itself in them
(`python -m vllm.entrypoints.api_server ...`), use its launcher flags, and
pass flags that vLLM removed or that only Google's fork has. Each is
recognised here and mapped to what vgate or vLLM 0.32 does instead, or
dropped, with one note that says which. Pure: the caller logs the notes.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass, field

# Launch commands that lead Google's argument lists; vgate is the launcher now.
VLLM_MODULES = (
    "vllm.entrypoints.api_server",
    "vllm.entrypoints.openai.api_server",
    "vllm.entrypoints.launchers.api_server.entry",
    # Google's fork: several copies behind nginx, or several models.
    "vllm.entrypoints.nginx_server",
    "vllm.entrypoints.model_cohost_server",
)
_PYTHON = re.compile(r"(.*/)?python[0-9.]*")
RAY_LAUNCHER = re.compile(r"(.*/)?ray_launcher\.sh")
# vLLM prints its periodic throughput line this often (s); effectively never.
QUIET_STATS_INTERVAL_S = "86400"


@dataclass(frozen=True)
class Translated:
    argv: list[str]  # for vgate's parser: its own flags, then engine flags
    engine_env: dict[str, str] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)


@dataclass(frozen=True)
class Rule:
    """What becomes of one of Google's flags. `value`: whether it takes one."""

    value: bool
    # (value) -> (arguments in its place, engine environment, note)
    apply: Callable[[str | None], tuple[list[str], dict[str, str], str]]


def _renamed(to: str) -> Rule:
    return Rule(True, lambda v: ([f"{to}={v}"], {}, f"as {to}={v}"))


def _dropped(takes_value: bool, why: str) -> Rule:
    return Rule(takes_value, lambda v: ([], {}, f"dropped: {why}"))


def _tool_parser(value: str | None) -> tuple[list[str], dict[str, str], str]:
    parser = GOOGLE_TOOL_PARSERS.get(value or "", value)
    note = f"as --tool-call-parser={parser}, vLLM's parser for the same format"
    return [f"--tool-call-parser={parser}"], {}, note if parser != value else ""


def _quiet_stats(_: str | None) -> tuple[list[str], dict[str, str], str]:
    env = {"VLLM_LOG_STATS_INTERVAL": QUIET_STATS_INTERVAL_S}
    note = (
        "not passed on: in vLLM 0.32 it removes every vllm:* metric, which vgate's /metrics, "
        "health and autoscaling read; the periodic stats log line is quieted instead "
        f"(VLLM_LOG_STATS_INTERVAL={QUIET_STATS_INTERVAL_S})"
    )
    return [], env, note


def _mm_limits(value: str | None) -> tuple[list[str], dict[str, str], str]:
    """`image=1,video=0` (older vLLM, Google's GKE samples) as the JSON vLLM 0.32 takes."""
    text = (value or "").strip().strip("'\"")
    if text.startswith("{"):
        return [f"--limit-mm-per-prompt={text}"], {}, ""
    pairs = dict(item.split("=", 1) for item in text.split(",") if "=" in item)
    limits = "{" + ", ".join(f'"{k.strip()}": {v.strip()}' for k, v in pairs.items()) + "}"
    return [f"--limit-mm-per-prompt={limits}"], {}, f"as --limit-mm-per-prompt={limits}"


def host_kv_offload(
    fraction: float | None, available_bytes: int, replicas: int, device: str
) -> tuple[list[str], str | None]:
    """Engine flags for a share of free host memory as a second-tier KV cache, and a note.

    Google's --host-prefix-kv-cache-utilization-target is a share of idle host memory
    for prefix KV blocks under the GPU cache; vLLM 0.32 does the same with its native
    KV offloading, sized per engine in GiB.
    """
    if not fraction:
        return [], None
    if device != "cuda":
        return [], "host KV cache: not used on the CPU, where the KV cache is host memory already"
    gib = round(fraction * available_bytes / 2**30 / replicas, 1)
    flags = ["--kv-offloading-backend=native", f"--kv-offloading-size={gib}"]
    return flags, f"host KV cache: {' '.join(flags)} per replica ({fraction:g} of free memory)"


# Tool-call parsers of Google's fork and vLLM's parser for the same output format.
GOOGLE_TOOL_PARSERS = {"vertex-llama-3": "llama3_json"}

_GPUS_SEEN = "vgate uses the GPUs it sees (CUDA_VISIBLE_DEVICES, else nvidia-smi)"

RULES: dict[str, Rule] = {
    # Google's launcher (nginx_server, model_cohost_server): model copies on the machine
    # (one value per model), the GPUs they share. Its --gpu-memory-partition and its lists
    # of models and per-model values are vgate's own (engine/model_set.py).
    "--num_instances": _renamed("--replicas"),
    "--num-instances": _renamed("--replicas"),
    "--model-replicas": _renamed("--replicas"),
    "--total_gpus": _dropped(True, _GPUS_SEEN),
    "--total-gpus": _dropped(True, _GPUS_SEEN),
    # Google's host-memory prefix cache: vLLM's own KV offloading (see host_kv_offload).
    "--host-prefix-kv-cache-utilization-target": _renamed("--host-kv-cache-fraction"),
    "--host-prefix-kv-cache-min-len": _dropped(
        True, "vLLM's KV offloading has no minimum length; every full block may be offloaded"
    ),
    # Old spellings of flags vLLM still has.
    "--limit_mm_per_prompt": Rule(True, lambda v: _mm_limits(v)),
    "--limit-mm-per-prompt": Rule(True, lambda v: _mm_limits(v)),
    "--num-speculative-tokens": _renamed("--speculative-config.num_speculative_tokens"),
    "--speculative-draft-tensor-parallel-size": _renamed(
        "--speculative-config.draft_tensor_parallel_size"
    ),
    # Removed from vLLM, or only in Google's fork.
    "--swap-space": _dropped(True, "vLLM's V1 engine has no CPU swap space"),
    "--model-type": _dropped(True, "vLLM reads the architecture from the model's config.json"),
    "--disable-log-requests": _dropped(
        False, "vLLM 0.32 logs no requests unless --enable-log-requests"
    ),
    "--disable-log-stats": Rule(False, _quiet_stats),
    "--tool-call-parser": Rule(True, _tool_parser),
}


def _launcher_length(argv: list[str]) -> int:
    """How many leading arguments launch vLLM (0: none)."""
    start = 1 if argv and RAY_LAUNCHER.fullmatch(argv[0]) else 0
    rest = argv[start:]
    if (
        len(rest) >= 3
        and _PYTHON.fullmatch(rest[0])
        and rest[1:2] == ["-m"]
        and (rest[2] in VLLM_MODULES)
    ):
        return start + 3
    if rest[:2] == ["vllm", "serve"]:
        return start + 2
    return start


def translate(argv: list[str]) -> Translated:
    """Google's argument list as vgate's: launcher dropped, Google-only flags mapped.

    Raises ValueError for what cannot be mapped.
    """
    notes: list[str] = []
    skip = _launcher_length(argv)
    if skip:
        notes.append(f"{' '.join(argv[:skip])}: dropped: vgate serve launches vLLM itself")
    if skip and RAY_LAUNCHER.fullmatch(argv[0]):
        notes.append("multi-host (Ray) is not started by vgate serve: this machine's GPUs only")
    out: list[str] = []
    env: dict[str, str] = {}
    i = skip
    while i < len(argv):
        arg = argv[i]
        if arg == "--":  # everything after it is vLLM's, as written
            out += argv[i:]
            break
        name, eq, inline = arg.partition("=")
        rule = RULES.get(name)
        if rule is None:
            out.append(arg)
            i += 1
            continue
        value: str | None = None
        if rule.value:
            if eq:
                value = inline
            elif i + 1 < len(argv):
                value = argv[i + 1]
                i += 1
        i += 1
        try:
            args, extra_env, note = rule.apply(value)
        except ValueError as e:
            raise ValueError(f"{name}: {e}") from None
        out += args
        env.update(extra_env)
        if note:
            notes.append(f"{name}{'' if value is None else '=' + value}: {note}")
    return Translated(out, env, notes)
