"""The engine flags, read once by vLLM's own argument parser: the one typed view vgate asks.

vgate passes every flag it does not know to every engine. Reading them here,
with the parser vLLM's server itself uses, means a typo or a removed flag stops
`vgate serve` before anything starts (instead of crash-looping every engine),
aliases such as `-tp` mean what they mean to vLLM, and nothing re-scans the raw
list for a flag's value.
"""

from __future__ import annotations

import argparse
import contextlib
import difflib
import os
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from typing import NoReturn

GiB = 1 << 30


def default_max_num_seqs(
    device: str,
    world_size: int = 1,
    gpu_memory: int = 0,
    gpu_name: str = "",
    performance_mode: str = "balanced",
) -> int:
    """vLLM 0.32's --max-num-seqs default for its OpenAI server (EngineArgs.get_batch_defaults).

    CPU: 128 per worker (tensor x pipeline parallel). GPU: 1024 with 160 GiB of
    memory or more, or 70 GiB or more on anything but an A100; else 256 (also when
    the GPU's facts are unknown: `gpu_memory` 0). Doubled by --performance-mode
    throughput. tests/unit/test_vllm_args.py checks this against vLLM's own.
    """
    if device == "cpu":
        seqs = 128 * world_size
    elif gpu_memory >= 160 * GiB or (gpu_memory >= 70 * GiB and "a100" not in gpu_name.lower()):
        seqs = 1024
    else:
        seqs = 256
    return seqs * 2 if performance_mode == "throughput" else seqs


class EngineArgsError(ValueError):
    """vLLM refuses the engine flags; the message names the flag and vLLM's reason."""


ENGINE_DEFAULT_PORT = 8000  # vLLM's


@dataclass(frozen=True)
class EngineArgs:
    """What vgate needs to know of the engine flags (vLLM's parser read them)."""

    model_tag: str | None = None  # `vgate serve MODEL`, as `vllm serve MODEL`
    tensor_parallel_size: int = 1
    pipeline_parallel_size: int = 1
    max_num_seqs: int | None = None  # None: vLLM's default for the device
    enable_lora: bool = False
    served_model_name: list[str] | None = None
    lora_modules: tuple[str, ...] = ()  # the operator's adapters' names (--lora-modules)
    distributed_executor_backend: str | None = None
    performance_mode: str = "balanced"  # vLLM's --performance-mode ("throughput" doubles)

    @property
    def spans_hosts(self) -> bool:
        """Ray's executor: one replica over every GPU of the Ray cluster (multi-host)."""
        return self.distributed_executor_backend == "ray"

    @property
    def gpus_per_replica(self) -> int:
        """One replica is one tensor x pipeline parallel group on this machine."""
        return self.tensor_parallel_size * self.pipeline_parallel_size

    def sequences_per_engine(self, device: str, gpu_memory: int = 0, gpu_name: str = "") -> int:
        """Sequences one engine runs at once: the flag if given, else vLLM's default.

        `gpu_memory` (bytes) and `gpu_name`: the engine's first GPU, as vLLM's default
        depends on them (0 and "": unknown, the smallest GPU default).
        """
        if self.max_num_seqs is not None:
            return self.max_num_seqs
        return default_max_num_seqs(
            device, self.gpus_per_replica, gpu_memory, gpu_name, self.performance_mode
        )


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """Nothing vLLM prints while it is imported here reaches our output.

    What it says about this process's platform is not about the engines (they
    say it again), and `vgate serve` refuses a bad flag in exactly one line.
    """
    sys.stdout.flush()
    sys.stderr.flush()
    saved = [os.dup(1), os.dup(2)]
    with open(os.devnull, "w") as null:
        os.dup2(null.fileno(), 1)
        os.dup2(null.fileno(), 2)
    try:
        yield
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        for fd, copy in zip((1, 2), saved, strict=True):
            os.dup2(copy, fd)
            os.close(copy)


def _parser() -> argparse.ArgumentParser:
    # Imported here: vLLM takes seconds to import, and only `vgate serve` needs it.
    from vllm.entrypoints.launchers.cli_args import make_arg_parser
    from vllm.utils.argparse_utils import FlexibleArgumentParser

    class Refusing(FlexibleArgumentParser):
        """vLLM's parser, raising its refusal instead of printing usage and exiting."""

        def error(self, message: str) -> NoReturn:
            raise EngineArgsError(_with_suggestion(self, message))

    return make_arg_parser(Refusing(prog="vllm"))


def _with_suggestion(parser: argparse.ArgumentParser, message: str) -> str:
    prefix = "unrecognized arguments: "
    if not message.startswith(prefix):
        return message
    known = list(parser._option_string_actions)  # argparse's table of the parser's flags
    for arg in message.removeprefix(prefix).split():
        close = difflib.get_close_matches(arg.split("=", 1)[0], known, n=1)
        if arg.startswith("-") and close:
            return f"{message} (did you mean {close[0]}?)"
    return message


def read_engine_args(argv: list[str]) -> EngineArgs:
    """Parse and check the engine flags as vLLM's server would, before any engine starts."""
    with _quiet():  # a refusal is raised, and reported, once our output is back
        from vllm.entrypoints.launchers.cli_args import validate_parsed_serve_args

        args = _parser().parse_args(argv)
        try:
            validate_parsed_serve_args(args)
        except (TypeError, ValueError) as e:
            raise EngineArgsError(str(e).removeprefix("Error: ")) from None
    if args.host is not None or args.port != ENGINE_DEFAULT_PORT or args.uds:
        raise EngineArgsError(
            "--host, --port and --uds are vgate's: the engines listen on loopback only, "
            "nginx is the front door (vgate serve --host/--port)"
        )
    served = args.served_model_name
    return EngineArgs(
        model_tag=args.model_tag,
        tensor_parallel_size=args.tensor_parallel_size,
        pipeline_parallel_size=args.pipeline_parallel_size,
        max_num_seqs=args.max_num_seqs,
        enable_lora=bool(args.enable_lora),
        served_model_name=[served] if isinstance(served, str) else served,
        lora_modules=tuple(m.name for m in args.lora_modules or ()),
        distributed_executor_backend=args.distributed_executor_backend,
        performance_mode=args.performance_mode,
    )
