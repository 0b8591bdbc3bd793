"""A `rankserve serve` subprocess (the real CLI, uvicorn's own signal handling) with its log captured to a file."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx

from tests.integration._support import free_port


def clean_env(tmp_path: Path, **extra: str) -> dict[str, str]:
    """Offline, an empty HF cache, no RANKSERVE_/NIM_ settings leaking in from the caller's environment."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "HUGGINGFACE_", "RANKSERVE_", "NIM_"))}
    env.pop("TRANSFORMERS_CACHE", None)
    env |= {"HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf-home"), "PYTHONUNBUFFERED": "1", **extra}
    return env


@dataclass
class CliServer:
    proc: subprocess.Popen[bytes]
    url: str
    log_path: Path

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def client(self, **kwargs: Any) -> httpx.Client:
        return httpx.Client(base_url=self.url, timeout=kwargs.pop("timeout", 15.0), **kwargs)

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=10)
        return int(self.proc.returncode)


def start_cli(
    checkpoint_dir: Path, tmp_path: Path, *flags: str, env: dict[str, str] | None = None, ready_timeout: float = 60.0
) -> CliServer:
    """Start `python -m rankserve.cli serve` on a free loopback port and wait (bounded) until it is ready."""
    port = free_port()
    cmd = [sys.executable, "-m", "rankserve.cli", "serve", "--model", str(checkpoint_dir)]
    cmd += ["--host", "127.0.0.1", "--port", str(port), "--device", "cpu", "--dtype", "float32", *flags]
    log_path = tmp_path / f"server-{port}.log"
    with log_path.open("wb") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env or clean_env(tmp_path))
    server = CliServer(proc, f"http://127.0.0.1:{port}", log_path)
    deadline = time.monotonic() + ready_timeout
    with httpx.Client(base_url=server.url, timeout=5) as client:
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"server exited with {proc.returncode}:\n{server.log()}")
            if time.monotonic() > deadline:
                server.stop()
                raise RuntimeError(f"server not ready within {ready_timeout}s:\n{server.log()}")
            try:
                if client.get("/v1/health/ready").status_code == 200:
                    return server
            except httpx.TransportError:
                pass
            time.sleep(0.05)
