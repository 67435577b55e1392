"""Sustained mixed load from threads of the test process: OpenAI and predict,
streamed and not, every outcome recorded (the fault suite and the soak)."""

from __future__ import annotations

import http.client
import itertools
import json
import threading
import time
from dataclasses import dataclass, field
from urllib.parse import urlsplit

from engine.demo_model import ensure_demo_model

REQUEST_TIMEOUT_S = 60  # the stack's deadline; no request may take longer
CLIENTS = 4


def loaded_stack_args() -> list[str]:
    """`vgate serve` flags of the stack under load: the demo model, 2 gateway workers."""
    args = [str(ensure_demo_model()), "--max-model-len", "512", "--gateway-workers", "2"]
    return [*args, "--request-timeout", str(REQUEST_TIMEOUT_S)]


@dataclass
class Outcome:
    sent: float
    ended: float
    ok: bool
    what: str


@dataclass
class Load:
    """Mixed requests from CLIENTS threads until stopped; every outcome recorded."""

    base: str
    outcomes: list[Outcome] = field(default_factory=list)
    _stop: threading.Event = field(default_factory=threading.Event)

    def run(self) -> None:
        kinds = itertools.cycle(
            [self._completion, self._chat_stream, self._predict, self._predict_stream]
        )
        lock = threading.Lock()

        def client() -> None:
            while not self._stop.is_set():
                with lock:
                    kind = next(kinds)
                sent = time.monotonic()
                try:
                    ok, what = kind()
                except (OSError, http.client.HTTPException, ValueError) as e:
                    ok, what = False, f"{kind.__name__}: {type(e).__name__}: {e}"
                self.outcomes.append(Outcome(sent, time.monotonic(), ok, what))

        self._threads = [threading.Thread(target=client, daemon=True) for _ in range(CLIENTS)]
        for t in self._threads:
            t.start()

    def stop(self) -> None:
        self._stop.set()
        for t in self._threads:
            t.join(REQUEST_TIMEOUT_S + 10)

    def _post(self, path: str, body: dict) -> tuple[int, bytes]:
        url = urlsplit(self.base)
        conn = http.client.HTTPConnection(url.hostname, url.port, timeout=REQUEST_TIMEOUT_S + 5)
        try:
            conn.request("POST", path, json.dumps(body), {"Content-Type": "application/json"})
            resp = conn.getresponse()
            return resp.status, resp.read()
        finally:
            conn.close()

    def _completion(self) -> tuple[bool, str]:
        status, body = self._post("/v1/completions", {"prompt": "hi", "max_tokens": 16})
        return status == 200 and b'"choices"' in body, f"completion {status} {body[:200]!r}"

    def _chat_stream(self) -> tuple[bool, str]:
        message = {"role": "user", "content": "hi"}
        body = {"messages": [message], "max_tokens": 16, "stream": True}
        status, answer = self._post("/v1/chat/completions", body)
        whole = answer.rstrip().endswith(b"data: [DONE]")
        return status == 200 and whole, f"chat stream {status} {answer[-200:]!r}"

    def _predict(self) -> tuple[bool, str]:
        body = {"instances": [{"prompt": "hi"}, {"prompt": "ho"}], "parameters": {"max_tokens": 8}}
        status, answer = self._post("/predict", body)
        return status == 200 and b'"predictions"' in answer, f"predict {status} {answer[:200]!r}"

    def _predict_stream(self) -> tuple[bool, str]:
        body = {"instances": [{"prompt": "hi", "max_tokens": 16, "stream": True}]}
        status, answer = self._post("/predict", body)
        whole = answer.rstrip().endswith(b"data: [DONE]")
        return status == 200 and whole, f"predict stream {status} {answer[-200:]!r}"
