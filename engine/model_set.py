"""Several models in one container, as Google's co-host server takes them: one list per flag.

Google's `model_cohost_server` gives each of `--model`'s comma-separated models its
own value of a few flags by position (`--served-model-name=a,b`,
`--tensor-parallel-size=1,2`, ...), or one value for all; every other engine flag
applies to every model. This splits such a command line into one engine command
line per model, each then read and checked by vLLM's own parser (engine.vllm_args).
Pure but for the models file (MODELS_FILE).
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

from engine.files import write_atomic

# vLLM's flags that Google's co-host server takes one value per model of, by their
# spellings (vLLM's parser accepts each), to the canonical name.
PER_MODEL_FLAGS = {
    "--served-model-name": "--served-model-name",
    "--max-model-len": "--max-model-len",
    "--tensor-parallel-size": "--tensor-parallel-size",
    "-tp": "--tensor-parallel-size",
    "--pipeline-parallel-size": "--pipeline-parallel-size",
    "-pp": "--pipeline-parallel-size",
}
# Characters a model's name may not have: nginx's routing carries names in its
# configuration (a quoted string, where $ starts a variable) and splits on spaces.
NAME_FORBIDDEN = frozenset(' \t\n\r"\\$;{}')


class ModelSetError(ValueError):
    """Lists that do not fit the models; one line, exit code 2."""


@dataclass(frozen=True)
class ModelSpec:
    """One model of the container, as given: where from, its engine flags, its share."""

    source: str | None  # --model: a Hugging Face id, a local dir, gs://; None: the demo model
    engine_args: list[str] = field(default_factory=list)  # shared flags, then its own values
    replicas: int | None = None  # None: the default placement
    memory_share: float | None = None  # --gpu-memory-partition: of the machine's GPU memory
    env: dict[str, str] = field(default_factory=dict)  # its engines' own environment


def split_list(flag: str, text: str, count: int) -> list[str]:
    """`a,b` as one value per model; one value (no comma) is every model's."""
    values = [v.strip() for v in text.split(",")]
    if len(values) == 1:
        return values * count
    if len(values) != count or not all(values):
        raise ModelSetError(
            f"{flag}: {len(values)} values for {count} model{'s' * (count != 1)} "
            f"({text!r}): give one per model, comma-separated, or one for all"
        )
    return values


def _per_model(engine_args: list[str]) -> tuple[list[str], dict[str, str]]:
    """The shared flags, and the per-model flags' raw values (the last one given wins,
    as in vLLM's parser)."""
    shared: list[str] = []
    values: dict[str, str] = {}
    i = 0
    while i < len(engine_args):
        arg = engine_args[i]
        name, eq, inline = arg.partition("=")
        canonical = PER_MODEL_FLAGS.get(name)
        if canonical is None:
            shared.append(arg)
            i += 1
            continue
        if eq:
            values[canonical] = inline
            i += 1
            continue
        taken = []  # vLLM's --served-model-name takes several words: every name of one model
        i += 1
        while i < len(engine_args) and not engine_args[i].startswith("-"):
            taken.append(engine_args[i])
            i += 1
            if canonical != "--served-model-name":
                break
        if not taken:
            raise ModelSetError(f"{name}: expected a value")
        values[canonical] = ",".join(taken) if len(taken) == 1 else " ".join(taken)
    return shared, values


def split_models(
    sources: list[str],
    engine_args: list[str],
    replicas: list[int] | None = None,
    shares: list[float] | None = None,
) -> list[ModelSpec]:
    """One ModelSpec per model of `sources` (none: the demo model, one).

    `replicas` and `shares` (--replicas / --model-replicas, --gpu-memory-partition):
    one value per model, or one for all. With one model nothing is split: its flags
    go to vLLM as written (`--served-model-name a b` is one model with two names).
    """
    models: list[str | None] = list(sources) or [None]
    count = len(models)
    for flag, given in (("--replicas", replicas), ("--gpu-memory-partition", shares)):
        if given is not None and len(given) not in (1, count):
            raise ModelSetError(
                f"{flag}: {len(given)} values for {count} model{'s' * (count != 1)}: "
                "give one per model, comma-separated, or one for all"
            )
    if shares is not None and sum(shares if len(shares) == count else shares * count) > 1:
        raise ModelSetError(
            f"--gpu-memory-partition: {','.join(f'{s:g}' for s in shares)} adds up to more "
            "than the whole machine's memory (1)"
        )
    if count == 1:
        shared, own = engine_args, [[]]
    else:
        shared, values = _per_model(engine_args)
        own = [[] for _ in models]
        for flag, text in values.items():
            if flag == "--served-model-name" and " " in text:
                raise ModelSetError(
                    f"{flag}: with several models, give one name per model, comma-separated"
                )
            for i, value in enumerate(split_list(flag, text, count)):
                own[i].append(f"{flag}={value}")
        names = values.get("--served-model-name")
        if names is not None and len(set(split_list("--served-model-name", names, count))) < count:
            raise ModelSetError(f"--served-model-name: {names!r}: each model needs its own name")
    return [
        ModelSpec(
            source=source,
            engine_args=[*shared, *own[i]],
            replicas=None if replicas is None else (replicas * count)[i],
            memory_share=None if shares is None else (shares * count)[i],
        )
        for i, source in enumerate(models)
    ]


def check_name(name: str) -> str:
    """A model's name as clients send it, fit for nginx's routing; refused in one line."""
    bad = sorted(set(name) & NAME_FORBIDDEN)
    if not name or bad:
        shown = ", ".join(repr(c) for c in bad) or "nothing"
        raise ModelSetError(f"model name {name!r}: must not be empty or hold {shown}")
    return name


MODELS_FILE = "models.json"  # the served models, in order: written by serve and update


@dataclass(frozen=True)
class ServedModel:
    """A model as it is served: the name that routes to it, every name vLLM answers to."""

    name: str  # its first served name: what the routing, the metrics and /health call it
    names: list[str]
    spec: ModelSpec
    model: str  # what its engines' --model is (a gs:// model's local mirror)
    group: int = 1  # GPUs per replica (tensor x pipeline parallel size)
    sequences: int = 0  # each engine's --max-num-seqs (vLLM's default when not given)
    extra_args: list[str] = field(default_factory=list)  # vgate's, after the spec's flags


def flag_groups(args: list[str]) -> list[str]:
    """A command line as its flags, each with its values (`--a=1`, `--a 1` alike), sorted:
    two lines that differ only in order or spelling ask for the same engines."""
    groups: list[list[str]] = []
    for arg in args:
        if arg.startswith("-") or not groups:
            groups.append(arg.split("=", 1) if arg.startswith("--") else [arg])
        else:
            groups[-1].append(arg)
    return sorted("=".join(g) if len(g) == 2 else " ".join(g) for g in groups)


def spec_key(spec: ModelSpec) -> tuple[object, ...]:
    """What decides a model's engines: an update keeps a model whose key is unchanged."""
    return (
        spec.source,
        tuple(flag_groups(spec.engine_args)),
        spec.replicas,
        spec.memory_share,
        tuple(sorted(spec.env.items())),
    )


def save_models(models: list[ServedModel], path: Path) -> None:
    write_atomic(path, json.dumps([asdict(m) for m in models], indent=1))


def load_models(path: Path) -> list[ServedModel]:
    return [
        ServedModel(**{**m, "spec": ModelSpec(**m["spec"])}) for m in json.loads(path.read_text())
    ]
