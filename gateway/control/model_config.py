"""Google's model config file for /update_models, read into the models it lists.

The co-host notebook writes a YAML list, one entry per model: `Args:` (the whole
command line, launcher included, as a deployment's container args), `Env:` (a list
of `{name, value}`), and optionally `DeployedModel:` (Vertex's id, not used here).
Each entry's Args go through the same translation and parser as `vgate serve`'s
(an entry may itself be a co-host list). Pure, but for reading the file.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

from engine.gcs import is_gcs, make_client, split_uri
from engine.model_set import ModelSpec
from gateway.config import ConfigError, resolve
from gateway.control.google_args import translate
from gateway.control.model_plan import model_specs

MAX_CONFIG_BYTES = 1 << 20  # a list of models and flags; anything larger is not one
ENTRY_KEYS = frozenset({"Args", "Env", "DeployedModel"})


def read_config_file(path: str) -> str:
    """The file's text, at most MAX_CONFIG_BYTES: a gs:// object or a local path."""
    too_large = f"{path}: larger than {MAX_CONFIG_BYTES} bytes: not a model config"
    try:
        if is_gcs(path):
            bucket, name = split_uri(path)
            blob = make_client().bucket(bucket).get_blob(name)
            if blob is None:
                raise ConfigError(f"{path}: no such object")
            if (blob.size or 0) > MAX_CONFIG_BYTES:
                raise ConfigError(too_large)
            data = blob.download_as_bytes(end=MAX_CONFIG_BYTES)
        else:
            with Path(path).open("rb") as f:
                data = f.read(MAX_CONFIG_BYTES + 1)
    except ConfigError:
        raise
    except Exception as e:  # the storage client's and the file system's, many kinds
        raise ConfigError(f"{path}: cannot be read: {e.__class__.__name__}: {e}") from None
    if len(data) > MAX_CONFIG_BYTES:
        raise ConfigError(too_large)
    try:
        return data.decode()
    except UnicodeDecodeError:
        raise ConfigError(f"{path}: not UTF-8 text") from None


def parse_entries(text: str) -> list[tuple[list[str], dict[str, str]]]:
    """Each entry's (Args, Env), checked for shape; one line names what is wrong."""
    try:
        entries = yaml.safe_load(text)
    except yaml.YAMLError as e:
        raise ConfigError(f"model config: not YAML: {str(e).splitlines()[0]}") from None
    if not isinstance(entries, list) or not entries:
        raise ConfigError("model config: must be a non-empty list of models (- Args: [...])")
    out = []
    for i, entry in enumerate(entries):
        where = f"model config [{i}]"
        if not isinstance(entry, dict):
            raise ConfigError(f"{where}: must be a mapping with Args (and Env)")
        unknown = sorted(set(map(str, entry)) - ENTRY_KEYS)
        if unknown:
            raise ConfigError(f"{where}: unknown key(s) {', '.join(unknown)}")
        args = entry.get("Args")
        if not isinstance(args, list) or not args or not all(isinstance(a, str) for a in args):
            raise ConfigError(f"{where}.Args: must be a non-empty list of strings")
        out.append((args, _env(entry.get("Env"), f"{where}.Env")))
    return out


def _env(raw: Any, where: str) -> dict[str, str]:
    if raw is None:
        return {}
    if not isinstance(raw, list):
        raise ConfigError(f"{where}: must be a list of {{name, value}}")
    env = {}
    for item in raw:
        if not (isinstance(item, dict) and isinstance(item.get("name"), str) and item["name"]):
            raise ConfigError(f"{where}: each item needs a name (and a value)")
        value = item.get("value", "")
        env[item["name"]] = value if isinstance(value, str) else str(value)
    return env


def entry_specs(
    args: list[str], env: dict[str, str], where: str, container: dict[str, str]
) -> list[ModelSpec]:
    """One entry's models, as `vgate serve` with its Args and Env would serve them.

    Of its Env, what the container's environment already has is no change (Google's
    entries repeat the deployment's MODEL_ID, HF_TOKEN, ...): its engines' own
    environment is the rest."""
    try:
        translated = translate(args)
    except ValueError as e:
        raise ConfigError(f"{where}: {e}") from None
    try:
        config = resolve(translated.argv, env)
    except ConfigError as e:
        raise ConfigError(f"{where}: {e}") from None
    own_env = {k: v for k, v in {**translated.engine_env, **env}.items() if container.get(k) != v}
    return [
        ModelSpec(s.source, s.engine_args, s.replicas, s.memory_share, own_env)
        for s in model_specs(config)
    ]


def config_specs(text: str, container: dict[str, str]) -> list[ModelSpec]:
    """Every model the file lists, in its order (`container`: see entry_specs)."""
    specs: list[ModelSpec] = []
    for i, (args, env) in enumerate(parse_entries(text)):
        specs += entry_specs(args, env, f"model config [{i}]", container)
    return specs
