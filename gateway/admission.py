"""Admission control: a bounded number of engine requests in flight, 429 beyond it.

vLLM queues whatever it is sent; without a bound a burst makes every request
slow and ends in timeouts. Each gateway worker admits its share of
--max-inflight (nginx applies the same cap to the OpenAI routes).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

from gateway.errors import ApiError

RETRY_AFTER_S = "1"


def worker_share(total: int, workers: int, worker: int) -> int:
    """Worker `worker`'s part of `total`: even shares, the remainder to the first ones."""
    return max(1, total // workers + (1 if worker < total % workers else 0))


class Admission:
    """Engine requests in flight in this worker, against its limit."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.in_flight = 0

    @contextlib.contextmanager
    def hold(self, requests: int) -> Iterator[None]:
        """Admit `requests` engine requests, or refuse with 429 when at the limit.

        A request is admitted whole while the worker is below its limit, so
        one larger than the limit still runs when the worker is otherwise idle.
        """
        if self.in_flight >= self.limit:
            raise ApiError(
                429,
                f"over capacity: {self.in_flight} engine requests in flight "
                f"(limit {self.limit}); retry shortly",
                {"Retry-After": RETRY_AFTER_S},
            )
        self.in_flight += requests
        try:
            yield
        finally:
            self.in_flight -= requests
