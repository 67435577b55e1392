"""A tiny, random BLIP-2 (vision encoder, Q-Former, OPT) that vLLM can serve with no download.

The text demo (`engine.demo_model`) cannot take images, so this model lets the image paths of
the stack (chat content parts, token-in generate with content parts) run on a machine with no
model hub and no GPU. BLIP-2 is the one vision-language family vLLM serves here: LLaVA,
Qwen-VL, Gemma 3 and PaliGemma need torchvision for their processors, and torchvision cannot
be installed beside this CPU torch, while BLIP-2's image processor has a PIL-only twin.

It reuses the text demo's tokenizer plus one special token, `<image>`. vLLM's BLIP-2 path puts
`NUM_QUERY_TOKENS` `<image>` tokens at the very start of the prompt (before the BOS) for the
image, whatever the text says, so the chat template renders image parts as nothing. Its output
is noise; every build is byte-identical on any machine.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

from engine.demo_model import (
    BOS_ID,
    EOS_ID,
    MAX_POSITIONS,
    PAD_ID,
    VOCAB_SIZE,
    _json_bytes,
    _random,
    _tokenizer_json,
    ensure_built,
    model_files,
    write_model,
)

if TYPE_CHECKING:  # torch is imported lazily: importing this module should stay cheap
    import torch

DEMO_VISION_MODEL_NAME = "vgate-demo-vision"
# Bump when any output byte changes, so caches built by older code are not reused.
DEMO_VISION_MODEL_VERSION = 1

IMAGE_TOKEN = "<image>"
IMAGE_TOKEN_ID = VOCAB_SIZE  # the one token added after the text demo's vocabulary
NUM_QUERY_TOKENS = 4  # tokens per image, at the start of the prompt
TEXT_VOCAB_SIZE = VOCAB_SIZE + 1

TEXT_HIDDEN = 128
TEXT_FFN = 256
TEXT_LAYERS = 2
TEXT_HEADS = 2  # head_dim 64: vLLM's CPU attention refuses head_dim 16.
VISION_HIDDEN = 64
VISION_FFN = 128
VISION_HEADS = 2
IMAGE_SIZE = 32
PATCH_SIZE = 16
NUM_POSITIONS = (IMAGE_SIZE // PATCH_SIZE) ** 2 + 1  # patches plus the class token
QFORMER_HIDDEN = 64
QFORMER_FFN = 128
QFORMER_HEADS = 2
SEED = 20240602

# Like the text demo's, but content may also be a list of parts (vLLM then passes the OpenAI
# parts through): text parts are rendered, image parts are not, since vLLM's BLIP-2 path
# inserts the image tokens itself (its placeholder string is None).
CHAT_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}"
    "{% if message['role'] not in ['system', 'user', 'assistant'] %}"
    "{{ raise_exception('Roles must be system, user or assistant') }}{% endif %}"
    "### {{ message['role'] }}:\n"
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for part in message['content'] %}"
    "{% if part['type'] == 'text' %}{{ part['text'] }}{% endif %}"
    "{% endfor %}{% endif %}{{ eos_token }}\n{% endfor %}"
    "{% if add_generation_prompt %}### assistant:\n{% endif %}"
)

# BLIP-2's (CLIP) normalisation, at the model's 32x32 input size.
_IMAGE_PROCESSOR = {
    "do_convert_rgb": True,
    "do_normalize": True,
    "do_rescale": True,
    "do_resize": True,
    "image_mean": [0.48145466, 0.4578275, 0.40821073],
    "image_processor_type": "BlipImageProcessor",  # transformers 5 falls back to the PIL one
    "image_std": [0.26862954, 0.26130258, 0.27577711],
    "processor_class": "Blip2Processor",
    "resample": 3,
    "rescale_factor": 1 / 255,
    "size": {"height": IMAGE_SIZE, "width": IMAGE_SIZE},
}


def _tokenizer_with_image_token() -> str:
    """The text demo's tokenizer with `<image>` added as a special token (id VOCAB_SIZE)."""
    from tokenizers import AddedToken, Tokenizer

    tokenizer = Tokenizer.from_str(_tokenizer_json())
    tokenizer.add_special_tokens([AddedToken(IMAGE_TOKEN, special=True, normalized=False)])
    if tokenizer.token_to_id(IMAGE_TOKEN) != IMAGE_TOKEN_ID:
        raise RuntimeError(f"{IMAGE_TOKEN} did not get id {IMAGE_TOKEN_ID}")
    return tokenizer.to_str(pretty=True)


def _linear(name: str, out_dim: int, in_dim: int) -> dict[str, tuple[int, ...]]:
    return {f"{name}.weight": (out_dim, in_dim), f"{name}.bias": (out_dim,)}


def _norm(name: str, dim: int) -> dict[str, tuple[int, ...]]:
    return {f"{name}.weight": (dim,), f"{name}.bias": (dim,)}


def _shapes() -> dict[str, tuple[int, ...]]:
    """Every tensor under the Hugging Face BLIP-2 checkpoint names (lm_head is tied)."""
    v, q, t = VISION_HIDDEN, QFORMER_HIDDEN, TEXT_HIDDEN
    shapes: dict[str, tuple[int, ...]] = {"query_tokens": (1, NUM_QUERY_TOKENS, q)}
    shapes |= _linear("language_projection", t, q)
    e = "vision_model.embeddings."
    shapes |= {f"{e}class_embedding": (1, 1, v), f"{e}position_embedding": (1, NUM_POSITIONS, v)}
    shapes |= {f"{e}patch_embedding.weight": (v, 3, PATCH_SIZE, PATCH_SIZE)}
    shapes |= {f"{e}patch_embedding.bias": (v,)}
    p = "vision_model.encoder.layers.0."
    shapes |= _linear(f"{p}self_attn.qkv", 3 * v, v) | _linear(f"{p}self_attn.projection", v, v)
    shapes |= _linear(f"{p}mlp.fc1", VISION_FFN, v) | _linear(f"{p}mlp.fc2", v, VISION_FFN)
    shapes |= _norm(f"{p}layer_norm1", v) | _norm(f"{p}layer_norm2", v)
    shapes |= _norm("vision_model.post_layernorm", v)
    shapes |= _norm("qformer.layernorm", q)
    p = "qformer.encoder.layer.0."
    for block, kv_in in (("attention", q), ("crossattention", v)):  # cross: reads the image
        a = f"{p}{block}."
        shapes |= _linear(f"{a}attention.query", q, q) | _linear(f"{a}output.dense", q, q)
        shapes |= _linear(f"{a}attention.key", q, kv_in) | _linear(f"{a}attention.value", q, kv_in)
        shapes |= _norm(f"{a}output.LayerNorm", q)
    shapes |= _linear(f"{p}intermediate_query.dense", QFORMER_FFN, q)
    shapes |= _linear(f"{p}output_query.dense", q, QFORMER_FFN)
    shapes |= _norm(f"{p}output_query.LayerNorm", q)
    d = "language_model.model.decoder."
    shapes |= {f"{d}embed_tokens.weight": (TEXT_VOCAB_SIZE, t)}
    shapes |= {f"{d}embed_positions.weight": (MAX_POSITIONS + 2, t)}  # OPT's offset of 2
    shapes |= _norm(f"{d}final_layer_norm", t)
    for i in range(TEXT_LAYERS):
        p = f"{d}layers.{i}."
        for name in ("q_proj", "k_proj", "v_proj", "out_proj"):
            shapes |= _linear(f"{p}self_attn.{name}", t, t)
        shapes |= _linear(f"{p}fc1", TEXT_FFN, t) | _linear(f"{p}fc2", t, TEXT_FFN)
        shapes |= _norm(f"{p}self_attn_layer_norm", t) | _norm(f"{p}final_layer_norm", t)
    return shapes


def _weights() -> dict[str, torch.Tensor]:
    """Seeded bf16 tensors; norm weights are ones and biases zeros."""
    import torch

    gen = torch.Generator().manual_seed(SEED)  # drawn in sorted-name order, as saved
    weights: dict[str, torch.Tensor] = {}
    for name, shape in sorted(_shapes().items()):
        if name.endswith(".bias"):
            weights[name] = torch.zeros(shape, dtype=torch.bfloat16)
        elif len(shape) == 1:
            weights[name] = torch.ones(shape, dtype=torch.bfloat16)
        else:
            weights[name] = _random(gen, shape)
    return weights


def _config() -> dict[str, Any]:
    """A BLIP-2 config with an OPT text model."""
    text = {
        "model_type": "opt",
        "vocab_size": TEXT_VOCAB_SIZE,
        "hidden_size": TEXT_HIDDEN,
        "word_embed_proj_dim": TEXT_HIDDEN,
        "ffn_dim": TEXT_FFN,
        "num_hidden_layers": TEXT_LAYERS,
        "num_attention_heads": TEXT_HEADS,
        "max_position_embeddings": MAX_POSITIONS,
        "activation_function": "relu",
        "do_layer_norm_before": True,
        "enable_bias": True,
        "layer_norm_elementwise_affine": True,
        "tie_word_embeddings": True,
        "torch_dtype": "float32",
        "bos_token_id": BOS_ID,
        "eos_token_id": EOS_ID,
        "pad_token_id": PAD_ID,
    }
    vision = {
        "model_type": "blip_2_vision_model",
        "hidden_size": VISION_HIDDEN,
        "intermediate_size": VISION_FFN,
        "num_hidden_layers": 1,
        "num_attention_heads": VISION_HEADS,
        "image_size": IMAGE_SIZE,
        "patch_size": PATCH_SIZE,
        "hidden_act": "gelu",
        "layer_norm_eps": 1e-6,
        "qkv_bias": True,
    }
    qformer = {
        "model_type": "blip_2_qformer",
        "hidden_size": QFORMER_HIDDEN,
        "intermediate_size": QFORMER_FFN,
        "num_hidden_layers": 1,
        "num_attention_heads": QFORMER_HEADS,
        "encoder_hidden_size": VISION_HIDDEN,
        "cross_attention_frequency": 1,
        "hidden_act": "gelu",
        "layer_norm_eps": 1e-12,
    }
    return {
        "architectures": ["Blip2ForConditionalGeneration"],
        "model_type": "blip-2",
        "num_query_tokens": NUM_QUERY_TOKENS,
        "image_token_index": IMAGE_TOKEN_ID,
        "use_decoder_only_language_model": True,
        "tie_word_embeddings": True,
        "text_config": text,
        "vision_config": vision,
        "qformer_config": qformer,
        # Stored as bf16 (small), computed in float32, as in the text demo.
        "torch_dtype": "float32",
        "bos_token_id": BOS_ID,
        "eos_token_id": EOS_ID,
        "pad_token_id": PAD_ID,
    }


def write_demo_vision_model(target: Path) -> Path:
    """Write the model directory into `target` (created if missing) and return it."""
    processor = {"num_query_tokens": NUM_QUERY_TOKENS, "processor_class": "Blip2Processor"}
    files = model_files(
        _config(), _tokenizer_with_image_token(), CHAT_TEMPLATE, processor_class="Blip2Processor"
    )
    files["preprocessor_config.json"] = _json_bytes(_IMAGE_PROCESSOR)
    files["processor_config.json"] = _json_bytes(processor)
    return write_model(target, files, _weights())


def ensure_demo_vision_model(cache_dir: Path | None = None) -> Path:
    """Return the cached model, building it once (as the text demo is built)."""
    name = f"demo-vision-v{DEMO_VISION_MODEL_VERSION}"
    return ensure_built(name, write_demo_vision_model, cache_dir)
