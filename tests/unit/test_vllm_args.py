"""The engine flags read by vLLM's own parser: the typed view, and refusals that name the flag."""

import pytest

from engine.vllm_args import EngineArgs, EngineArgsError, read_engine_args


def test_defaults_and_the_values_vgate_asks_for() -> None:
    assert read_engine_args([]) == EngineArgs()
    args = read_engine_args(["--max-num-seqs=12", "--enable-lora", "--served-model-name", "a", "b"])
    assert (args.max_num_seqs, args.enable_lora, args.served_model_name) == (12, True, ["a", "b"])


@pytest.mark.parametrize(
    ("argv", "tp", "pp"),
    [
        (["-tp", "2"], 2, 1),
        (["-tp=4", "-pp=2"], 4, 2),
        (["--tensor-parallel-size=2", "--pipeline-parallel-size", "2"], 2, 2),
        (["--tensor_parallel_size=8"], 8, 1),  # vLLM takes underscores too
    ],
)
def test_vllm_aliases_mean_what_they_mean_to_vllm(argv: list[str], tp: int, pp: int) -> None:
    args = read_engine_args(argv)
    assert (args.tensor_parallel_size, args.pipeline_parallel_size) == (tp, pp)
    assert args.gpus_per_replica == tp * pp


def test_sequences_per_engine_is_the_flag_or_vllms_default() -> None:
    assert read_engine_args(["--max-num-seqs=12"]).sequences_per_engine("cuda") == 12
    assert EngineArgs().sequences_per_engine("cuda") == 256
    assert EngineArgs().sequences_per_engine("cpu") == 128


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (
            ["--max-num-seqz=3"],
            "unrecognized arguments: --max-num-seqz=3 (did you mean --max-num-seqs?)",
        ),
        (["--max-num-seqs", "x"], "argument --max-num-seqs: invalid int value: 'x'"),
        (["--swap-space=16"], "unrecognized arguments: --swap-space=16"),
        (["--enable-auto-tool-choice"], "--enable-auto-tool-choice requires --tool-call-parser"),
        (["--dtype", "float7"], "argument --dtype: invalid choice: 'float7'"),
    ],
)
def test_refusals_name_the_flag_and_vllms_reason(argv: list[str], message: str) -> None:
    with pytest.raises(EngineArgsError) as refused:
        read_engine_args(argv)
    assert str(refused.value).startswith(message)


def test_a_positional_among_the_flags_is_seen() -> None:
    assert read_engine_args(["--enforce-eager", "org/model"]).model_tag == "org/model"


@pytest.mark.parametrize("argv", [["--host", "0.0.0.0"], ["--port=9000"], ["--uds", "/tmp/s"]])
def test_engines_stay_on_loopback(argv: list[str]) -> None:
    # vgate serve -- --host 0.0.0.0 would put the raw engines on every interface.
    with pytest.raises(EngineArgsError, match="--host, --port and --uds are vgate's"):
        read_engine_args(argv)
