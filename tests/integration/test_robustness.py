"""Readiness while loading, engine failures, overload, deadlines and client disconnects, over real HTTP."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import pytest

from rankserve.engines.base import Engine
from rankserve.model.checkpoint import Checkpoint
from rankserve.runtime import default_engine_factory
from rankserve.settings import Settings
from tests.integration._support import (
    ControlledEngine,
    ServerThread,
    assert_error,
    controlled_factory,
    metric,
    ranking_body,
    running,
    tiny_settings,
)

QUERY = "what is robust?"
SHORT = ["one passage", "another passage", "a third"]


def post(server: ServerThread, body: dict, path: str = "/v1/ranking", timeout: float = 15.0) -> httpx.Response:
    with server.client(timeout=timeout) as client:
        return client.post(path, json=body)


def wait_until(predicate, timeout: float = 10.0, interval: float = 0.02) -> None:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError("condition not reached in time")
        time.sleep(interval)


def wait_idle(engine: ControlledEngine, quiet: float = 0.3, timeout: float = 10.0) -> None:
    """Until the engine has not been called for `quiet` seconds."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        calls = engine.calls
        time.sleep(quiet)
        if calls == engine.calls and not engine.busy:
            return
    raise AssertionError("the engine kept running")


# -- readiness before the engine is loaded -----------------------------------------------------------------------


def test_not_ready_while_loading(tiny_checkpoint_dir: Path, tiny_checkpoint: Checkpoint) -> None:
    release = threading.Event()

    def blocking_factory(ckpt: Checkpoint, settings: Settings) -> Engine:
        if not release.wait(30):
            raise RuntimeError("never released")
        return default_engine_factory(ckpt, settings)

    settings = tiny_settings(tiny_checkpoint_dir, warmup=False)
    server = ServerThread(settings, engine_factory=blocking_factory, checkpoint=tiny_checkpoint)
    try:
        server.start(wait_ready=False)
        with server.client() as client:
            live = client.get("/v1/health/live")
            assert live.status_code == 200
            assert live.json()["status"] == "live"
            ready = client.get("/v1/health/ready")
            assert ready.status_code == 503
            assert ready.json()["object"] == "health.response" and ready.json()["status"] != "ready"
            assert_error(client.post("/v1/ranking", json=ranking_body(QUERY, SHORT)), 503)
            hosted = "/v1/retrieval/nvidia/llama-nemotron-rerank-1b-v2/reranking"
            assert_error(client.post(hosted, json=ranking_body(QUERY, SHORT)), 503)
            # Discovery works while loading.
            assert client.get("/v1/models").status_code == 200
            assert client.get("/v1/metadata").status_code == 200
            release.set()
            server.wait_ready(timeout=30)
            assert client.post("/v1/ranking", json=ranking_body(QUERY, SHORT)).status_code == 200
    finally:
        release.set()
        server.stop()


def test_load_failure_is_not_ready_and_json(tiny_checkpoint_dir: Path, tiny_checkpoint: Checkpoint) -> None:
    def broken_factory(ckpt: Checkpoint, settings: Settings) -> Engine:
        raise RuntimeError("no accelerator here")

    settings = tiny_settings(tiny_checkpoint_dir, warmup=False)
    with (
        running(
            ServerThread(settings, engine_factory=broken_factory, checkpoint=tiny_checkpoint), wait_ready=False
        ) as s,
        s.client() as client,
    ):
        wait_until(lambda: s.state.fatal is not None)
        assert client.get("/v1/health/ready").status_code == 503
        assert client.get("/v1/health/live").status_code == 200
        body = assert_error(client.post("/v1/ranking", json=ranking_body(QUERY, SHORT)), 503)
        assert "Traceback" not in body["detail"]


# -- engine failures ---------------------------------------------------------------------------------------------


def test_engine_failure_is_a_500_and_the_server_keeps_serving(controlled_server: ServerThread) -> None:
    engine: ControlledEngine = controlled_server.engine
    before = metric(controlled_server.metrics(), "rankserve_batch_failures_total")
    engine.fail = True
    r = post(controlled_server, ranking_body(QUERY, SHORT))
    body = assert_error(r, 500)
    assert body["status"] == 500
    engine.fail = False
    r = post(controlled_server, ranking_body(QUERY, SHORT))
    assert r.status_code == 200, r.text
    assert len(r.json()["rankings"]) == 3
    with controlled_server.client() as client:
        assert client.get("/v1/health/ready").status_code == 200
    assert metric(controlled_server.metrics(), "rankserve_batch_failures_total") > before


def test_an_engine_failing_for_good_turns_readiness_503(controlled_server: ServerThread) -> None:
    engine: ControlledEngine = controlled_server.engine
    engine.fail = True
    for _ in range(6):  # more than the scheduler's limit of consecutive failed batches
        assert_error(post(controlled_server, ranking_body(QUERY, SHORT)), 500)
    with controlled_server.client() as client:
        ready = client.get("/v1/health/ready")
        assert ready.status_code == 503 and "failing" in ready.json()["message"]
        assert ready.headers["retry-after"]
    engine.fail = False  # it recovers: the next good batch makes it ready again
    assert post(controlled_server, ranking_body(QUERY, SHORT)).status_code == 200
    with controlled_server.client() as client:
        assert client.get("/v1/health/ready").status_code == 200


@pytest.mark.parametrize("where", ["all", "one"])
def test_nan_is_a_500_never_a_200(controlled_server: ServerThread, where: str) -> None:
    engine: ControlledEngine = controlled_server.engine
    if where == "all":
        engine.nan = True
    else:  # one row of one batch of the request
        engine.transform = lambda logits: np.where(np.arange(len(logits)) == len(logits) - 1, np.nan, logits)
    r = post(controlled_server, ranking_body(QUERY, SHORT))
    assert_error(r, 500)
    assert "NaN" not in r.text.replace("non-finite", "")
    engine.reset()
    r = post(controlled_server, ranking_body(QUERY, SHORT))
    assert r.status_code == 200
    assert all(np.isfinite(e["logit"]) for e in r.json()["rankings"])


def test_infinite_logit_is_a_500(controlled_server: ServerThread) -> None:
    controlled_server.engine.transform = lambda logits: np.full_like(logits, np.inf)
    assert_error(post(controlled_server, ranking_body(QUERY, SHORT)), 500)


# -- overload --------------------------------------------------------------------------------------------------------


def controlled(tiny_checkpoint_dir: Path, tiny_checkpoint: Checkpoint, **settings: object) -> ServerThread:
    """A server on the tiny checkpoint whose engine the test controls, with `settings` overridden."""
    config = tiny_settings(tiny_checkpoint_dir, warmup=False, **settings)
    return ServerThread(config, engine_factory=controlled_factory, checkpoint=tiny_checkpoint)


@pytest.fixture(scope="module")
def overload_server(tiny_checkpoint_dir: Path, tiny_checkpoint: Checkpoint) -> Iterator[ServerThread]:
    with running(controlled(tiny_checkpoint_dir, tiny_checkpoint, max_queue_tokens=64)) as s:
        yield s


def test_overload_is_a_429_with_retry_after(overload_server: ServerThread) -> None:
    engine: ControlledEngine = overload_server.engine
    engine.delay = 0.25
    passages = ["a passage of some thirty tokens, give or take, about nothing in particular at all"] * 2

    async def one(client: httpx.AsyncClient) -> httpx.Response:
        return await client.post("/v1/ranking", json=ranking_body(QUERY, passages))

    async def burst() -> list[httpx.Response]:
        async with httpx.AsyncClient(base_url=overload_server.url, timeout=20) as client:
            return await asyncio.gather(*(one(client) for _ in range(10)))

    try:
        responses = asyncio.run(asyncio.wait_for(burst(), 30))
    finally:
        engine.reset()
    statuses = [r.status_code for r in responses]
    assert set(statuses) <= {200, 429}, statuses
    assert 200 in statuses and 429 in statuses, statuses
    for r in responses:
        if r.status_code == 429:
            assert_error(r, 429)
            assert int(r.headers["retry-after"]) >= 1
        else:
            assert len(r.json()["rankings"]) == 2
    wait_idle(engine)
    assert post(overload_server, ranking_body(QUERY, passages)).status_code == 200


# -- deadline --------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def deadline_server(tiny_checkpoint_dir: Path, tiny_checkpoint: Checkpoint) -> Iterator[ServerThread]:
    with running(controlled(tiny_checkpoint_dir, tiny_checkpoint, request_timeout_seconds=0.5)) as s:
        yield s


def test_deadline_is_a_504(deadline_server: ServerThread) -> None:
    engine: ControlledEngine = deadline_server.engine
    engine.delay = 1.5
    try:
        started = time.monotonic()
        r = post(deadline_server, ranking_body(QUERY, SHORT))
        elapsed = time.monotonic() - started
    finally:
        engine.reset()
    assert_error(r, 504)
    assert elapsed < 1.4, "the deadline answer must not wait for the engine"
    wait_idle(engine)
    assert post(deadline_server, ranking_body(QUERY, SHORT)).status_code == 200


# -- client disconnect ----------------------------------------------------------------------------------------------


def test_disconnected_client_stops_consuming_engine_time(controlled_server: ServerThread) -> None:
    engine: ControlledEngine = controlled_server.engine
    wait_idle(engine, quiet=0.1)
    engine.delay = 0.2  # per batch of 2: 40 passages would take 4 s
    rows_before = engine.rows_scored
    errors_before = metric(controlled_server.metrics(), "rankserve_requests_total", route="/v1/ranking", status="500")
    passages = [f"passage {i} about something" for i in range(40)]
    with pytest.raises(httpx.ReadTimeout):
        post(controlled_server, ranking_body(QUERY, passages), timeout=0.5)
    wait_idle(engine, quiet=0.5)
    scored = engine.rows_scored - rows_before
    assert scored < 20, f"{scored} of 40 sequences were scored after the client left"
    samples = controlled_server.metrics()
    assert metric(samples, "rankserve_requests_in_flight") == 0
    assert metric(samples, "rankserve_queue_tokens") == 0
    # Counted as the client leaving (499), not as a server error.
    assert metric(samples, "rankserve_requests_total", route="/v1/ranking", status="499") >= 1
    assert metric(samples, "rankserve_requests_total", route="/v1/ranking", status="500") == errors_before
    engine.reset()
    r = post(controlled_server, ranking_body(QUERY, SHORT))
    assert r.status_code == 200, r.text
