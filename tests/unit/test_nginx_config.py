"""The rendered nginx configuration (checked by nginx itself in tests/integration)."""

import dataclasses
import json

import pytest

from engine.model_set import ModelSpec, ServedModel
from engine.placement import plan
from engine.vllm_args import EngineArgs
from engine.workers import build_workers
from gateway.config import ConfigError, resolve
from gateway.control.nginx_config import (
    BALANCING_FILE,
    ROUTING_FILE,
    lua_modules,
    render_nginx,
    render_upstream,
    routing,
    write_routing,
)


def test_front_door_and_internal_listener(tmp_path) -> None:
    text = render_nginx(resolve(["--port", "7080", "--gateway-workers", "3"], {}), tmp_path)
    assert "listen 0.0.0.0:7080" in text
    assert f"listen unix:{tmp_path}/engines.sock;" in text
    assert text.count("server unix:") == 3
    assert f"include {tmp_path}/engines-upstream.conf;" in text
    assert "return 200 $vgate_upstream_generation;" in text
    assert "proxy_buffering off;" in text
    assert "client_max_body_size 1572864;" in text
    assert "proxy_read_timeout 600s;" in text


def test_openai_routes_share_the_inflight_cap_and_answer_429(tmp_path) -> None:
    text = render_nginx(resolve(["--max-inflight", "24", "--request-timeout", "60"], {}), tmp_path)
    assert text.count("limit_conn openai 24;") == 2  # /v1/ and the other engine routes
    assert "limit_conn_status 429;" in text and "error_page 429 = @over_capacity;" in text
    # The gateways keep the predict deadline themselves: nginx waits a little longer.
    assert "proxy_read_timeout 65s;" in text


def test_ipv6_host_is_bracketed(tmp_path) -> None:
    assert "listen [::]:8080" in render_nginx(resolve(["--host", "::"], {}), tmp_path)


def test_upstream_lists_ready_engines_and_marks_the_rest_down(tmp_path) -> None:
    placements = plan("cpu", [], [0, 1], replicas=2)
    workers = build_workers(placements, [9001, 9002], "py", "m", None, [], {}, name="alpha")
    text = render_upstream(workers, ready={1}, generation="42", run_dir=tmp_path)
    lines = [line.strip() for line in text.splitlines() if line.strip().startswith("server ")]
    assert lines[0].startswith("server 127.0.0.1:9001") and " down;" in lines[0]
    assert lines[1].startswith("server 127.0.0.1:9002") and " down;" not in lines[1]
    assert f"include {tmp_path}/{BALANCING_FILE};" in text  # least_conn or the Lua balancer
    assert "keepalive_timeout 4s;" in text  # below vLLM's 5 s
    assert text.index(BALANCING_FILE) < text.index("keepalive 64;")  # the balancer's pool
    assert 'default "42";' in text  # what the monitor waits to see after a reload
    # The ready engines and their models, for the Lua balancer.
    assert 'default "1=127.0.0.1:9002@alpha ";' in text


def test_routing_is_prefix_aware_where_nginx_can_be(tmp_path) -> None:
    assert routing(None, ["lua.so"], cjson=True) == "prefix"
    assert routing(None, [], cjson=True) == "least-conn"  # no Lua module: load alone
    assert routing(None, ["lua.so"], cjson=False) == "least-conn"
    assert routing("least-conn", ["lua.so"], cjson=True) == "least-conn"
    with pytest.raises(ConfigError, match="lua-cjson"):
        routing("prefix", ["lua.so"], cjson=False)
    spec = ModelSpec("/m/a")
    models = [
        ServedModel("alpha", ["alpha", "a"], spec, "/m/a"),
        ServedModel("beta", ["beta"], spec, "/m/b"),
    ]
    engine = EngineArgs(enable_lora=True, lora_modules=("sql-lora",))
    write_routing(tmp_path, "prefix", models, engine)
    assert "balancer_by_lua_block" in (tmp_path / BALANCING_FILE).read_text()
    assert json.loads((tmp_path / ROUTING_FILE).read_text()) == {
        "models": [{"name": "alpha", "names": ["alpha", "a"]}, {"name": "beta", "names": ["beta"]}],
        "adapters": ["sql-lora"],
        "lora": True,
    }
    write_routing(tmp_path, "least-conn", models[:1], EngineArgs())
    assert (tmp_path / BALANCING_FILE).read_text() == "least_conn;\n"


def test_prefix_routing_reads_bodies_only_where_engines_answer(tmp_path) -> None:
    if not lua_modules():
        pytest.skip("needs nginx's Lua module")
    config = dataclasses.replace(resolve([], {}), routing="prefix")
    locations = _locations(render_nginx(config, tmp_path))
    prepare = 'access_by_lua_block { require("vgate_routing").prepare() }'
    to_engines = [body for match, body in locations.items() if match.startswith("~ ^/")]
    assert len(to_engines) == 2 and all(prepare in body for body in to_engines)
    assert prepare not in locations["/"] and prepare not in locations["= /v1/models"]


def test_vertex_routes_reach_the_gateway_although_they_start_with_v1(tmp_path) -> None:
    env = {
        "AIP_HEALTH_ROUTE": "/v1/endpoints/1/deployedModels/2",
        "AIP_PREDICT_ROUTE": "/v1/endpoints/1/deployedModels/2:predict",
    }
    text = render_nginx(resolve([], env), tmp_path)
    for route in env.values():
        block = text.split(f'location = "{route}" {{', 1)[1].split("}", 1)[0]
        assert "proxy_pass http://gateways;" in block
    assert text.index("deployedModels/2:predict") < text.index("location /v1/")


def _locations(text: str) -> dict[str, str]:
    """Each front-door location's body, by its match."""
    front = text.split("server_name front;", 1)[1].split("server_name internal;", 1)[0]
    out = {}
    for block in front.split("location ")[1:]:
        match, body = block.split("{", 1)
        out[match.strip()] = body.split("\n        }", 1)[0]
    return out


def test_api_keys_guard_everything_but_health(tmp_path) -> None:
    env = {
        "AIP_HEALTH_ROUTE": "/v1/endpoints/1/deployedModels/2",
        "AIP_PREDICT_ROUTE": "/p:predict",
    }
    config = resolve(["--api-key", "k" * 20, "--api-key", "j" * 20], env)
    text = render_nginx(config, tmp_path)
    assert "ngx_http_js_module.so;" in text and "env VGATE_API_KEYS;" in text
    assert "k" * 20 not in text  # the keys are in the environment, not in a file
    guarded = 'if ($vgate_authorized = "0") { return 401; }'
    locations = _locations(text)
    for match in ('= "/ping"', '= "/health"', '= "/live"', '= "/v1/endpoints/1/deployedModels/2"'):
        assert guarded not in locations[match], match
    for match, body in locations.items():
        if match.startswith(("~", "/", '= "/p:predict"')) and "return 404" not in body:
            assert guarded in body, match  # every open route but health
    assert "error_page 401 = @unauthorized;" in text


def test_without_keys_nothing_is_checked_and_admin_routes_are_404(tmp_path) -> None:
    text = render_nginx(resolve([], {}), tmp_path)
    assert "vgate_authorized" not in text and "js_module" not in text
    assert "return 404" in _locations(text)["/v1/"]
    assert "^/v1/(chat/completions|completions|embeddings|" in text  # the public ones, exactly
    assert "proxy_pass http://gateways;" in _locations(text)["= /v1/models"]


def test_admin_routes_on_request_behind_the_key(tmp_path) -> None:
    config = resolve(["--api-key", "k" * 20, "--enable-admin-routes"], {})
    admin = _locations(render_nginx(config, tmp_path))["/v1/"]
    assert 'if ($vgate_authorized = "0") { return 401; }' in admin
    assert "proxy_pass http://engines;" in admin


def _front_server(text: str) -> tuple[str, str]:
    """(the http block's own settings, the front door's server block)."""
    http, _, servers = text.partition("    server {")
    front = servers.split("    server {")[0]
    assert "listen 0.0.0.0:8080" in front
    return http, front


def test_slow_and_large_clients_are_bounded_on_the_front_door(tmp_path) -> None:
    """Bodies over 64 KiB wait in files, not memory; a client that stalls is let go."""
    http, front = _front_server(render_nginx(resolve([], {}), tmp_path))
    assert "client_body_buffer_size 64k;" in http
    assert "client_body_buffer_size" not in front  # the front door keeps the 64k
    for line in ("client_header_timeout 15s;", "client_body_timeout 15s;", "send_timeout 30s;"):
        assert line in front, line
