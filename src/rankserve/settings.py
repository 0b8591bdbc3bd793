"""One typed settings object, built once at start-up from the environment and the command line.

Environment variables use the NIM's names where the NIM has one, `RANKSERVE_` otherwise. Command-line flags
override the environment.
"""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import AliasChoices, AliasGenerator, Field, field_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

from rankserve.model.checkpoint import MODEL_ID


def _env(name: str, *nim: str) -> AliasChoices:
    """Accept the field's own name (for keyword construction), the NIM's names, then RANKSERVE_<NAME>."""
    return AliasChoices(name, *nim, f"RANKSERVE_{name.upper()}")


class Settings(BaseSettings):
    # Each field is read from its own name and RANKSERVE_<NAME>; a field with NIM names gives its aliases itself.
    model_config = SettingsConfigDict(
        case_sensitive=False,
        populate_by_name=True,
        extra="forbid",
        alias_generator=AliasGenerator(validation_alias=_env),
    )

    # What to serve
    model: str = Field(MODEL_ID, description="checkpoint directory or HF id")
    served_model_name: Annotated[list[str], NoDecode] = Field(
        default_factory=list,
        validation_alias=_env("served_model_name", "NIM_SERVED_MODEL_NAME"),
        description="extra model ids requests may name (comma-separated); the first is listed first",
    )
    backend: Literal["auto", "torch", "onnxruntime", "tensorrt"] = Field(
        "auto", description="the engine; auto: the best one this machine can run"
    )
    device: str = Field("auto", description="auto, cpu, cuda, cuda:N")
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = Field(
        "auto", description="engine precision; auto: bfloat16 on CUDA, float32 on CPU"
    )
    cpu_threads: int | None = Field(None, ge=1, description="engine threads on CPU; unset: PyTorch's default")
    # ONNX Runtime on CPU (docs/onnx.md)
    onnx_cache_dir: str | None = Field(
        None,
        description="where the onnxruntime backend keeps exported graphs; unset: an onnx/ folder in the checkpoint",
    )
    onnx_int8: bool = Field(
        False,
        validation_alias=_env("onnx_int8"),
        description="onnxruntime: int8 dynamic quantization of the linear layers (faster on CPU, small accuracy cost)",
    )
    onnx_save_optimized: bool = Field(
        False,
        description="onnxruntime: save the optimized graph beside the export and load it on later starts",
    )
    # TensorRT (docs/tensorrt.md)
    tensorrt_engine: str | None = Field(
        None,
        description="a built TensorRT engine directory (model.plan, engine.json) to serve; unset: the engine cache",
    )
    engine_cache_dir: str = Field(
        "~/.cache/rankserve/engines",
        description="TensorRT engines built at start-up, one per checkpoint, GPU and TensorRT version (a volume)",
    )
    tensorrt_build: bool = Field(
        True,
        description="on a GPU, build a TensorRT engine at start-up when none is cached (minutes, once)",
    )
    # The PyTorch engine on CUDA (docs/gpu.md)
    torch_packed: Literal["auto", "on", "off"] = Field(
        "auto",
        description="torch: no compute on padding (packed batches); auto: on CUDA, the padded reference on CPU",
    )
    torch_attention: Literal["auto", "varlen", "sdpa"] = Field(
        "auto",
        description="torch, packed: varlen (FlashAttention over packed sequences) or sdpa; auto: varlen if usable",
    )
    torch_cuda_graphs: bool = Field(
        False,
        description="torch, packed: CUDA graphs for batches of up to 4096 tokens, captured at warm-up",
    )
    torch_compile: bool = Field(False, description="torch, packed: torch.compile at warm-up")
    torch_fp8: bool = Field(
        False, validation_alias=_env("torch_fp8"), description="torch on CUDA: FP8 GEMMs (Ada/Hopper GPUs only)"
    )

    # HTTP
    host: str = Field("0.0.0.0", description="listen address")
    port: int = Field(
        8000, ge=1, le=65535, validation_alias=_env("port", "NIM_HTTP_API_PORT"), description="listen port"
    )
    log_level: Literal["debug", "info", "warning", "error", "critical"] = Field(
        "info", validation_alias=_env("log_level", "NIM_LOG_LEVEL"), description="server log threshold"
    )
    api_key: str | None = Field(
        None,
        repr=False,
        description="require `Authorization: Bearer <key>` on inference routes; unset: auth off",
    )
    auth_public_routes: Annotated[list[Literal["health", "models", "metrics", "metadata"]], NoDecode] = Field(
        default_factory=lambda: ["health", "models", "metrics", "metadata"],
        description="route groups reachable without the API key when one is set",
    )
    cors_allow_origins: Annotated[list[str], NoDecode] = Field(
        default_factory=list,
        description="browser origins allowed to call the API (comma-separated, `*` for any); empty: CORS off",
    )
    max_body_bytes: int = Field(64 * 1024 * 1024, ge=1024, description="larger request bodies: 413")
    shutdown_drain_seconds: float = Field(
        0.0,
        ge=0,
        description="after SIGTERM, answer 503 on readiness this long before closing the listener",
    )

    # Logs and traces (see docs/observability.md)
    log_format: Literal["auto", "json", "text"] = Field(
        "auto",
        description="json: one JSON object per line; text: plain lines; auto: json unless stderr is a terminal",
    )
    access_log: bool = Field(True, description="one log line per HTTP request (replaces uvicorn's)")
    log_request_text: bool = Field(
        False,
        description="put the query and passage texts into the access log (off: never any request text in logs)",
    )
    otlp_endpoint: str | None = Field(
        None,
        validation_alias=_env("otlp_endpoint", "OTEL_EXPORTER_OTLP_ENDPOINT"),
        description="OTLP/HTTP collector base URL (spans go to <url>/v1/traces); unset: tracing off",
    )

    # Limits of one request
    max_seq_length: int = Field(
        8192,
        ge=16,
        validation_alias=_env("max_seq_length", "NIM_TRITON_MAX_SEQ_LENGTH"),
        description="tokens per query+passage pair, BOS included (at most 8192, the validated length)",
    )
    max_passages: int = Field(512, ge=1, description="passages per request")
    request_timeout_seconds: float = Field(
        60.0,
        gt=0,
        description="per-request deadline from arrival (504 after it; the remaining work is dropped)",
    )

    # Long documents and the score cache (see docs/configuration.md)
    long_documents: Literal["truncate", "window"] = Field(
        "truncate",
        description="window: requests asking for truncate END get WINDOW (overlapping windows, max logit)",
    )
    window_overlap: float = Field(0.125, ge=0, le=0.5, description="share of a window's passage tokens")
    max_windows_per_request: int = Field(
        1024,
        ge=1,
        description="sequences one WINDOW request may send (a passage that fits counts as one); more: 422",
    )
    score_cache_size: int = Field(0, ge=0, description="scores kept in the LRU cache; 0: off")

    # Batching (see docs/configuration.md for how the defaults were chosen)
    max_batch_size: int = Field(
        64,
        ge=1,
        validation_alias=_env("max_batch_size", "NIM_TRITON_MAX_BATCH_SIZE"),
        description="sequences per engine batch",
    )
    max_batch_tokens: int | None = Field(
        None,
        ge=16,
        description="padded tokens per batch; default: per engine (CPU 2048, measured; CUDA 16384, unmeasured)",
    )
    max_queue_tokens: int = Field(
        2_000_000,
        ge=1,
        description="tokens waiting for the engine; a request that would exceed it: 429 with Retry-After",
    )
    batch_lookahead: int = Field(
        1024,
        ge=1,
        description="oldest waiting sequences a batch is chosen from",
    )
    min_batch_fill: float = Field(
        0.9,
        gt=0,
        le=1,
        description="a batch grows only while its real tokens stay at least this share of its padded tokens",
    )
    warmup: bool = Field(True, description="run the engine once before reporting ready")

    @field_validator("served_model_name", "auth_public_routes", "cors_allow_origins", mode="before")
    @classmethod
    def _split_commas(cls, value: object) -> object:
        if isinstance(value, str):
            return [v.strip() for v in value.split(",") if v.strip()]
        return value

    @field_validator("log_level", mode="before")
    @classmethod
    def _lower(cls, value: object) -> object:
        return value.lower() if isinstance(value, str) else value
