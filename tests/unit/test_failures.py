"""Why an engine could not start: the cause line, the hint, and when a replica counts as failed."""

import pytest

from engine.failures import Failure, StartWatch, cause_line, classify

TRACEBACK = """INFO 11-30 15:00:01 [api_server.py:1] vLLM API server version 0.32.0
Traceback (most recent call last):
  File "/x/vllm/engine/arg_utils.py", line 1, in create_engine_config
    raise ValueError(msg)
ValueError: User-specified max_model_len (4096) is greater than the derived max_model_len (max_position_embeddings=2048 in model's config.json).
""".splitlines()  # noqa: E501


def test_the_cause_is_the_exceptions_last_line() -> None:
    assert cause_line(TRACEBACK).startswith("ValueError: User-specified max_model_len (4096)")


def test_else_the_last_error_record_else_the_last_line() -> None:
    lines = ["INFO starting", "ERROR 11-30 [core.py:9] EngineCore failed to start.", "INFO bye"]
    assert cause_line(lines) == "ERROR 11-30 [core.py:9] EngineCore failed to start."
    assert cause_line(["INFO a", "INFO b"]) == "INFO b"
    assert cause_line([]) == "it printed nothing"


@pytest.mark.parametrize(
    ("last", "hint"),
    [
        (
            "torch.OutOfMemoryError: CUDA out of memory. Tried to allocate 2.00 GiB",
            "--max-num-seqs",
        ),
        ("ValueError: No available memory for the cache blocks. Try increasing", "--max-num-seqs"),
        (
            "huggingface_hub.errors.GatedRepoError: 401 Client Error. Cannot access gated repo",
            "HF_TOKEN",
        ),
        (
            "OSError: You are trying to access a gated repo. Access to model meta/x is restricted",
            "HF_TOKEN",
        ),
        (TRACEBACK[-1], "--max-model-len"),
        (
            "ValueError: Model architectures ['FooForCausalLM'] are not supported for now.",
            "architecture",
        ),
    ],
)
def test_the_failures_users_meet_most_say_what_to_change(last: str, hint: str) -> None:
    failure = classify(["INFO loading", last])
    assert failure.cause == last
    assert failure.hint and hint in failure.hint
    assert failure.line() == f"{last} ({failure.hint})"


def test_an_unknown_failure_has_no_hint() -> None:
    assert classify(["RuntimeError: something new"]) == Failure("RuntimeError: something new")


BAD = Failure("ValueError: bad")


def test_exits_before_ready_in_a_row_make_a_replica_failed() -> None:
    watch = StartWatch(limit=3)
    assert watch.update(0, [], ready=False) is None
    assert watch.update(0, [BAD], ready=False) is None
    assert watch.update(0, [BAD, BAD], ready=False) is None
    assert watch.update(0, [BAD, BAD, BAD], ready=False) == BAD
    assert watch.update(1, [], ready=False) is None  # replicas are counted apart


def test_a_crash_after_ready_is_not_a_failed_start() -> None:
    watch = StartWatch(limit=2)
    watch.update(0, [], ready=False)
    watch.update(0, [BAD], ready=False)  # one failed start
    watch.update(0, [BAD], ready=True)  # then it got ready
    assert watch.update(0, [BAD, BAD], ready=False) is None  # a crash: counting starts over
    assert watch.update(0, [BAD, BAD, BAD], ready=False) is None
    assert watch.update(0, [BAD, BAD, BAD, BAD], ready=False) == BAD


def test_a_restarted_monitor_does_not_count_old_exits() -> None:
    assert StartWatch(limit=1).update(0, [BAD, BAD], ready=False) is None


def test_a_pydantic_error_brings_its_reason() -> None:
    lines = [
        "pydantic_core._pydantic_core.ValidationError: 1 validation error for ModelConfig",
        "  Value error, User-specified max_model_len (4096) is greater than the derived "
        "max_model_len (max_position_embeddings=2048.0) [type=value_error, input_value=...]",
        "    For further information visit https://errors.pydantic.dev/2.14/v/value_error",
    ]
    failure = classify(lines)
    assert failure.cause.startswith(
        "pydantic_core._pydantic_core.ValidationError: 1 validation error for ModelConfig: "
        "Value error, User-specified max_model_len (4096)"
    )
    assert failure.hint and "--max-model-len" in failure.hint
