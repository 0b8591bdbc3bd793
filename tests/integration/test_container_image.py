"""The images without Docker: what an image runs, CI runs.

The images cannot be built in CI (no Docker daemon, no registry but PyPI), so this reads each Dockerfile
(Dockerfile.cpu and the GPU Dockerfile) and runs its ENTRYPOINT + CMD with its ENV (only the model, the port, the
host and the volume's paths moved to the test's) as a real process, runs its HEALTHCHECK command against it, stops
it with its STOPSIGNAL and checks that it drains and exits 0. For the CPU image it also checks that it is non-root,
exposes the port it serves and installs the package as the Makefile does (tests/unit/test_tensorrt_dockerfile.py
does so for the GPU image).
"""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import pytest

from rankserve.settings import Settings
from tests.integration._cli import clean_env
from tests.integration._support import free_port, ranking_body

ROOT = Path(__file__).resolve().parents[2]
DOCKERFILE = ROOT / "Dockerfile.cpu"


@dataclass
class Dockerfile:
    instructions: list[tuple[str, str]]
    env: dict[str, str] = field(default_factory=dict)

    @classmethod
    def parse(cls, path: Path) -> Dockerfile:
        text = re.sub(r"\\\n", " ", "\n".join(ln for ln in path.read_text().splitlines() if not ln.startswith("#")))
        instructions = []
        for line in text.splitlines():
            if line.strip():
                keyword, _, rest = line.strip().partition(" ")
                instructions.append((keyword.upper(), rest.strip()))
        out = cls(instructions)
        for rest in out.all("ENV"):
            out.env.update(item.split("=", 1) for item in shlex.split(rest))  # type: ignore[misc]
        return out

    def all(self, keyword: str) -> list[str]:
        return [rest for kw, rest in self.instructions if kw == keyword]

    def one(self, keyword: str) -> str:
        found = self.all(keyword)
        assert len(found) == 1, (keyword, found)
        return found[0]

    def exec_form(self, keyword: str) -> list[str]:
        value = json.loads(self.one(keyword))
        assert isinstance(value, list), f"{keyword} must be in exec form (signals reach the server directly)"
        return value

    def healthcheck(self) -> tuple[dict[str, str], list[str]]:
        rest = self.one("HEALTHCHECK")
        options = dict(re.findall(r"--([a-z-]+)=(\S+)", rest))
        command = rest[rest.index("CMD") + 3 :].strip()
        return options, json.loads(command)


@pytest.fixture(scope="module")
def dockerfile() -> Dockerfile:
    return Dockerfile.parse(DOCKERFILE)


def test_image_is_non_root_and_exposes_what_it_serves(dockerfile: Dockerfile) -> None:
    user = dockerfile.one("USER").split(":")[0]
    assert user.isdigit() and int(user) != 0, "a numeric non-root uid (Kubernetes runAsNonRoot can verify it)"
    assert dockerfile.one("EXPOSE") == dockerfile.env["NIM_HTTP_API_PORT"]
    assert dockerfile.one("STOPSIGNAL") == "SIGTERM"
    volumes = json.loads(dockerfile.one("VOLUME"))
    assert any(Path(dockerfile.env["HF_HOME"]).is_relative_to(v) for v in volumes), "the model cache is on a volume"
    # Every RANKSERVE_/NIM_ variable the image sets is a setting the server knows.
    aliases = {a.upper() for f in Settings.model_fields.values() for a in f.validation_alias.choices}  # type: ignore[union-attr]
    for name in dockerfile.env:
        if name.startswith(("RANKSERVE_", "NIM_")):
            assert name in aliases, name
    options, command = dockerfile.healthcheck()
    assert {"interval", "timeout", "start-period", "retries"} <= set(options)
    assert "/v1/health/ready" in " ".join(command)


def test_image_installs_as_the_makefile_does(dockerfile: Dockerfile) -> None:
    makefile = (ROOT / "Makefile").read_text()
    torch = re.search(r"^TORCH\s*\?=\s*(\S+)", makefile, re.M)
    assert torch is not None
    assert re.search(rf"^ARG TORCH={re.escape(torch.group(1))}$", DOCKERFILE.read_text(), re.M), "the torch CI tests"
    runs = " && ".join(dockerfile.all("RUN"))
    assert '"${TORCH}"' in runs and 'pip install ".[torch' in runs
    assert runs.index('"${TORCH}"') < runs.index('".[torch'), "torch first, as the Makefile does"
    for copied in ("pyproject.toml", "src", "configs"):
        assert any(copied in c for c in dockerfile.all("COPY")), copied
    lines = (ROOT / ".dockerignore").read_text().splitlines()
    ignored = [ln.strip() for ln in lines if ln.strip() and not ln.startswith("#")]
    assert not {"src", "configs", "pyproject.toml", "README.md"} & set(ignored)
    assert {".git", ".venv", "checkpoints"} <= set(ignored)


def image_env(dockerfile: Dockerfile, tmp_path: Path, port: int, model: Path) -> dict[str, str]:
    """The image's ENV, with paths on its volume moved into the test's folder, the test's port and model, loopback,
    and this interpreter's environment instead of the image's (PATH, VIRTUAL_ENV, pip's settings)."""
    env = clean_env(tmp_path)
    volumes = json.loads(dockerfile.one("VOLUME"))
    for name, value in dockerfile.env.items():
        if name in ("PATH", "VIRTUAL_ENV") or name.startswith("PIP_"):
            continue
        for volume in volumes:
            if value.startswith(volume):
                value = str(tmp_path / "volume") + value[len(volume) :]
        env[name] = value
    env |= {"NIM_HTTP_API_PORT": str(port), "RANKSERVE_HOST": "127.0.0.1", "RANKSERVE_MODEL": str(model)}
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    return env


def healthcheck(command: list[str], env: dict[str, str], timeout: float) -> int:
    command = [sys.executable if command[0] == "python" else command[0], *command[1:]]
    return subprocess.run(command, env=env, capture_output=True, timeout=timeout + 5).returncode


@pytest.mark.timeout(120)
@pytest.mark.parametrize("image", ["Dockerfile.cpu", "Dockerfile"])
def test_image_command_serves_passes_its_healthcheck_and_stops_cleanly(
    image: str, tiny_checkpoint_dir: Path, tmp_path: Path
) -> None:
    """Both images' commands, here on the CPU: the GPU image's `rankserve serve` picks its engine by itself
    (TensorRT or CUDA where there is a GPU, the CPU here), so its command, health check and stop are the same."""
    if not (ROOT / image).exists():
        pytest.skip(f"{image} is not in this checkout")
    dockerfile = Dockerfile.parse(ROOT / image)
    argv = dockerfile.exec_form("ENTRYPOINT") + dockerfile.exec_form("CMD")
    assert argv[:2] == ["rankserve", "serve"]
    executable = shutil.which(argv[0], path=str(Path(sys.executable).parent))
    assert executable, "the `rankserve` console script is installed next to the interpreter"
    port = free_port()
    env = image_env(dockerfile, tmp_path, port, tiny_checkpoint_dir)
    if image == "Dockerfile":
        env |= {"RANKSERVE_DEVICE": "cpu", "RANKSERVE_DTYPE": "float32"}  # whatever it asks for, CI has no GPU
    options, check = dockerfile.healthcheck()
    check_timeout = float(options["timeout"].rstrip("s"))
    log_path = tmp_path / "image.log"
    with log_path.open("wb") as log:
        proc = subprocess.Popen([executable, *argv[1:]], cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 60
        while healthcheck(check, env, check_timeout) != 0:
            assert proc.poll() is None, log_path.read_text()
            assert time.monotonic() < deadline, "the HEALTHCHECK never passed:\n" + log_path.read_text()
            time.sleep(0.2)
        with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=15) as client:
            r = client.post("/v1/ranking", json=ranking_body("q", ["a passage", "another one"]))
            assert r.status_code == 200, r.text
            assert sorted(x["index"] for x in r.json()["rankings"]) == [0, 1]
            assert 'device="cpu"' in client.get("/v1/metrics").text

        # docker stop: STOPSIGNAL, then the drain (the listener answers, readiness 503: the healthcheck fails at
        # once), then a clean exit well within docker's default 10s grace period.
        drain = float(dockerfile.env["RANKSERVE_SHUTDOWN_DRAIN_SECONDS"])
        assert 0 < drain < 10
        proc.send_signal(getattr(signal, dockerfile.one("STOPSIGNAL")))
        with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=15) as client:
            assert client.get("/v1/health/ready").status_code == 503, "draining: still listening, not ready"
        assert healthcheck(check, env, check_timeout) != 0, "the healthcheck fails while draining"
        assert proc.wait(timeout=drain + 20) == 0, log_path.read_text()
        assert healthcheck(check, env, check_timeout) != 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=10)
