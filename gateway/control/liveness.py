"""Whether a replica serves, from what the monitor sees of it: no flapping, no hang missed.

A load balancer's rule: a replica leaves routing after FALL failed probes in a
row (at once when its process exits) and comes back after RISE good ones, so one
slow probe on a busy engine changes nothing. Two faults a probe alone misses get
the replica restarted:

- hung: it was ready, and its /health has not answered for HUNG_AFTER_S (an API
  server that is stopped or deadlocked);
- stalled: requests are pending on it and its engine has not made one step for
  STALLED_AFTER_S (an engine core that is stopped or deadlocked: vLLM's /health
  only reports an errored flag, so it keeps saying 200). A step is one
  observation of `vllm:iteration_tokens_total`, which vLLM records for every
  batch the engine runs, prefill chunks included, so a long prefill is progress.

Pure: the monitor feeds it and acts on the verdict.
"""

from __future__ import annotations

from dataclasses import dataclass

from gateway.state import DOWN, READY, STARTING

FALL = 3
RISE = 2
HUNG_AFTER_S = 20.0
STALLED_AFTER_S = 30.0


@dataclass(frozen=True)
class Progress:
    """From one engine's metrics: requests pending, and its engine steps so far."""

    pending: float
    steps: float


@dataclass
class ReplicaWatch:
    routed: bool = False  # in routing, by rise and fall
    good: int = 0
    bad: int = 0
    ready_since_start: bool = False
    last_answer: float = 0.0
    steps: float | None = None
    steps_at: float = 0.0  # when the steps last moved (or nothing was pending)
    sampled_at: float = 0.0

    def probe(self, now: float, process_state: str | None, answered: bool) -> str:
        """One poll's probe; the replica's state for routing and /health."""
        if process_state != "RUNNING":
            self.__init__()  # type: ignore[misc]  # a new process starts from nothing
            return STARTING if process_state == "STARTING" else DOWN
        if answered:
            self.good, self.bad, self.last_answer = self.good + 1, 0, now
            if self.good >= RISE:
                self.routed = self.ready_since_start = True
        else:
            self.good, self.bad = 0, self.bad + 1
            if self.bad >= FALL:
                self.routed = False
        return READY if self.routed else STARTING

    def progress(self, now: float, seen: Progress | None) -> None:
        """A metrics sample (None: none could be read, which the probe covers)."""
        if seen is None:
            return
        self.sampled_at = now
        if self.steps is None or seen.steps != self.steps or seen.pending == 0:
            self.steps, self.steps_at = seen.steps, now

    def restart_reason(self, now: float) -> str | None:
        """Why this replica must be restarted now, if it must."""
        if self.ready_since_start and self.bad and now - self.last_answer >= HUNG_AFTER_S:
            return f"no answer to its health probe for {now - self.last_answer:.0f} s"
        # What the samples show, not the time since: a monitor that was held up itself
        # has seen nothing stall.
        stalled = self.sampled_at - self.steps_at
        if self.steps is not None and stalled >= STALLED_AFTER_S:
            return f"requests are pending and its engine made no step for {stalled:.0f} s"
        return None


def read_progress(metrics_text: str) -> Progress | None:
    """Pending requests and engine steps from one engine's /metrics (vLLM's names)."""
    pending = steps = None
    for line in metrics_text.splitlines():
        if line.startswith(("vllm:num_requests_running{", "vllm:num_requests_waiting{")):
            pending = (pending or 0.0) + float(line.rsplit(" ", 1)[1])
        elif line.startswith("vllm:iteration_tokens_total_count{"):
            steps = (steps or 0.0) + float(line.rsplit(" ", 1)[1])
    if pending is None or steps is None:
        return None
    return Progress(pending, steps)
