"""Multi-host: the leader's engine starts once the Ray cluster holds the GPUs it needs.

With `--distributed-executor-backend ray`, vLLM places one tensor x pipeline
parallel group on the Ray cluster's GPUs; started before the workers have joined,
it fails. The leader's container starts the Ray head and the workers join it
(deploy/gke/multi-host, as vLLM's multi-node example does); the engine's launcher
waits here first.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

CLUSTER_WAIT_S = 1800.0  # workers are scheduled, pull a large image, then join
POLL_S = 5.0


class ClusterNotReady(RuntimeError):
    """The Ray cluster did not reach the GPUs the replica needs in time."""


log = logging.getLogger("vgate.engine")


def wait_for_gpus(
    needed: int,
    count: Callable[[], float],
    deadline_s: float = CLUSTER_WAIT_S,
    sleep: Callable[[float], None] = time.sleep,
    clock: Callable[[], float] = time.monotonic,
    say: Callable[[str], None] = log.info,
) -> float:
    """Poll `count` (the cluster's GPUs) until it reaches `needed`; the count then."""
    end = clock() + deadline_s
    last = -1.0
    while True:
        have = count()
        if have >= needed:
            return have
        if clock() >= end:
            raise ClusterNotReady(
                f"the Ray cluster has {have:g} GPUs after {deadline_s:g} s; the replica needs "
                f"{needed} (tensor x pipeline parallel size): have the workers joined?"
            )
        if have != last:
            say(f"waiting for the Ray cluster: {have:g} of {needed} GPUs")
            last = have
        sleep(POLL_S)


def wait_for_cluster(needed: int) -> float:
    """Join the Ray cluster this host's head runs, and wait for its GPUs."""
    import ray  # vLLM's GPU image has it; only multi-host runs need it

    ray.init(address="auto", logging_level="ERROR", log_to_driver=False)
    try:
        return wait_for_gpus(needed, lambda: float(ray.cluster_resources().get("GPU", 0)))
    finally:
        ray.shutdown()
