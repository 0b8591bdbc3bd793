"""Helpers for the integration tests: a real uvicorn server in a thread, engine wrappers, an independent
tokenizer and one-at-a-time reference scorer, Prometheus parsing and error-body checks."""

from __future__ import annotations

import contextlib
import json
import socket
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import uvicorn
from prometheus_client.parser import text_string_to_metric_families
from tokenizers import Tokenizer

from rankserve.api.app import create_app
from rankserve.engines.base import Engine, EngineInfo
from rankserve.model.checkpoint import Checkpoint
from rankserve.runtime import default_engine_factory
from rankserve.settings import Settings

HTTP_TIMEOUT = 15.0  # seconds, every HTTP call unless a test says otherwise
START_TIMEOUT = 60.0  # seconds for a server to answer /v1/health/ready

MODEL_ID = "nvidia/llama-nemotron-rerank-1b-v2"
ALIASES = ("nvidia/llama-3.2-nv-rerankqa-1b-v2", "nvidia/llama-3_2-nv-rerankqa-1b-v2")


def bound_socket() -> socket.socket:
    """A listening-ready socket on a free loopback port (handed to uvicorn: no port race)."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    return sock


def free_port() -> int:
    with contextlib.closing(bound_socket()) as sock:
        return int(sock.getsockname()[1])


def tiny_settings(checkpoint_dir: Path, **overrides: Any) -> Settings:
    # CPU float32 explicitly: the reference scores in fp32, and `auto` would pick bf16 on a GPU machine. The torch
    # backend explicitly too, whatever `auto` picks (test_onnxruntime_contract.py serves the onnxruntime one).
    base: dict[str, Any] = {"model": str(checkpoint_dir), "device": "cpu", "dtype": "float32", "log_level": "warning"}
    base["backend"] = "torch"
    return Settings(**{**base, **overrides})


# -- a real server in a background thread ----------------------------------------------------------------------


@dataclass
class ServerThread:
    settings: Settings
    engine_factory: Callable[[Checkpoint, Settings], Engine] | None = None
    checkpoint: Checkpoint | None = None
    url: str = ""
    port: int = 0
    app: Any = None
    server: uvicorn.Server | None = None
    thread: threading.Thread | None = None
    engines: list[Engine] = field(default_factory=list)

    @property
    def state(self) -> Any:
        return self.app.state.rs

    def start(self, *, wait_ready: bool = True) -> ServerThread:
        factory = self.engine_factory

        def recording_factory(ckpt: Checkpoint, settings: Settings) -> Engine:
            engine = (factory or default_engine_factory)(ckpt, settings)
            self.engines.append(engine)
            return engine

        self.app = create_app(self.settings, checkpoint=self.checkpoint, engine_factory=recording_factory)
        sock = bound_socket()
        self.port = int(sock.getsockname()[1])
        self.url = f"http://127.0.0.1:{self.port}"
        config = uvicorn.Config(self.app, host="127.0.0.1", port=self.port, log_level="warning")
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [sock]}, daemon=True)
        self.thread.start()
        deadline = time.monotonic() + START_TIMEOUT
        while not self.server.started:
            if not self.thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError("uvicorn did not start")
            time.sleep(0.01)
        if wait_ready:
            self.wait_ready()
        return self

    def wait_ready(self, timeout: float = START_TIMEOUT) -> None:
        deadline = time.monotonic() + timeout
        with httpx.Client(base_url=self.url, timeout=HTTP_TIMEOUT) as client:
            while time.monotonic() < deadline:
                if client.get("/v1/health/ready").status_code == 200:
                    return
                time.sleep(0.02)
        raise RuntimeError(f"server at {self.url} not ready within {timeout}s: {self.state.fatal}")

    def stop(self) -> None:
        if self.server is not None:
            self.server.should_exit = True
        if self.thread is not None:
            self.thread.join(timeout=30)
            assert not self.thread.is_alive(), "server thread did not stop"

    @property
    def engine(self) -> Any:
        return self.engines[-1]

    def client(self, **kwargs: Any) -> httpx.Client:
        return httpx.Client(base_url=self.url, timeout=kwargs.pop("timeout", HTTP_TIMEOUT), **kwargs)

    def metrics(self) -> dict[str, list[tuple[dict[str, str], float]]]:
        with self.client() as client:
            r = client.get("/v1/metrics")
        r.raise_for_status()
        return parse_metrics(r.text)


@contextlib.contextmanager
def running(server: ServerThread, *, wait_ready: bool = True) -> Iterator[ServerThread]:
    server.start(wait_ready=wait_ready)
    try:
        yield server
    finally:
        server.stop()


# -- engine wrappers ---------------------------------------------------------------------------------------------


class ControlledEngine:
    """Wraps the real engine. Tests switch `delay` (seconds per batch), `fail` (raise), `nan` (return NaN) and
    `transform` (rewrite the logits);
    every call is recorded (rows per batch, the ids) so tests can see what reached the engine."""

    def __init__(self, inner: Engine) -> None:
        self.inner = inner
        self.info: EngineInfo = inner.info
        self.delay = 0.0
        self.fail = False
        self.nan = False
        self.transform: Callable[[np.ndarray], np.ndarray] | None = None  # applied to the real logits
        self.lock = threading.Lock()
        self.rows_scored = 0
        self.calls = 0
        self.busy = False
        self.batches: list[list[tuple[int, ...]]] = []

    def reset(self) -> None:
        self.delay, self.fail, self.nan, self.transform = 0.0, False, False, None

    def score(self, input_ids: np.ndarray, lengths: np.ndarray) -> np.ndarray:
        self.busy = True
        try:
            if self.delay:
                time.sleep(self.delay)
            rows = [tuple(int(t) for t in input_ids[i, : int(n)]) for i, n in enumerate(lengths)]
            with self.lock:
                self.calls += 1
                self.rows_scored += len(rows)
                self.batches.append(rows)
            if self.fail:
                raise RuntimeError("injected engine failure")
            logits = self.inner.score(input_ids, lengths)
            if self.transform is not None:
                logits = self.transform(np.asarray(logits))
            if self.nan:
                logits = np.full_like(logits, np.nan)
            return logits
        finally:
            self.busy = False

    def warmup(self) -> None:
        self.inner.warmup()


def controlled_factory(ckpt: Checkpoint, settings: Settings) -> ControlledEngine:
    return ControlledEngine(default_engine_factory(ckpt, settings))


# -- independent tokenization and reference scores ----------------------------------------------------------------


class Reference:
    """Token counts from tokenizer.json directly, and logits from the fp32 model scoring one pair at a time."""

    def __init__(self, checkpoint_dir: Path, model: Any) -> None:
        self.tokenizer = Tokenizer.from_file(str(checkpoint_dir / "tokenizer.json"))
        self.tokenizer.no_truncation()
        self.bos = int(json.loads((checkpoint_dir / "config.json").read_text())["bos_token_id"])
        self.model = model
        self._cache: dict[tuple[int, ...], float] = {}

    def ids(self, query: str, passage: str, max_length: int | None = None) -> list[int]:
        body = self.tokenizer.encode("question:" + query + " \n \n passage:" + passage, add_special_tokens=False).ids
        ids = [self.bos, *body]
        return ids if max_length is None else ids[:max_length]

    def length(self, query: str, passage: str) -> int:
        return len(self.ids(query, passage))

    def logit_ids(self, ids: list[int]) -> float:
        key = tuple(ids)
        if key not in self._cache:
            import torch

            with torch.inference_mode():
                out = self.model(torch.tensor([ids], dtype=torch.long), torch.tensor([len(ids)], dtype=torch.long))
            self._cache[key] = float(out[0])
        return self._cache[key]

    def logits(self, query: str, passages: list[str], max_length: int | None = None) -> list[float]:
        return [self.logit_ids(self.ids(query, p, max_length)) for p in passages]


def assert_matches_reference(body: dict[str, Any], expected: list[float], tol: float = 1e-4) -> None:
    """The response ranks every passage once, sorted (ties by index), with the reference logits."""
    rankings = body["rankings"]
    assert sorted(r["index"] for r in rankings) == list(range(len(expected)))
    for r in rankings:
        assert abs(r["logit"] - expected[r["index"]]) <= tol, (r, expected[r["index"]])
    assert_sorted(rankings)


def assert_sorted(rankings: list[dict[str, Any]]) -> None:
    keys = [(-r["logit"], r["index"]) for r in rankings]
    assert keys == sorted(keys), "rankings must be sorted by logit descending, ties by lower index"


# -- metrics and errors ---------------------------------------------------------------------------------------------


def parse_metrics(text: str) -> dict[str, list[tuple[dict[str, str], float]]]:
    """Sample name → [(labels, value)] (names as exposed, e.g. `rankserve_requests_total`)."""
    out: dict[str, list[tuple[dict[str, str], float]]] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            out.setdefault(sample.name, []).append((dict(sample.labels), float(sample.value)))
    return out


def metric(samples: dict[str, list[tuple[dict[str, str], float]]], name: str, **labels: str) -> float:
    return sum(v for lab, v in samples.get(name, []) if all(lab.get(k) == want for k, want in labels.items()))


def assert_error(response: httpx.Response, status: int | tuple[int, ...], *mentions: str) -> dict[str, Any]:
    """A JSON error body with `error` and `detail`, no HTML, no traceback, naming each of `mentions`."""
    statuses = (status,) if isinstance(status, int) else status
    assert response.status_code in statuses, (response.status_code, response.text)
    assert response.headers.get("content-type", "").startswith("application/json"), response.headers
    text = response.text
    assert "<html" not in text.lower() and "Traceback" not in text, text
    body = response.json()
    assert isinstance(body.get("error"), str) and body["error"], body
    assert isinstance(body.get("detail"), str) and body["detail"], body
    for word in mentions:
        assert word in body["error"] or word in body["detail"], (word, body)
    return body


def ranking_body(query: str, passages: list[str], **extra: Any) -> dict[str, Any]:
    return {"query": {"text": query}, "passages": [{"text": p} for p in passages], **extra}
