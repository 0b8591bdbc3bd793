"""The model's hyper-parameters, read from a checkpoint's `config.json` and validated."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from rankserve.errors import CheckpointError

# The architecture our model module implements; `model_type` is NVIDIA's custom name.
ARCHITECTURE = "LlamaBidirectionalForSequenceClassification"
MODEL_TYPES = ("llama_bidirec", "llama")
POOLINGS = ("avg", "cls", "last")
# The model is validated up to this many tokens (model.md), whatever max_position_embeddings says.
VALIDATED_MAX_LENGTH = 8192


@dataclass(frozen=True)
class RopeScaling:
    """The llama3 scaling of RoPE inverse frequencies."""

    factor: float
    low_freq_factor: float
    high_freq_factor: float
    original_max_position_embeddings: int


@dataclass(frozen=True)
class RerankerConfig:
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    vocab_size: int
    rms_norm_eps: float
    rope_theta: float
    rope_scaling: RopeScaling | None
    max_position_embeddings: int
    pooling: str = "avg"
    temperature: float = 1.0
    num_labels: int = 1
    bos_token_id: int = 128000
    eos_token_id: int = 128001
    pad_token_id: int = 128001
    torch_dtype: str = "bfloat16"
    name_or_path: str = ""
    raw: dict[str, Any] = field(default_factory=dict, compare=False, repr=False)

    @property
    def random_weights(self) -> bool:
        """True for the seeded test checkpoints of `rankserve.model.synthetic` (never a real model)."""
        return bool(self.raw.get("rankserve_random_weights", False))

    @property
    def max_length(self) -> int:
        """Longest sequence (BOS included) the model is meant to see."""
        return min(self.max_position_embeddings, VALIDATED_MAX_LENGTH)

    def parameter_shapes(self) -> dict[str, tuple[int, ...]]:
        """Every tensor the checkpoint must hold, with its shape."""
        d, kv = self.hidden_size, self.num_key_value_heads * self.head_dim
        q = self.num_attention_heads * self.head_dim
        shapes: dict[str, tuple[int, ...]] = {"model.embed_tokens.weight": (self.vocab_size, d)}
        for i in range(self.num_hidden_layers):
            p = f"model.layers.{i}."
            shapes |= {
                p + "input_layernorm.weight": (d,),
                p + "self_attn.q_proj.weight": (q, d),
                p + "self_attn.k_proj.weight": (kv, d),
                p + "self_attn.v_proj.weight": (kv, d),
                p + "self_attn.o_proj.weight": (d, q),
                p + "post_attention_layernorm.weight": (d,),
                p + "mlp.gate_proj.weight": (self.intermediate_size, d),
                p + "mlp.up_proj.weight": (self.intermediate_size, d),
                p + "mlp.down_proj.weight": (d, self.intermediate_size),
            }
        shapes["model.norm.weight"] = (d,)
        shapes["score.weight"] = (self.num_labels, d)
        return shapes

    def num_parameters(self) -> int:
        total = 0
        for shape in self.parameter_shapes().values():
            n = 1
            for s in shape:
                n *= s
            total += n
        return total

    @classmethod
    def from_file(cls, path: str | Path) -> RerankerConfig:
        path = Path(path)
        try:
            raw = json.loads(path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise CheckpointError(f"{path} not found: a checkpoint directory needs its config.json") from None
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise CheckpointError(f"{path} is not valid JSON: {e}") from None
        if not isinstance(raw, dict):
            raise CheckpointError(f"{path} must hold a JSON object")
        return cls.from_dict(raw, source=str(path))

    @classmethod
    def from_dict(cls, raw: dict[str, Any], source: str = "config.json") -> RerankerConfig:
        def bad(name: str, why: str) -> CheckpointError:
            return CheckpointError(f"{source}: field `{name}` {why}")

        def get(name: str, kind: type | tuple[type, ...], default: Any = ..., positive: bool = True) -> Any:
            if name not in raw or raw[name] is None:
                if default is ...:
                    raise bad(name, "is missing")
                return default
            value = raw[name]
            # JSON has no int/float split for whole numbers; bool is not a number here.
            if isinstance(value, bool) or not isinstance(value, kind):
                raise bad(name, f"must be {_kind_name(kind)}, got {value!r}")
            if positive and isinstance(value, (int, float)) and value <= 0:
                raise bad(name, f"must be positive, got {value!r}")
            return value

        architectures = raw.get("architectures")
        if architectures is not None and (not isinstance(architectures, list) or ARCHITECTURE not in architectures):
            raise bad("architectures", f"is {architectures!r}; this server runs {ARCHITECTURE}")
        model_type = raw.get("model_type")
        if model_type is not None and model_type not in MODEL_TYPES:
            raise bad("model_type", f"is {model_type!r}; expected one of {MODEL_TYPES}")
        if raw.get("hidden_act", "silu") != "silu":
            raise bad("hidden_act", f"is {raw['hidden_act']!r}; only 'silu' is supported")
        for flag in ("attention_bias", "mlp_bias"):
            if raw.get(flag):
                raise bad(flag, "is true; the model has no biases")

        hidden = get("hidden_size", int)
        heads = get("num_attention_heads", int)
        head_dim = get("head_dim", int, default=hidden // heads)
        kv_heads = get("num_key_value_heads", int, default=heads)
        if heads % kv_heads:
            raise bad("num_key_value_heads", f"({kv_heads}) must divide num_attention_heads ({heads})")
        if head_dim % 2:
            raise bad("head_dim", f"must be even for RoPE, got {head_dim}")

        pooling = get("pooling", str, default="avg")
        if pooling not in POOLINGS:
            raise bad("pooling", f"is {pooling!r}; expected one of {POOLINGS}")

        id2label = raw.get("id2label")
        num_labels = get("num_labels", int, default=len(id2label) if isinstance(id2label, dict) else 1)
        if num_labels != 1:
            raise bad("id2label", f"declares {num_labels} labels; a reranker has exactly one output logit")

        return cls(
            hidden_size=hidden,
            intermediate_size=get("intermediate_size", int),
            num_hidden_layers=get("num_hidden_layers", int),
            num_attention_heads=heads,
            num_key_value_heads=kv_heads,
            head_dim=head_dim,
            vocab_size=get("vocab_size", int),
            rms_norm_eps=float(get("rms_norm_eps", (int, float))),
            rope_theta=float(get("rope_theta", (int, float))),
            rope_scaling=_rope_scaling(raw.get("rope_scaling"), bad),
            max_position_embeddings=get("max_position_embeddings", int),
            pooling=pooling,
            temperature=float(get("temperature", (int, float), default=1.0)),
            num_labels=num_labels,
            bos_token_id=get("bos_token_id", int, default=128000, positive=False),
            eos_token_id=_first_id(raw.get("eos_token_id"), 128001),
            pad_token_id=_first_id(raw.get("pad_token_id"), 128001),
            torch_dtype=str(raw.get("torch_dtype") or raw.get("dtype") or "bfloat16"),
            name_or_path=str(raw.get("_name_or_path", "")),
            raw=raw,
        )


def _rope_scaling(value: Any, bad: Any) -> RopeScaling | None:
    if value is None:
        return None
    if not isinstance(value, dict):
        raise bad("rope_scaling", f"must be an object, got {value!r}")
    kind = value.get("rope_type", value.get("type"))
    if kind in (None, "default"):
        return None
    if kind != "llama3":
        raise bad("rope_scaling", f"has rope_type {kind!r}; only 'llama3' is supported")
    try:
        return RopeScaling(
            factor=float(value["factor"]),
            low_freq_factor=float(value["low_freq_factor"]),
            high_freq_factor=float(value["high_freq_factor"]),
            original_max_position_embeddings=int(value["original_max_position_embeddings"]),
        )
    except (KeyError, TypeError, ValueError) as e:
        raise bad("rope_scaling", f"is incomplete or malformed ({e!r})") from None


def _first_id(value: Any, default: int) -> int:
    if isinstance(value, list):
        value = value[0] if value else None
    return value if isinstance(value, int) and not isinstance(value, bool) else default


def _kind_name(kind: type | tuple[type, ...]) -> str:
    kinds = kind if isinstance(kind, tuple) else (kind,)
    return " or ".join("a number" if k is float else "an integer" if k is int else "a string" for k in kinds)
