"""Google's /update_models config: its YAML read into models, and what an update keeps,
adds and removes (gateway/control/model_config.py, model_update.plan_update)."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from engine.demo_model import ensure_demo_model
from engine.model_set import ServedModel, spec_key
from engine.workers import EngineWorker
from gateway.config import Config, ConfigError, resolve
from gateway.control.model_config import config_specs, parse_entries, read_config_file
from gateway.control.model_plan import model_specs
from gateway.control.model_update import plan_update

CONTAINER = {"MODEL_ID": "org/a", "DEPLOY_SOURCE": "notebook"}


def _entry(model: str, name: str, **extra: object) -> dict:
    args = [
        "python", "-m", "vllm.entrypoints.model_cohost_server", "--host=0.0.0.0",
        "--port=8080", f"--model={model}", "--gpu-memory-partition=0.45",
        "--model-replicas=1", "--swap-space=16", f"--served-model-name={name}",
        "--max-model-len=512",
    ]  # fmt: skip
    env = [{"name": k, "value": v} for k, v in CONTAINER.items()]
    return {"Args": args, "Env": env, **extra}


def test_the_notebooks_entries_are_its_models() -> None:
    text = yaml.safe_dump([_entry("/m/a", "alpha"), _entry("/m/b", "beta", DeployedModel="m1")])
    a, b = config_specs(text, CONTAINER)
    assert (a.source, b.source) == ("/m/a", "/m/b")
    assert "--served-model-name=beta" in b.engine_args and "--max-model-len=512" in b.engine_args
    assert (a.replicas, a.memory_share) == (1, 0.45)
    assert a.env == {}  # what the container's environment already has is no change
    (changed,) = config_specs(yaml.safe_dump([_entry("/m/a", "alpha")]), {})
    assert changed.env == CONTAINER


def test_an_entry_is_the_same_model_as_the_cohost_list_started() -> None:
    """Unchanged models keep running: the split list and the entry ask for the same engines."""
    started = model_specs(
        resolve(
            ["--model=/m/a,/m/b", "--served-model-name=alpha,beta", "--max-model-len=512",
             "--gpu-memory-partition=0.45,0.45", "--replicas=1,1"],
            {},
        )
    )  # fmt: skip
    (entry,) = config_specs(yaml.safe_dump([_entry("/m/a", "alpha")]), CONTAINER)
    assert spec_key(entry) == spec_key(started[0]) != spec_key(started[1])


@pytest.mark.parametrize(
    ("text", "says"),
    [
        ("{", "not YAML"),
        ("[]", "must be a non-empty list"),
        ("- 3", r"model config \[0\]: must be a mapping"),
        ("- Args: []", r"model config \[0\].Args: must be a non-empty list"),
        ("- Args: [--model=x]\n  Envs: []", r"unknown key\(s\) Envs"),
        ("- Args: [--model=x]\n  Env: [{value: 1}]", r"Env: each item needs a name"),
        ("- Args: [--model=x, --port=nope]", r"model config \[0\]: --port: invalid value"),
    ],
)
def test_a_config_that_is_not_one_is_refused_naming_what(text: str, says: str) -> None:
    with pytest.raises(ConfigError, match=says):
        config_specs(text, {}) if "Args: [--model" in text else parse_entries(text)


def test_the_file_is_bounded(tmp_path: Path) -> None:
    big = tmp_path / "big.yaml"
    big.write_bytes(b"#" * (2 << 20))
    with pytest.raises(ConfigError, match="larger than"):
        read_config_file(str(big))
    with pytest.raises(ConfigError, match="cannot be read"):
        read_config_file(str(tmp_path / "none.yaml"))


def test_an_update_keeps_adds_and_removes_by_model(tmp_path: Path) -> None:
    demo = str(ensure_demo_model())
    config = Config(routing="prefix", max_inflight=64, download_dir=str(tmp_path))
    started = config_specs(yaml.safe_dump([_entry(demo, "alpha"), _entry(demo, "beta")]), CONTAINER)
    names = ("alpha", "beta")
    current = [ServedModel(n, [n], s, demo) for n, s in zip(names, started, strict=True)]
    workers = [
        EngineWorker(0, 9000, "cpu:0", [], model="alpha"),
        EngineWorker(1, 9001, "cpu:1", [], model="beta"),
    ]
    text = yaml.safe_dump([_entry(demo, "alpha"), _entry(demo, "gamma")])
    plan = plan_update(config, current, workers, text, CONTAINER)
    assert plan.answer() == {
        "status": "success", "kept": ["alpha"], "added": ["gamma"], "removed": ["beta"],
    }  # fmt: skip
    assert [m.name for m in plan.models] == ["alpha", "gamma"]
    (new,) = plan.workers
    assert new.model == "gamma" and new.replica == 2  # not a number still in use
    assert "--served-model-name=gamma" in new.argv
    with pytest.raises(ConfigError, match="two models are served as 'alpha'"):
        plan_update(
            config, current, workers, yaml.safe_dump([_entry(demo, "alpha")] * 2), CONTAINER
        )
