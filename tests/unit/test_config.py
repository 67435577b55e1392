"""Configuration: precedence, pass-through of engine flags, clear errors."""

import re
from dataclasses import replace

import pytest

from engine.vllm_args import EngineArgs
from gateway.config import Config, ConfigError, resolve


def test_defaults() -> None:
    config = resolve([], {})
    assert config == Config()
    assert config.port == 8080 and config.models == [] and config.engine_args == []


def test_flag_beats_vgate_env_beats_aip_env() -> None:
    env = {"VGATE_PORT": "9000", "AIP_HTTP_PORT": "7080"}
    assert resolve(["--port", "9100"], env).port == 9100
    assert resolve([], env).port == 9000
    assert resolve([], {"AIP_HTTP_PORT": "7080"}).port == 7080


def test_model_from_aip_storage_uri_then_model_id() -> None:
    assert resolve([], {"AIP_STORAGE_URI": "gs://b/m", "MODEL_ID": "org/x"}).models == ["gs://b/m"]
    assert resolve([], {"MODEL_ID": "org/x"}).models == ["org/x"]
    assert resolve([], {"AIP_STORAGE_URI": "", "MODEL_ID": "org/x"}).models == ["org/x"]
    assert resolve(["--model", "/m"], {"MODEL_ID": "org/x"}).models == ["/m"]


def test_vertex_routes() -> None:
    env = {
        "AIP_HEALTH_ROUTE": "/v1/endpoints/1/deployedModels/2",
        "AIP_PREDICT_ROUTE": "/p:predict",
    }
    config = resolve([], env)
    assert config.health_route == "/v1/endpoints/1/deployedModels/2"
    assert config.predict_route == "/p:predict"


def test_unknown_flags_pass_through_in_both_forms() -> None:
    config = resolve(
        [
            "--max-model-len",
            "512",
            "--port=7080",
            "--gpu-memory-utilization=0.9",
            "--enforce-eager",
            "--",
            "--seed",
            "3",
        ],
        {},
    )
    assert config.port == 7080
    assert config.engine_args == [
        "--max-model-len",
        "512",
        "--gpu-memory-utilization=0.9",
        "--enforce-eager",
        "--seed",
        "3",
    ]


def test_google_style_equals_forms() -> None:
    config = resolve(["--host=127.0.0.1", "--model=org/m", "--tensor-parallel-size=2"], {})
    assert (config.host, config.models) == ("127.0.0.1", ["org/m"])
    assert config.engine_args == ["--tensor-parallel-size=2"]  # vLLM's, read by vLLM's parser


def test_the_model_may_come_first_as_with_vllm_serve() -> None:
    config = resolve(["org/m", "--max-model-len", "64"], {"MODEL_ID": "org/other"})
    assert (config.models, config.engine_args) == (["org/m"], ["--max-model-len", "64"])
    with pytest.raises(ConfigError, match="the model is given twice"):
        resolve(["org/m", "--model", "org/n"], {})


def test_no_prefix_abbreviations() -> None:
    # "--max" must not be taken for --max-request-bytes: it is an engine flag.
    assert resolve(["--max", "1"], {}).engine_args == ["--max", "1"]


@pytest.mark.parametrize(
    ("argv", "env", "named"),
    [
        (["--port", "http"], {}, "--port: invalid value 'http' (expected a port number"),
        (["--port", "70000"], {}, "--port"),
        ([], {"AIP_HTTP_PORT": "x"}, "AIP_HTTP_PORT"),
        (["--replicas", "0"], {}, "--replicas"),
        (["--device", "tpu"], {}, "--device: invalid value 'tpu' (expected one of auto, cpu"),
        (["--request-timeout", "-1"], {}, "--request-timeout"),
    ],
)
def test_bad_values_name_their_source(argv: list[str], env: dict[str, str], named: str) -> None:
    with pytest.raises(ConfigError, match=re.escape(named)):
        resolve(argv, env)


def test_save_and_load_round_trip(tmp_path) -> None:
    config = resolve(["--port", "9", "--max-model-len", "5"], {"AIP_PREDICT_ROUTE": "/x"})
    config = replace(config, engine=EngineArgs(max_num_seqs=3, served_model_name=["a"]))
    config.save(tmp_path / "c.json")
    assert Config.load(tmp_path / "c.json") == config


def test_google_container_argument_forms() -> None:
    argv = [
        "--host=0.0.0.0",
        "--port=7080",
        "--model=/models/llama",
        "--max-model-len=4096",
        "--gpu-memory-utilization=0.95",
        "--max-loras=4",
    ]
    config = resolve(argv, {"HF_TOKEN": "x"})
    assert (config.host, config.port, config.models) == ("0.0.0.0", 7080, ["/models/llama"])
    assert config.engine_args == argv[3:]


def test_predict_limits() -> None:
    assert (Config().max_instances, Config().max_inflight) == (64, None)
    config = resolve(["--max-instances=8", "--max-inflight", "32"], {})
    assert (config.max_instances, config.max_inflight) == (8, 32)
    with pytest.raises(ConfigError, match="--max-inflight: invalid value '0'"):
        resolve(["--max-inflight", "0"], {})


def test_open_files_are_raised_to_what_the_host_allows() -> None:
    import resource

    from gateway.control.serve import open_files_target

    assert open_files_target(1024, 1048576) == 1048576
    assert open_files_target(4096, 4096) == 4096
    assert open_files_target(1024, resource.RLIM_INFINITY) == 1 << 20


@pytest.mark.parametrize("variable", ["VGATE_API_KEY", "VLLM_API_KEY"])
def test_a_key_from_either_variable_is_the_key(variable: str) -> None:
    assert resolve([], {variable: "key-one-1,key-two-2"}).api_keys == ["key-one-1", "key-two-2"]


def test_the_saved_config_has_no_key(tmp_path) -> None:
    config = resolve(["--api-key", "secret-key-one"], {"VGATE_API_KEY": "secret-key-two"})
    assert config.api_keys == ["secret-key-one"]
    config.save(tmp_path / "c.json")
    text = (tmp_path / "c.json").read_text()
    assert "secret-key" not in text
    assert Config.load(tmp_path / "c.json").api_keys == []


def test_several_models_and_their_lists() -> None:
    config = resolve(
        ["--model", "/m/a,/m/b", "--replicas", "1,2", "--gpu-memory-partition", "0.45,0.45"], {}
    )
    assert config.models == ["/m/a", "/m/b"]
    assert (config.replicas, config.gpu_memory_partition) == ([1, 2], [0.45, 0.45])
    assert resolve(["--model", "/m/a", "--model", "/m/b"], {}).models == ["/m/a", "/m/b"]
    for flag, value in (("--replicas", "1,x"), ("--gpu-memory-partition", "0.5,1.5")):
        with pytest.raises(ConfigError, match=f"^{flag}: invalid value"):
            resolve(["--model", "/m/a,/m/b", flag, value], {})
