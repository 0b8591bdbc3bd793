"""The GPU image (Dockerfile) without Docker: base image, install, user, volume, port, health check, settings."""

from __future__ import annotations

import json
import re
import shlex
from pathlib import Path

from rankserve.settings import Settings

ROOT = Path(__file__).resolve().parents[2]


def instructions() -> list[tuple[str, str]]:
    lines = [ln for ln in (ROOT / "Dockerfile").read_text().splitlines() if not ln.lstrip().startswith("#")]
    text = re.sub(r"\\\n", " ", "\n".join(lines))
    out = []
    for line in text.splitlines():
        if line.strip():
            keyword, _, rest = line.strip().partition(" ")
            out.append((keyword.upper(), rest.strip()))
    return out


def test_gpu_image() -> None:
    found = instructions()
    get = lambda kw: [rest for k, rest in found if k == kw]  # noqa: E731
    args = dict(a.split("=", 1) for a in get("ARG"))
    assert args["TENSORRT_IMAGE"].startswith("nvcr.io/nvidia/tensorrt:") and get("FROM") == ["${TENSORRT_IMAGE}"]
    makefile_torch = re.search(r"^TORCH\s*\?=\s*(\S+)", (ROOT / "Makefile").read_text(), re.M)
    assert makefile_torch is not None and args["TORCH"] == makefile_torch.group(1)  # the torch CI tests
    runs = " && ".join(get("RUN"))
    assert runs.index('pip install "${TORCH}"') < runs.index('pip install ".[torch,onnx,otel]"')  # as the Makefile does
    assert "--system-site-packages" in runs  # the base image's tensorrt bindings stay visible
    env: dict[str, str] = {}
    for rest in get("ENV"):
        env.update(item.split("=", 1) for item in shlex.split(rest))  # type: ignore[misc]
    (user,) = get("USER")
    assert user.split(":")[0].isdigit() and int(user.split(":")[0]) != 0
    (volume,) = get("VOLUME")
    (cache,) = json.loads(volume)
    assert env["HF_HOME"].startswith(cache) and env["RANKSERVE_ENGINE_CACHE_DIR"].startswith(cache)
    assert get("EXPOSE") == [env["NIM_HTTP_API_PORT"]] == ["8000"]
    (health,) = get("HEALTHCHECK")
    assert "/v1/health/ready" in health and "--start-period=" in health
    assert json.loads(get("ENTRYPOINT")[0]) == ["rankserve", "serve"]
    aliases = {a.upper() for f in Settings.model_fields.values() for a in f.validation_alias.choices}  # type: ignore[union-attr]
    for name in env:
        if name.startswith(("RANKSERVE_", "NIM_")):
            assert name in aliases, f"{name} is not a setting"
    # The NIM-style variables the comments document are settings too.
    documented = set(re.findall(r"^#\s+((?:NIM|RANKSERVE)_[A-Z_]+)\s", (ROOT / "Dockerfile").read_text(), re.M))
    assert {"NIM_HTTP_API_PORT", "NIM_TRITON_MAX_BATCH_SIZE", "RANKSERVE_TENSORRT_ENGINE"} <= documented
    assert documented <= aliases, documented - aliases
