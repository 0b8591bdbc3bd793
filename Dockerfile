# syntax=docker/dockerfile:1
# rankserve on NVIDIA GPUs: TensorRT engines (built once per GPU, cached on the volume), else the PyTorch CUDA engine.
# docs/tensorrt.md. NOT BUILT OR RUN YET: written against NVIDIA's documented TensorRT container; see docs/tensorrt.md
# for what has and has not been verified.
#   docker build -t rankserve:gpu .
#   docker run --rm --gpus all -p 8000:8000 -v rankserve-cache:/opt/nim/.cache --stop-timeout 70 rankserve:gpu
#   ... rankserve:gpu --config configs/l4.yaml          # a GPU class's batching preset (configs/<gpu>.yaml)
# Pick the base image tag for the TensorRT version you want (NGC release notes list TensorRT, CUDA and Python per tag);
# engines are tied to that TensorRT version, so changing the tag rebuilds them at the next start.
ARG TENSORRT_IMAGE=nvcr.io/nvidia/tensorrt:25.12-py3
FROM ${TENSORRT_IMAGE}

# The torch CI tests (the Makefile's TORCH), as PyPI's default Linux wheel: the CUDA build, its CUDA libraries
# included. The base image's Python already has the `tensorrt` bindings; the venv sees them (system site packages).
ARG TORCH=torch==2.13.0

ENV PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    VIRTUAL_ENV=/opt/rankserve \
    PATH=/opt/rankserve/bin:$PATH

# A fixed non-root uid (10001), the same the Kubernetes manifests run as; /opt/nim/.cache (the NIM's cache path) holds
# the Hugging Face download and the TensorRT engines.
RUN (python3 -m venv --help >/dev/null 2>&1 || (apt-get update && apt-get install -y --no-install-recommends python3-venv \
      && rm -rf /var/lib/apt/lists/*)) \
 && python3 -m venv --system-site-packages "${VIRTUAL_ENV}" \
 && python -c "import importlib.util as u, sys; sys.exit(u.find_spec('tensorrt') is None and 'no tensorrt bindings')" \
 && useradd --uid 10001 --user-group --create-home --home-dir /home/rankserve --shell /usr/sbin/nologin rankserve \
 && mkdir -p /opt/nim/.cache \
 && chown rankserve:rankserve /opt/nim/.cache

WORKDIR /app
# As the Makefile installs it (torch first, then the package with its torch extra), without the dev tools; the onnx
# extra exports the checkpoint for the engine build.
RUN pip install "${TORCH}"
COPY pyproject.toml README.md ./
COPY src ./src
RUN pip install ".[torch,onnx,otel]"
COPY configs ./configs

# NIM-style settings (docs/configuration.md lists them all; RANKSERVE_* for the rest):
#   NIM_HTTP_API_PORT          port to serve on (8000)
#   NIM_SERVED_MODEL_NAME      extra model ids requests may name (comma-separated)
#   NIM_TRITON_MAX_BATCH_SIZE  passages per batch; also the largest batch of the TensorRT profiles
#   NIM_TRITON_MAX_SEQ_LENGTH  longest sequence (tokens); also the longest the TensorRT profiles take
#   NIM_LOG_LEVEL              debug, info, warning, error
#   RANKSERVE_MODEL            a Hugging Face id (fetched into HF_HOME at the first start) or a mounted checkpoint
#   RANKSERVE_BACKEND          auto (TensorRT, else PyTorch CUDA), tensorrt (fail rather than fall back), torch
#   RANKSERVE_TENSORRT_ENGINE  serve this prebuilt engine (rankserve build-engine) instead of the cache
#   RANKSERVE_TENSORRT_BUILD   false: never build at start-up (no cached engine: PyTorch CUDA)
#   HF_TOKEN                   if the model's licence must be accepted
# The first start on a GPU exports the checkpoint to ONNX and builds the engine (minutes); later starts load it.
# The volume is at the NIM's cache path, /opt/nim/.cache: the model download and the engines live in it.
ENV HF_HOME=/opt/nim/.cache/huggingface \
    RANKSERVE_ENGINE_CACHE_DIR=/opt/nim/.cache/engines \
    NIM_HTTP_API_PORT=8000 \
    RANKSERVE_SHUTDOWN_DRAIN_SECONDS=3
VOLUME ["/opt/nim/.cache"]

USER 10001:10001
EXPOSE 8000
STOPSIGNAL SIGTERM
# Ready = the engine is loaded and warmed up. A first start may download 2.5 GB and build an engine: a long grace.
HEALTHCHECK --interval=15s --timeout=5s --start-period=1800s --retries=3 \
    CMD ["python", "-c", "import os, urllib.request; urllib.request.urlopen('http://127.0.0.1:%s/v1/health/ready' % os.environ.get('NIM_HTTP_API_PORT', '8000'), timeout=4)"]
ENTRYPOINT ["rankserve", "serve"]
CMD []
