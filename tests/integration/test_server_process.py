"""The real CLI as a subprocess: start-up, readiness, graceful SIGTERM, and fast, clear failures."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import pytest

from tests.integration._support import MODEL_ID, assert_error, free_port, metric, parse_metrics, ranking_body

pytestmark = pytest.mark.skipif(sys.platform == "win32", reason="POSIX signals")


def clean_env(tmp_path: Path) -> dict[str, str]:
    """Offline, with an empty Hugging Face cache: nothing may be fetched or found by accident."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "HUGGINGFACE_", "RANKSERVE_", "NIM_"))}
    env.pop("TRANSFORMERS_CACHE", None)
    env |= {"HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf-home"), "PYTHONUNBUFFERED": "1"}
    return env


def console_script() -> list[str]:
    script = Path(sys.executable).with_name("rankserve")
    if script.exists():
        return [str(script)]
    found = shutil.which("rankserve")
    if found is None:
        pytest.skip("the `rankserve` console script is not installed")
    return [found]


def test_serve_ready_then_sigterm_finishes_in_flight_work(tiny_checkpoint_dir: Path, tmp_path: Path) -> None:
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    cmd = [sys.executable, "-m", "rankserve.cli", "serve", "--model", str(tiny_checkpoint_dir)]
    cmd += ["--host", "127.0.0.1", "--port", str(port), "--device", "cpu", "--dtype", "float32"]
    cmd += ["--max-batch-size", "1", "--log-level", "warning"]  # batches of one: a big request takes a while
    cmd += ["--shutdown-drain-seconds", "1.5"]  # readiness 503 for 1.5 s before the listener closes
    log = (tmp_path / "server.log").open("w+")
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=clean_env(tmp_path))
    try:
        # Ready after the load.
        deadline = time.monotonic() + 60
        with httpx.Client(base_url=url, timeout=5) as client:
            while True:
                assert proc.poll() is None, f"exited with {proc.returncode}: {Path(log.name).read_text()}"
                assert time.monotonic() < deadline, "not ready within 60 s"
                try:
                    if client.get("/v1/health/ready").status_code == 200:
                        break
                except httpx.TransportError:
                    pass
                time.sleep(0.05)
            assert client.get("/v1/models").json()["data"][0]["id"] == MODEL_ID

            # A request that spans many engine batches, in flight when SIGTERM arrives.
            passages = [f"passage {i}: " + "tokens and more tokens " * 60 for i in range(120)]
            result: dict[str, object] = {}

            def send() -> None:
                try:
                    with httpx.Client(base_url=url, timeout=60) as c:
                        result["response"] = c.post("/v1/ranking", json=ranking_body("q", passages))
                        result["done"] = time.monotonic()
                except Exception as e:  # reported by the assertions below
                    result["error"] = e

            sender = threading.Thread(target=send, daemon=True)
            sender.start()
            while metric(parse_metrics(client.get("/v1/metrics").text), "rankserve_requests_in_flight") < 1:
                assert sender.is_alive(), result
                time.sleep(0.01)
        sigterm_at = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        # Draining: not ready, no new work, while the listener is still open.
        with httpx.Client(base_url=url, timeout=5) as client:
            ready = client.get("/v1/health/ready")
            assert ready.status_code == 503 and ready.json()["status"] != "ready", ready.text
            assert_error(client.post("/v1/ranking", json=ranking_body("q", ["p"])), 503)
        assert time.monotonic() - sigterm_at < 1.5, "too slow to observe the drain window"
        sender.join(timeout=60)
        assert not sender.is_alive()
        assert "error" not in result, result
        response = result["response"]
        assert isinstance(response, httpx.Response)
        assert response.status_code == 200, response.text
        assert sorted(e["index"] for e in response.json()["rankings"]) == list(range(len(passages)))
        assert result["done"] > sigterm_at, "the request finished before SIGTERM: nothing was in flight"

        returncode = proc.wait(timeout=15)
        exited_after = time.monotonic() - sigterm_at
        output = Path(log.name).read_text()
        assert returncode == 0, f"exit status {returncode} after SIGTERM:\n{output}"
        assert exited_after < 15
        assert "Traceback" not in output
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=10)
        log.close()


@pytest.mark.parametrize(
    ("model", "mentions"),
    [
        (MODEL_ID, (MODEL_ID, "offline", "--local-dir")),
        ("./does-not-exist", ("./does-not-exist", "does not exist")),
    ],
    ids=["hub-id-offline", "missing-directory"],
)
def test_serve_fails_fast_with_a_clear_message(tmp_path: Path, model: str, mentions: tuple[str, ...]) -> None:
    cmd = [*console_script(), "serve", "--model", model, "--host", "127.0.0.1", "--port", str(free_port())]
    started = time.monotonic()
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=60, env=clean_env(tmp_path), cwd=tmp_path)
    elapsed = time.monotonic() - started
    assert proc.returncode != 0
    assert elapsed < 30, f"took {elapsed:.1f}s to fail"
    stderr = proc.stderr
    assert "Traceback" not in stderr and "Traceback" not in proc.stdout, stderr
    messages = [line for line in stderr.splitlines() if line.startswith("rankserve:")]
    assert len(messages) == 1, stderr
    message = messages[0]
    # One paragraph: the message is the last thing on stderr, on one line.
    assert stderr.rstrip().endswith(message), stderr
    for word in mentions:
        assert word in message, (word, message)
