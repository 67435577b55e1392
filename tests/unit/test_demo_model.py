"""The demo model must be reproducible, loadable by transformers and cheap to cache."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest

from engine import demo_model
from engine.demo_model import ensure_demo_model, write_demo_model

EXPECTED_FILES = {
    "config.json",
    "generation_config.json",
    "model.safetensors",
    "special_tokens_map.json",
    "tokenizer.json",
    "tokenizer_config.json",
}


def _digests(directory: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in directory.iterdir()}


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_demo_model(tmp_path_factory.mktemp("demo"))


def test_build_is_byte_identical(model_dir: Path, tmp_path: Path) -> None:
    again = write_demo_model(tmp_path / "again")
    assert set(_digests(model_dir)) == EXPECTED_FILES
    assert _digests(again) == _digests(model_dir)


def test_files_hold_no_paths(model_dir: Path) -> None:
    for path in model_dir.iterdir():
        assert str(model_dir).encode() not in path.read_bytes()


def test_config_sizes(model_dir: Path) -> None:
    config = json.loads((model_dir / "config.json").read_text())
    assert config["architectures"] == ["LlamaForCausalLM"]
    assert config["hidden_size"] // config["num_attention_heads"] == config["head_dim"] == 64
    assert config["hidden_size"] == 128
    assert config["num_hidden_layers"] == 2
    assert config["num_attention_heads"] == 2
    assert config["num_key_value_heads"] == 1
    assert config["intermediate_size"] == 256
    assert config["max_position_embeddings"] == 2048
    assert config["tie_word_embeddings"] is False
    assert config["torch_dtype"] == "float32"
    assert (config["bos_token_id"], config["eos_token_id"]) == (1, 2)


def test_weights_are_small_and_complete(model_dir: Path) -> None:
    from safetensors import safe_open

    assert (model_dir / "model.safetensors").stat().st_size < 1_000_000
    with safe_open(str(model_dir / "model.safetensors"), framework="pt") as weights:
        assert weights.metadata() == {"format": "pt"}
        names = set(weights.keys())
        embed = weights.get_tensor("model.embed_tokens.weight")
    assert "lm_head.weight" in names
    assert "model.layers.1.mlp.down_proj.weight" in names
    assert str(embed.dtype) == "torch.bfloat16"
    assert tuple(embed.shape) == (demo_model.VOCAB_SIZE, 128)
    assert 0.015 < embed.float().std().item() < 0.025


def test_tokenizer_round_trips(model_dir: Path) -> None:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    assert len(tokenizer) == demo_model.VOCAB_SIZE
    special = (tokenizer.bos_token, tokenizer.eos_token, tokenizer.pad_token)
    assert special == ("<s>", "</s>", "<pad>")
    text = "Hello, how are you today? The river runs past the mill: 42 + 7 = 49."
    ids = tokenizer(text)["input_ids"]
    assert ids[0] == tokenizer.bos_token_id
    assert tokenizer.decode(ids, skip_special_tokens=True) == text


def test_chat_template(model_dir: Path) -> None:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    messages = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Hello!"},
        {"role": "assistant", "content": "Hi."},
        {"role": "user", "content": "Bye?"},
    ]
    prompt = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    assert prompt.startswith("<s>")
    assert "Bye?" in prompt
    assert prompt.endswith("### assistant:\n")
    closed = tokenizer.apply_chat_template(messages, tokenize=False)
    assert closed.endswith("</s>\n")
    with pytest.raises(Exception, match="Roles must be"):
        tokenizer.apply_chat_template([{"role": "tool", "content": "x"}], tokenize=False)


def test_ensure_builds_once(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    builds: list[Path] = []

    def counting_write(target: Path) -> Path:
        builds.append(target)
        return write_demo_model(target)

    monkeypatch.setattr(demo_model, "write_demo_model", counting_write)
    first = ensure_demo_model(tmp_path)
    mtime = (first / "config.json").stat().st_mtime_ns
    second = ensure_demo_model(tmp_path)
    assert first == second
    assert len(builds) == 1
    assert (second / "config.json").stat().st_mtime_ns == mtime
    assert list(tmp_path.iterdir()) == [first]
    assert {p.name for p in first.iterdir()} == EXPECTED_FILES


def test_ensure_survives_losing_the_race(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    target = tmp_path / f"demo-model-v{demo_model.DEMO_MODEL_VERSION}"

    def rival_finishes_first(directory: Path) -> Path:
        write_demo_model(target)  # another process renames its build into place meanwhile
        (target / "marker").write_text("winner")
        return write_demo_model(directory)

    monkeypatch.setattr(demo_model, "write_demo_model", rival_finishes_first)
    assert ensure_demo_model(tmp_path) == target
    assert (target / "marker").read_text() == "winner"
    assert list(tmp_path.iterdir()) == [target]


def test_default_cache_dir(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("VGATE_CACHE_DIR", str(tmp_path / "explicit"))
    assert demo_model.default_cache_dir() == tmp_path / "explicit"
    monkeypatch.delenv("VGATE_CACHE_DIR")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert demo_model.default_cache_dir() == tmp_path / "xdg" / "vgate"
    monkeypatch.delenv("XDG_CACHE_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert demo_model.default_cache_dir() == tmp_path / "home" / ".cache" / "vgate"
