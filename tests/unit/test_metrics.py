"""Engine metrics relabelled per replica and merged into one valid exposition."""

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from gateway.metrics import _Families, merge, queue_family, relabel, replica_ready_family
from gateway.state import ReplicaState

ENGINE = """# HELP vllm:num_requests_running Number of requests running.
# TYPE vllm:num_requests_running gauge
vllm:num_requests_running{engine="0",model_name="m"} 3.0
# HELP vllm:generation_tokens_total Generated tokens.
# TYPE vllm:generation_tokens_total counter
vllm:generation_tokens_total{engine="0",model_name="m"} 10.0
"""


def _render(families) -> str:
    registry = CollectorRegistry()
    registry.register(_Families(families))
    return generate_latest(registry).decode()


def test_every_sample_gets_its_replica_and_families_appear_once() -> None:
    text = _render(merge([*relabel(ENGINE, 0), *relabel(ENGINE.replace("3.0", "5.0"), 1)]))
    assert text.count("# TYPE vllm:num_requests_running gauge") == 1
    samples = {
        (s.name, s.labels["replica"]): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }
    assert samples[("vllm:num_requests_running", "0")] == 3.0
    assert samples[("vllm:num_requests_running", "1")] == 5.0
    assert samples[("vllm:generation_tokens_total", "1")] == 10.0


def test_replica_ready_gauge() -> None:
    text = _render(
        [
            replica_ready_family(
                [ReplicaState(0, "ready", "cpu:0"), ReplicaState(1, "down", "cpu:1")]
            )
        ]
    )
    assert 'vgate_replica_ready{device="cpu:0",model="",replica="0"} 1.0' in text
    assert 'vgate_replica_ready{device="cpu:1",model="",replica="1"} 0.0' in text


def test_scrapes_at_once_share_one_and_a_later_one_is_fresh() -> None:
    import asyncio

    from gateway.metrics import SingleFlight

    calls = 0

    async def scrape() -> bytes:
        nonlocal calls
        calls += 1
        await asyncio.sleep(0.05)
        return str(calls).encode()

    async def run() -> tuple[list[bytes], bytes]:
        flight = SingleFlight(scrape)
        together = await asyncio.gather(*(flight.get() for _ in range(50)))
        return together, await flight.get()

    together, later = asyncio.run(run())
    assert together == [b"1"] * 50 and later == b"2" and calls == 2


_INFO = 'vllm:lora_requests_info{running_lora_adapters="%s",waiting_lora_adapters="%s"}'
LORA_INFO = f"""# HELP vllm:lora_requests_info Running stats on lora requests.
# TYPE vllm:lora_requests_info gauge
{_INFO % ("gs://tenant-a/x", "")} 1.7e9
{_INFO % ("gs://tenant-b/y,gs://tenant-c/z", "gs://tenant-d/w")} 1.8e9
"""


def test_adapter_names_clients_chose_become_counts() -> None:
    text = _render(merge([*relabel(LORA_INFO, 0), *relabel(LORA_INFO, 1)]))
    assert "tenant" not in text and "vllm:lora_requests_info" not in text
    assert 'vgate_lora_adapters_running{model="",replica="0"} 2.0' in text  # the newest series
    assert 'vgate_lora_adapters_waiting{model="",replica="1"} 1.0' in text
    assert text.count("# TYPE vgate_lora_adapters_running gauge") == 1


WAITING = """# HELP vllm:num_requests_waiting Number of requests waiting.
# TYPE vllm:num_requests_waiting gauge
vllm:num_requests_waiting{engine="0",model_name="m"} 4.0
"""


def test_the_pods_queue_is_one_series_summing_its_engines() -> None:
    engines = merge([*relabel(WAITING, 0), *relabel(WAITING.replace("4.0", "7.0"), 1)])
    text = _render([queue_family(engines)])
    (family,) = text_string_to_metric_families(text)
    assert [(s.name, s.labels, s.value) for s in family.samples] == [
        ("vgate_requests_waiting", {}, 11.0)
    ]
    assert _render([queue_family([])]).count("vgate_requests_waiting 0.0") == 1
