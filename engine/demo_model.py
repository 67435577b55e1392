"""A tiny, random Llama that vLLM can serve with no download.

Its text output is noise: the model exists so that the whole stack (vLLM, nginx, the gateway,
the tests and the benchmarks) runs on a machine with no model hub and no GPU. Everything is
made here from a seed and a built-in corpus, so every build is byte-identical on any machine.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # torch is imported lazily: importing this module should stay cheap
    import torch

DEMO_MODEL_NAME = "vgate-demo"
# Bump when any output byte changes, so caches built by older code are not reused.
DEMO_MODEL_VERSION = 2

# 768 rather than 1024: with untied bf16 embeddings a 1024 vocabulary makes the weights 1.12 MB.
VOCAB_SIZE = 768
HIDDEN_SIZE = 128
INTERMEDIATE_SIZE = 256
NUM_LAYERS = 2
NUM_HEADS = 2  # head_dim 64: vLLM's CPU attention refuses head_dim 16.
NUM_KV_HEADS = 1
HEAD_DIM = HIDDEN_SIZE // NUM_HEADS
MAX_POSITIONS = 2048
SEED = 20240601
INIT_STD = 0.02
SPECIAL_TOKENS = ("<pad>", "<s>", "</s>")  # ids 0, 1, 2
PAD_ID, BOS_ID, EOS_ID = 0, 1, 2

# Plain role headers; the BOS comes from the template because vLLM renders chat prompts
# without adding special tokens. Unknown roles fail loudly instead of being rendered.
CHAT_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}"
    "{% if message['role'] not in ['system', 'user', 'assistant'] %}"
    "{{ raise_exception('Roles must be system, user or assistant') }}{% endif %}"
    "### {{ message['role'] }}:\n{{ message['content'] }}{{ eos_token }}\n{% endfor %}"
    "{% if add_generation_prompt %}### assistant:\n{% endif %}"
)

_CORPUS = """\
The river runs past the old mill and under the stone bridge before it reaches the sea. In the
morning the water is cold and clear, and small fish swim in the shadow of the reeds. Farmers
bring their wheat to the mill in carts, and the miller weighs every sack before he grinds it.
Children wait on the bridge to watch the boats, counting the sails as they pass below.

A good recipe for bread needs only flour, water, salt and yeast, but it also needs patience.
Mix the dough, knead it for ten minutes, and leave it covered in a warm place until it has
doubled in size. Shape the loaf gently, bake it in a hot oven, and let it cool on a rack before
cutting it, or the crumb will be heavy and wet.

The library opens at nine o'clock on weekdays and at ten on Saturday. Visitors may borrow up
to five books at a time for three weeks. Maps, newspapers and rare manuscripts stay in the
reading room, where quiet conversation is allowed but telephone calls are not. Please return
books to the desk near the entrance so that they can be checked and put back on the shelves.

Computers follow instructions exactly, which is both their strength and their weakness. A
program that works for a thousand inputs may fail on the next one, so engineers write tests,
measure performance and read the logs when something goes wrong. A server answers requests
from many clients at once, and a queue keeps the work in order when traffic is high.

In winter the mountain village is quiet. Snow covers the roofs, smoke rises from every chimney,
and the road to the valley is often closed for days. People repair tools, knit warm clothes and
tell long stories by the fire. When spring arrives, the streams grow loud, the meadows turn green
and the shepherds lead their flocks back up to the high pastures.

Questions and answers make a conversation. Hello, how are you today? I am fine, thank you, and
you? What would you like to know about the weather, the time or the news? Could you explain how
this works, please? Of course: first we read the message, then we think, and then we reply with
a short and helpful answer. Thank you very much for your help. You are welcome; have a nice day.

Numbers appear everywhere: 1, 2, 3, 10, 42, 100, 2048 and 3.14. A table may hold names, dates
and prices, such as (apple, 0.50), [pear, 1.25] or {plum: 2}. Symbols like +, -, *, /, =, %, #,
@, &, <, > and the quotes "yes" and 'no' are common in code, email and mathematics.
"""


def _json_bytes(obj: dict[str, Any]) -> bytes:
    """Serialise with sorted keys and a final newline so the bytes never depend on dict order."""
    return (json.dumps(obj, indent=2, sort_keys=True, ensure_ascii=False) + "\n").encode()


def _tokenizer_json() -> str:
    """Train the byte-level BPE; serial training so merge order cannot vary between runs."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB_SIZE,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    # Single-threaded, for determinism. Read on every call (unlike RAYON_NUM_THREADS,
    # fixed when rayon's pool first starts); restored after, as the caller had it.
    saved = os.environ.get("TOKENIZERS_PARALLELISM")
    os.environ["TOKENIZERS_PARALLELISM"] = "false"
    try:
        tokenizer.train_from_iterator(_CORPUS.split("\n\n"), trainer=trainer)
    finally:
        if saved is None:
            del os.environ["TOKENIZERS_PARALLELISM"]
        else:
            os.environ["TOKENIZERS_PARALLELISM"] = saved
    if tokenizer.get_vocab_size() != VOCAB_SIZE:
        raise RuntimeError(f"corpus too small for {VOCAB_SIZE} tokens")
    # Like Llama: plain encodes (e.g. /v1/completions) start with BOS.
    tokenizer.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", BOS_ID)]
    )
    return tokenizer.to_str(pretty=True)


def _random(gen: torch.Generator, shape: tuple[int, ...]) -> torch.Tensor:
    """Near-normal bf16 noise from integers only (sum of 4 uniforms), so identical on any CPU.

    torch.normal's vectorised kernels may differ in the last bit between AVX2 and AVX-512.
    """
    import torch

    ints = torch.randint(0, 4096, (4, *shape), generator=gen, dtype=torch.int64).sum(0)
    std = (4 * (4096**2 - 1) / 12) ** 0.5
    return ((ints - 8190).to(torch.float32) * (INIT_STD / std)).to(torch.bfloat16)


def _weights() -> dict[str, torch.Tensor]:
    """Seeded tensors under the exact Hugging Face Llama names; norms are ones."""
    import torch

    h, kv, ff = HIDDEN_SIZE, NUM_KV_HEADS * HEAD_DIM, INTERMEDIATE_SIZE
    attn = {"q_proj": (h, h), "k_proj": (kv, h), "v_proj": (kv, h), "o_proj": (h, h)}
    mlp = {"gate_proj": (ff, h), "up_proj": (ff, h), "down_proj": (h, ff)}
    shapes = {"model.embed_tokens.weight": (VOCAB_SIZE, h), "lm_head.weight": (VOCAB_SIZE, h)}
    shapes["model.norm.weight"] = (h,)
    for i in range(NUM_LAYERS):
        p = f"model.layers.{i}."
        shapes |= {f"{p}self_attn.{name}.weight": shape for name, shape in attn.items()}
        shapes |= {f"{p}mlp.{name}.weight": shape for name, shape in mlp.items()}
        shapes |= {f"{p}{n}.weight": (h,) for n in ("input_layernorm", "post_attention_layernorm")}
    gen = torch.Generator().manual_seed(SEED)  # drawn in sorted-name order, as saved
    return {
        name: torch.ones(shape, dtype=torch.bfloat16) if len(shape) == 1 else _random(gen, shape)
        for name, shape in sorted(shapes.items())
    }


def _config() -> dict[str, Any]:
    """A Llama config in the classic spelling, which transformers 4 and 5 and vLLM all read."""
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "vocab_size": VOCAB_SIZE,
        "hidden_size": HIDDEN_SIZE,
        "intermediate_size": INTERMEDIATE_SIZE,
        "num_hidden_layers": NUM_LAYERS,
        "num_attention_heads": NUM_HEADS,
        "num_key_value_heads": NUM_KV_HEADS,
        "head_dim": HEAD_DIM,
        "max_position_embeddings": MAX_POSITIONS,
        "hidden_act": "silu",
        "rms_norm_eps": 1e-5,
        "rope_theta": 10000.0,
        "tie_word_embeddings": False,
        # Stored as bf16 (small), computed in float32: CPUs without AVX-512 have no
        # fast bf16 path in vLLM, and float32 streamed 1.7x the tokens/s here.
        "torch_dtype": "float32",
        "bos_token_id": BOS_ID,
        "eos_token_id": EOS_ID,
        "pad_token_id": PAD_ID,
    }


def write_demo_model(target: Path) -> Path:
    """Write the model directory into `target` (created if missing) and return it."""
    files = model_files(_config(), _tokenizer_json(), CHAT_TEMPLATE)
    return write_model(target, files, _weights())


def model_files(
    config: dict[str, Any], tokenizer_json: str, chat_template: str, **tokenizer_extra: Any
) -> dict[str, bytes]:
    """A demo model directory's files but its weights: config, generation config, tokenizer."""
    tokens = {"bos_token": "<s>", "eos_token": "</s>", "pad_token": "<pad>"}
    ids = {"bos_token_id": BOS_ID, "eos_token_id": EOS_ID, "pad_token_id": PAD_ID}
    tokenizer_config = tokens | {"tokenizer_class": "PreTrainedTokenizerFast"}
    tokenizer_config |= {"model_max_length": MAX_POSITIONS, "chat_template": chat_template}
    tokenizer_config["clean_up_tokenization_spaces"] = False  # decoding must round-trip text
    return {
        "config.json": _json_bytes(config),
        "generation_config.json": _json_bytes(ids),
        "special_tokens_map.json": _json_bytes(tokens),
        "tokenizer.json": (tokenizer_json + "\n").encode(),
        "tokenizer_config.json": _json_bytes(tokenizer_config | tokenizer_extra),
    }


def write_model(target: Path, files: dict[str, bytes], weights: dict[str, torch.Tensor]) -> Path:
    from safetensors.torch import save_file

    target.mkdir(parents=True, exist_ok=True)
    for name, data in files.items():
        (target / name).write_bytes(data)
    save_file(weights, str(target / "model.safetensors"), metadata={"format": "pt"})
    (target / "model.safetensors").chmod(0o644)  # safetensors writes 0600; others may serve it
    return target


def default_cache_dir() -> Path:
    """$VGATE_CACHE_DIR, else $XDG_CACHE_HOME/vgate, else ~/.cache/vgate."""
    if explicit := os.environ.get("VGATE_CACHE_DIR"):
        return Path(explicit)
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg) if xdg else Path.home() / ".cache") / "vgate"


def ensure_demo_model(cache_dir: Path | None = None) -> Path:
    """Return the cached model, building it once."""
    return ensure_built(f"demo-model-v{DEMO_MODEL_VERSION}", write_demo_model, cache_dir)


def ensure_built(name: str, write: Callable[[Path], Path], cache_dir: Path | None) -> Path:
    """The model directory `name` in the cache, written by `write` the first time.

    The build goes to a temporary sibling that is renamed into place, so a crash never leaves
    half a model and concurrent builders are safe: whoever renames last finds the target taken,
    discards its copy and uses the winner's (the bytes are identical anyway).
    """
    root = cache_dir if cache_dir is not None else default_cache_dir()
    target = root / name
    if target.is_dir():
        return target
    root.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", suffix=".tmp", dir=root))
    try:
        tmp.chmod(0o755)  # mkdtemp makes it 0700
        write(tmp)
        try:
            os.rename(tmp, target)
        except OSError:
            if not target.is_dir():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target
