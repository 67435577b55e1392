"""vLLM plugin: the engine may use Intel AMX tiles, whoever uses them first.

Linux hands out AMX tile state only to a process that asks for it
(arch_prctl ARCH_REQ_XCOMP_PERM); a tile instruction before that is SIGILL.
vLLM's CPU attention picks its AMX kernel on any CPU that has AMX (bf16, as
the demo model and most checkpoints are) but leaves the asking to oneDNN,
which asks only when it runs a GEMM with AMX itself. With `--enable-lora` the
linear layers take another path, nothing asks, and the first request kills
the engine's worker (seen on a Sapphire Rapids host: exit -4 in
`cpu_attention_with_kv_cache`). Loaded in every vLLM process through the
`vllm.general_plugins` entry point, this asks once, through PyTorch.
"""

from __future__ import annotations


def register() -> None:
    """The `vllm.general_plugins` entry point: ask for AMX where the CPU has it."""
    import torch

    if torch.cpu._is_amx_tile_supported():
        torch._C._cpu._init_amx()
