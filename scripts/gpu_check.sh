#!/usr/bin/env bash
# The GPU check in one command, for a bare GPU machine (PyTorch, transformers, tokenizers, safetensors present;
# no network). Run scripts/gpu_wheels.sh beforehand where PyPI is reachable, and bring its folder along.
#
#   scripts/gpu_check.sh OUTPUT_DIR [gpu_check.py options]      # e.g. scripts/gpu_check.sh "$OUT"
#   scripts/gpu_check.sh OUTPUT_DIR --dry-run                    # on a CPU: every step, tiny sizes
#
# Steps: install rankserve and its missing dependencies from the wheel folder (RANKSERVE_WHEELS, default .whl)
# into a private target (no index); then scripts/gpu_check.py: the full-size random checkpoint drawn on the GPU,
# GPU bf16 vs CPU fp32 parity on the tiny checkpoint, engine / mixed / latency / HTTP / FP8 / graphs benchmarks,
# each with the Hugging Face eager baseline in the same run; before it, the GPU unit tests (pytest.log).
# Under 8 minutes on an H100/H200; writes gpu_check.json, gpu_check.md, server.log and pytest.log into
# OUTPUT_DIR and prints a short table last.
set -euo pipefail
cd "$(dirname "$0")/.."
if [ $# -lt 1 ]; then
  echo "usage: scripts/gpu_check.sh OUTPUT_DIR [--dry-run] [gpu_check.py options]" >&2
  exit 2
fi
OUTPUT=$1
shift
WHEELS=${RANKSERVE_WHEELS:-.whl}
PY=${PYTHON:-python3}
SITE=${RANKSERVE_SITE:-/tmp/rankserve-site}
export PYTHONUNBUFFERED=1 GPU_CHECK_SH=1 HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
mkdir -p "$OUTPUT"
start=$(date +%s)

if [ -d "$WHEELS" ] && ls "$WHEELS"/*.whl >/dev/null 2>&1; then
  deps=$(ls "$WHEELS"/*.whl | grep -v '/rankserve-' || true)
  rm -rf "$SITE"
  # shellcheck disable=SC2086
  "$PY" -m pip install -q --no-index --no-deps --no-compile --disable-pip-version-check --target "$SITE" $deps
  # rankserve itself: the working tree this script runs in (setuptools is on the image), else the built wheel.
  if ! "$PY" -m pip install -q --no-index --no-deps --no-build-isolation --no-compile \
       --disable-pip-version-check --target "$SITE" . 2>"$OUTPUT/install.log"; then
    echo "installing the working tree failed (see $OUTPUT/install.log); using the wheel from $WHEELS"
    "$PY" -m pip install -q --no-index --no-deps --no-compile --target "$SITE" "$WHEELS"/rankserve-*.whl
  fi
  export PYTHONPATH="$SITE${PYTHONPATH:+:$PYTHONPATH}" PATH="$SITE/bin:$PATH"
else
  echo "no wheels in $WHEELS: using the current environment as it is"
fi
"$PY" -c "import rankserve, fastapi, uvicorn, pydantic_settings, torch; print('rankserve from', rankserve.__file__, \
'| torch', torch.__version__, '| cuda', torch.cuda.is_available())"
echo "installed in $(( $(date +%s) - start ))s"

# The GPU tests of the suite (they skip on a CPU): the CUDA engine's variants against the CPU fp32 engine.
if [ "${GPU_CHECK_PYTEST:-1}" != 0 ]; then
  if timeout 120 "$PY" -m pytest -q -p no:cacheprovider tests/unit/test_gpu_engine.py tests/unit/test_packing.py \
       >"$OUTPUT/pytest.log" 2>&1; then
    echo "GPU unit tests: $(tail -1 "$OUTPUT/pytest.log")"
  else
    echo "GPU unit tests FAILED (see $OUTPUT/pytest.log): $(tail -1 "$OUTPUT/pytest.log")"
  fi
fi

# 360 s for the stages, less whatever the install and the unit tests took beyond 90 s (the unit tests may run up
# to their 120 s timeout), so the whole command stays near 7.5 minutes: the device tool's calls are capped at 10.
spent=$(( $(date +%s) - start ))
budget=$(( 450 - spent ))
if [ "$budget" -gt 360 ]; then budget=360; fi
if [ "$budget" -lt 180 ]; then budget=180; fi
"$PY" scripts/gpu_check.py --output "$OUTPUT" --budget "${GPU_CHECK_BUDGET:-$budget}" "$@"
echo "total $(( $(date +%s) - start ))s"
