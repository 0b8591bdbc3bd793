"""Metrics as Prometheus sees them: `promtool check metrics` on the live output of a running server, the series
the operations issue asks for with values that follow the traffic sent, and a real Prometheus server scraping a
running instance and answering queries for our series."""

from __future__ import annotations

import concurrent.futures
import contextlib
import shutil
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.integration._support import (
    ServerThread,
    assert_error,
    free_port,
    metric,
    parse_metrics,
    ranking_body,
)

PROMTOOL = shutil.which("promtool")
PROMETHEUS = shutil.which("prometheus")
needs_promtool = pytest.mark.skipif(PROMTOOL is None, reason="promtool not installed (Debian package prometheus)")
needs_prometheus = pytest.mark.skipif(PROMETHEUS is None, reason="prometheus not installed (Debian package)")

QUERY = "what do llamas eat?"
PASSAGES = ["Llamas eat grass and hay.", "The capital of France is Paris.", "Llamas are herbivores grazing on plants."]


def traffic(server: ServerThread) -> None:
    """One request per dialect and one of each common rejection."""
    with server.client() as c:
        assert c.post("/v1/ranking", json=ranking_body(QUERY, PASSAGES)).status_code == 200
        assert c.post("/v1/rerank", json={"query": QUERY, "documents": PASSAGES}).status_code == 200
        assert c.post("/v2/rerank", json={"query": QUERY, "documents": PASSAGES}).status_code == 200
        assert c.post("/rerank", json={"query": QUERY, "texts": PASSAGES}).status_code == 200
        assert_error(c.post("/v1/ranking", json={"query": {"text": QUERY}, "passages": []}), 422, "passages")


# -- the exposition itself --------------------------------------------------------------------------------------


@needs_promtool
def test_promtool_accepts_live_output(server: ServerThread) -> None:
    traffic(server)
    with server.client() as c:
        text = c.get("/v1/metrics").text
    # Every family the issue asks for is there (histograms with their buckets), before linting it.
    for name in (
        "rankserve_requests_total",
        "rankserve_request_duration_seconds_bucket",
        "rankserve_queue_duration_seconds_bucket",
        "rankserve_tokenization_duration_seconds_bucket",
        "rankserve_inference_duration_seconds_bucket",
        "rankserve_batch_size_bucket",
        "rankserve_batch_padded_tokens_bucket",
        "rankserve_padding_efficiency_bucket",
        "rankserve_queue_depth",
        "rankserve_queue_tokens",
        "rankserve_requests_in_flight",
        "rankserve_prompt_tokens_total",
        "rankserve_rejections_total",
        "rankserve_engine_info",
    ):
        assert f"\n{name}" in text, name
    result = subprocess.run([PROMTOOL, "check", "metrics"], input=text.encode(), capture_output=True, timeout=30)
    problems = (result.stdout + result.stderr).decode()
    assert result.returncode == 0 and not problems.strip(), problems


def test_series_follow_the_traffic(server: ServerThread) -> None:
    before = server.metrics()
    traffic(server)
    after = server.metrics()

    def grew(name: str, **labels: str) -> float:
        return metric(after, name, **labels) - metric(before, name, **labels)

    for route, dialect in [
        ("/v1/ranking", "nim"),
        ("/v1/rerank", "cohere"),
        ("/v2/rerank", "cohere"),
        ("/rerank", "tei"),
    ]:
        assert grew("rankserve_requests_total", route=route, dialect=dialect, status="200") == 1, route
        assert grew("rankserve_request_duration_seconds_count", route=route, dialect=dialect) >= 1, route
    assert grew("rankserve_requests_total", route="/v1/ranking", dialect="nim", status="422") == 1
    assert grew("rankserve_rejections_total", reason="validation") == 1
    # Four scored requests, each tokenized once (the empty-passages one is refused before the tokenizer).
    assert grew("rankserve_tokenization_duration_seconds_count") == 4
    assert grew("rankserve_tokenization_duration_seconds_sum") > 0
    assert grew("rankserve_passages_total") == 4 * len(PASSAGES)
    # Padding efficiency: one observation per batch, each in (0, 1], and its sum bounded by the token counters.
    batches = grew("rankserve_batch_size_count")
    assert batches >= 1
    assert grew("rankserve_padding_efficiency_count") == batches
    assert grew("rankserve_padding_efficiency_bucket", le="1.0") == batches
    assert 0 < grew("rankserve_padding_efficiency_sum") <= batches
    real, computed = grew("rankserve_batch_real_tokens_total"), grew("rankserve_batch_computed_tokens_total")
    assert 0 < real <= computed
    # Idle again: nothing queued, nothing in flight.
    assert metric(after, "rankserve_queue_depth") == 0
    assert metric(after, "rankserve_requests_in_flight") == 0
    # Engine info, and no GPU memory series on a CPU engine.
    info = after["rankserve_engine_info"]
    assert info == [({"backend": "torch", "device": "cpu", "precision": "float32", "model": info[0][0]["model"]}, 1)]
    assert info[0][0]["model"] == "nvidia/llama-nemotron-rerank-1b-v2"
    assert "rankserve_gpu_memory_bytes" not in after
    # The readiness probes while the server loaded (ServerThread polls until 200) answered 503 but refused no
    # request: they are not rejections.
    assert metric(after, "rankserve_rejections_total", reason="unavailable") == 0


def test_queue_depth_counts_waiting_sequences(controlled_server: ServerThread) -> None:
    """With a slow engine and batches of 2, a 12-passage request leaves sequences waiting: the gauge shows them
    while it runs, and drops back to 0 when it is done."""
    controlled_server.engine.delay = 0.2
    passages = [f"passage number {i} about llamas" for i in range(12)]
    seen: list[float] = []
    with concurrent.futures.ThreadPoolExecutor(1) as pool, controlled_server.client(timeout=60) as c:
        future = pool.submit(c.post, "/v1/ranking", json=ranking_body(QUERY, passages))
        deadline = time.monotonic() + 30
        while not future.done() and time.monotonic() < deadline:
            seen.append(metric(controlled_server.metrics(), "rankserve_queue_depth"))
            time.sleep(0.05)
        assert future.result(timeout=60).status_code == 200
    assert seen and max(seen) > 0, seen
    assert max(seen) <= len(passages)
    assert metric(controlled_server.metrics(), "rankserve_queue_depth") == 0


def test_gpu_memory_is_read_at_scrape_time_only_on_cuda() -> None:
    torch = pytest.importorskip("torch")
    from rankserve.telemetry import Metrics

    metrics = Metrics()
    metrics.gpu.device = "cpu"
    assert "rankserve_gpu_memory_bytes" not in parse_metrics(metrics.render().decode())
    metrics.gpu.device = "cuda:0"
    samples = parse_metrics(metrics.render().decode())
    if torch.cuda.is_available():
        kinds = {lab["kind"]: v for lab, v in samples["rankserve_gpu_memory_bytes"] if lab["device"] == "cuda:0"}
        assert set(kinds) == {"allocated", "reserved", "total"}
        assert 0 <= kinds["allocated"] <= kinds["reserved"] <= kinds["total"] and kinds["total"] > 0
    else:  # PyTorch without CUDA: the read fails; the scrape still answers, without the GPU series
        assert "rankserve_gpu_memory_bytes" not in samples
        assert "rankserve_requests_in_flight" in samples
    assert "rankserve_gpu_memory_bytes" not in parse_metrics(Metrics().render().decode())  # no engine yet


# -- a real Prometheus scraping a running server --------------------------------------------------------------


@contextlib.contextmanager
def prometheus(target: str, tmp_path: Path) -> Iterator[str]:
    """A Prometheus server on loopback scraping `target` (host:port) every 0.5 s; yields its URL."""
    assert PROMETHEUS is not None
    port = free_port()
    config = tmp_path / "prometheus.yml"
    config.write_text(
        "global:\n  scrape_interval: 500ms\n  scrape_timeout: 400ms\n"
        "scrape_configs:\n"
        "  - job_name: rankserve\n    metrics_path: /v1/metrics\n"
        f"    static_configs:\n      - targets: ['{target}']\n"
    )
    log_path = tmp_path / "prometheus.log"
    with log_path.open("wb") as log:
        proc = subprocess.Popen(
            [
                PROMETHEUS,
                f"--config.file={config}",
                f"--storage.tsdb.path={tmp_path / 'tsdb'}",
                f"--web.listen-address=127.0.0.1:{port}",
                "--log.level=warn",
            ],
            stdout=log,
            stderr=subprocess.STDOUT,
        )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        with httpx.Client(timeout=5) as client:
            while True:
                assert proc.poll() is None, f"prometheus exited: {log_path.read_text(errors='replace')}"
                assert time.monotonic() < deadline, f"prometheus not ready: {log_path.read_text(errors='replace')}"
                with contextlib.suppress(httpx.TransportError):
                    if client.get(f"{url}/-/ready").status_code == 200:
                        break
                time.sleep(0.2)
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=10)


def query_until(url: str, promql: str, timeout: float = 45) -> list[dict]:
    """Poll the query API until `promql` returns a non-empty vector (bounded)."""
    deadline = time.monotonic() + timeout
    with httpx.Client(base_url=url, timeout=5) as client:
        while True:
            body = client.get("/api/v1/query", params={"query": promql}).json()
            assert body["status"] == "success", body
            if body["data"]["result"]:
                return list(body["data"]["result"])
            assert time.monotonic() < deadline, f"no result for {promql} within {timeout}s"
            time.sleep(0.25)


@needs_prometheus
@pytest.mark.timeout(150)
def test_prometheus_scrapes_a_running_server(server: ServerThread, tmp_path: Path) -> None:
    traffic(server)
    with prometheus(f"127.0.0.1:{server.port}", tmp_path) as url:
        up = query_until(url, 'up{job="rankserve"} == 1')
        assert up[0]["metric"]["instance"] == f"127.0.0.1:{server.port}"
        ok = query_until(url, 'rankserve_requests_total{route="/v1/ranking",dialect="nim",status="200"}')
        assert float(ok[0]["value"][1]) >= 1
        info = query_until(url, "rankserve_engine_info")
        assert info[0]["metric"]["backend"] == "torch" and info[0]["metric"]["device"] == "cpu"
        p50 = query_until(
            url, 'histogram_quantile(0.5, sum by (le) (rankserve_request_duration_seconds_bucket{dialect="tei"}))'
        )
        assert float(p50[0]["value"][1]) > 0
        # The autoscaling signals exist as series (their value is whatever the server is doing: 0 when idle).
        assert query_until(url, "rankserve_requests_in_flight")
        assert query_until(url, "rankserve_queue_tokens")
        assert query_until(url, "rankserve_queue_depth")
