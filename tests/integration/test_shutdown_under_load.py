"""SIGTERM to a `rankserve serve` subprocess with several requests in flight: each of them completes with a 200,
requests arriving during the drain get a JSON 503 with Retry-After, and the process exits 0 within the grace
period. No accepted request is lost."""

from __future__ import annotations

import asyncio
import signal
import sys
import time
from pathlib import Path

import httpx
import pytest

from tests.integration._cli import start_cli
from tests.integration._support import assert_error, metric, parse_metrics, ranking_body

pytestmark = pytest.mark.skipif(sys.platform == "win32", reason="POSIX signals")

IN_FLIGHT = 8
DRAIN_SECONDS = 2  # long enough to send the drain probes on a loaded 2-core machine; the flag itself is exercised
GRACE_SECONDS = 30


@pytest.mark.timeout(120)
def test_sigterm_under_load_loses_no_accepted_request(tiny_checkpoint_dir: Path, tmp_path: Path) -> None:
    server = start_cli(
        tiny_checkpoint_dir,
        tmp_path,
        "--max-batch-size",
        "1",  # batches of one: each request spans many engine calls
        "--shutdown-drain-seconds",
        str(DRAIN_SECONDS),
        "--log-level",
        "info",
    )
    passages = [f"passage {i}: " + "tokens and more tokens " * 20 for i in range(40)]
    body = ranking_body("what survives a shutdown?", passages)

    async def scenario() -> tuple[list[httpx.Response | BaseException], list[httpx.Response], float]:
        limits = httpx.Limits(max_connections=IN_FLIGHT + 8)
        async with httpx.AsyncClient(base_url=server.url, timeout=60, limits=limits) as client:
            accepted = [asyncio.ensure_future(client.post("/v1/ranking", json=body)) for _ in range(IN_FLIGHT)]
            deadline = time.monotonic() + 30
            while True:  # every request accepted and in flight before the signal
                samples = parse_metrics((await client.get("/v1/metrics")).text)
                if metric(samples, "rankserve_requests_in_flight") >= IN_FLIGHT:
                    break
                assert time.monotonic() < deadline, "requests never all in flight"
                assert not any(t.done() for t in accepted), "a request finished before SIGTERM: make them longer"
                await asyncio.sleep(0.01)
            sigterm_at = time.monotonic()
            server.proc.send_signal(signal.SIGTERM)
            await asyncio.sleep(0.1)
            async with httpx.AsyncClient(base_url=server.url, timeout=10) as fresh:  # new connections
                drain = list(
                    await asyncio.gather(
                        fresh.post("/v1/ranking", json=ranking_body("q", ["p"])),
                        fresh.post("/v1/rerank", json={"query": "q", "documents": ["p"]}),
                        fresh.post("/rerank", json={"query": "q", "texts": ["p"]}),
                        fresh.get("/v1/health/ready"),
                    )
                )
            assert time.monotonic() - sigterm_at < DRAIN_SECONDS, "too slow to probe the drain window"
            done = list(await asyncio.gather(*accepted, return_exceptions=True))
        return done, drain, sigterm_at

    try:
        done, drain, sigterm_at = asyncio.run(asyncio.wait_for(scenario(), 90))
        lost = [r for r in done if not isinstance(r, httpx.Response) or r.status_code != 200]
        assert not lost, [r if isinstance(r, BaseException) else (r.status_code, r.text[:200]) for r in lost]
        for r in done:
            assert isinstance(r, httpx.Response)
            assert sorted(e["index"] for e in r.json()["rankings"]) == list(range(len(passages)))
        for r in drain[:3]:
            assert_error(r, 503)
            assert int(r.headers["retry-after"]) >= 1
        assert drain[3].status_code == 503 and drain[3].json()["status"] == "not_ready"
        returncode = server.proc.wait(timeout=GRACE_SECONDS)
        assert returncode == 0, server.log()
        assert time.monotonic() - sigterm_at < GRACE_SECONDS
        log = server.log()
        assert "Traceback" not in log, log
    finally:
        server.stop()
