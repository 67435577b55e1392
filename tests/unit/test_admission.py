"""Admission control: the in-flight bound and each gateway worker's share of it."""

import pytest

from gateway.admission import Admission, worker_share
from gateway.errors import ApiError


def test_shares_add_up_to_the_total() -> None:
    assert [worker_share(10, 3, k) for k in range(3)] == [4, 3, 3]
    assert [worker_share(16, 2, k) for k in range(2)] == [8, 8]
    assert worker_share(1, 4, 3) == 1  # every worker admits at least one


def test_admits_below_the_limit_and_refuses_at_it() -> None:
    admission = Admission(limit=4)
    with admission.hold(3), admission.hold(2):  # 3 < 4: admitted whole
        assert admission.in_flight == 5
        with pytest.raises(ApiError) as refused, admission.hold(1):
            pass
    assert refused.value.status == 429 and refused.value.headers["Retry-After"]
    assert "limit 4" in refused.value.message
    assert admission.in_flight == 0


def test_released_when_the_work_fails() -> None:
    admission = Admission(limit=1)
    with pytest.raises(RuntimeError), admission.hold(1):
        raise RuntimeError
    with admission.hold(1):
        assert admission.in_flight == 1


def test_a_request_no_stack_could_admit_is_a_400_naming_the_field() -> None:
    from gateway.admission import check_possible

    check_possible(16, (0, 16), limit=16)  # exactly the limit: possible
    with pytest.raises(ApiError) as n:
        check_possible(17, (2, 17), limit=16)
    assert n.value.status == 400
    assert n.value.message == (
        "instances[2].n: 17 sequences; at most 16 run at once (--max-inflight)"
    )
    with pytest.raises(ApiError) as total:
        check_possible(64 * 2, (0, 2), limit=100)  # 64 instances x n = 2
    assert total.value.message.startswith("instances: 128 sequences in all (instances x n)")


def test_an_instance_counts_its_n() -> None:
    from gateway.predict.protocol import CHAT_ROUTE, GENERATE_ROUTE, Instance

    assert Instance(True, CHAT_ROUTE, {"messages": [], "n": 4}).sequences == 4
    assert Instance(False, GENERATE_ROUTE, {"sampling_params": {"n": 3}}).sequences == 3
    assert Instance(False, CHAT_ROUTE, {"messages": []}).sequences == 1
