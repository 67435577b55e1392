"""Admission control: a bounded number of sequences in flight, 429 beyond it.

vLLM queues whatever it is sent; without a bound a burst makes every request
slow and ends in timeouts. What is counted is sequences (instances x n), the
engines' unit of work: one request of 64 instances with n = 16 is 1,024 of
them. Each gateway worker admits its share of --max-inflight (nginx caps the
OpenAI routes' connections at the same number, and the engines refuse an `n`
or a prompt list above it).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

from gateway.errors import ApiError

RETRY_AFTER_S = "1"


def worker_share(total: int, workers: int, worker: int) -> int:
    """Worker `worker`'s part of `total`: even shares, the remainder to the first ones."""
    return max(1, total // workers + (1 if worker < total % workers else 0))


def check_possible(sequences: int, largest_n: tuple[int, int], limit: int) -> None:
    """A request that no idle stack could ever admit is a 400 that says which field.

    `largest_n`: (instance index, n) of the instance with the largest n.
    """
    index, n = largest_n
    if n > limit:
        raise ApiError(
            400,
            f"instances[{index}].n: {n} sequences; at most {limit} run at once (--max-inflight)",
        )
    if sequences > limit:
        raise ApiError(
            400,
            f"instances: {sequences} sequences in all (instances x n); at most {limit} run at "
            "once (--max-inflight): split the request",
        )


class Admission:
    """Sequences in flight in this worker, against its limit."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.in_flight = 0

    @contextlib.contextmanager
    def hold(self, requests: int) -> Iterator[None]:
        """Admit `requests` sequences, or refuse with 429 when at the limit.

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
