"""A test hook loaded into the engines (vLLM's --logits-processors): a query of death.

A request whose `vllm_xargs` hold {"vgate_test_die": 1} makes the engine core
that schedules it exit at once, as a crash on a bad input would; each such exit
is first recorded in the file $VGATE_TEST_DEATHS. It never changes logits.
"""

from __future__ import annotations

import os

import torch
from vllm.v1.sample.logits_processor import BatchUpdate, LogitsProcessor

MARKER = "vgate_test_die"


class DieOnMarker(LogitsProcessor):
    def __init__(self, vllm_config: object, device: torch.device, is_pin_memory: bool) -> None:
        self.deaths = os.environ["VGATE_TEST_DEATHS"]

    def is_argmax_invariant(self) -> bool:
        return True

    def update_state(self, batch_update: BatchUpdate | None) -> None:
        for _, params, _, _ in batch_update.added if batch_update else ():
            if (params.extra_args or {}).get(MARKER):
                with open(self.deaths, "a") as f:
                    f.write(f"{os.getpid()}\n")
                os._exit(70)

    def apply(self, logits: torch.Tensor) -> torch.Tensor:
        return logits
