"""The baseline of the GPU check: the reranker the way a Hugging Face user runs it, eagerly.

transformers' stock `LlamaModel` (SDPA attention) made bidirectional, as tests/unit/reference.py does, on the
device in bf16 (fp32 on CPU); one right-padded batch per request with a key-padding mask; mean pooling and the
score head. No packing, no fusion, no graphs, no cross-request batching. It shares no code with
`rankserve.model`, so the GPU check's parity stage also checks it.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file

# config.json keys that LlamaConfig must not see (custom or irrelevant), as in tests/unit/reference.py.
NON_LLAMA_KEYS = (
    "architectures",
    "auto_map",
    "model_type",
    "pooling",
    "temperature",
    "id2label",
    "label2id",
    "rankserve_random_weights",
    "_name_or_path",
    "torch_dtype",
)


class HFEager:
    def __init__(self, checkpoint_dir: str | Path, device: torch.device, dtype: torch.dtype | None = None) -> None:
        from transformers import LlamaConfig, LlamaModel
        from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

        path = Path(checkpoint_dir)
        raw = json.loads((path / "config.json").read_text(encoding="utf-8"))
        cfg = LlamaConfig(**{k: v for k, v in raw.items() if k not in NON_LLAMA_KEYS})
        cfg._attn_implementation = "sdpa"
        self.device = device
        self.dtype = dtype or (torch.bfloat16 if device.type == "cuda" else torch.float32)
        self.pooling = raw.get("pooling", "avg")
        if self.pooling != "avg":
            raise ValueError("the baseline implements avg pooling only")
        self.temperature = float(raw.get("temperature", 1.0))
        state: dict[str, torch.Tensor] = {}
        for f in sorted(path.glob("*.safetensors")):
            state |= load_file(str(f), device=str(device))
        self.score_weight = state.pop("score.weight").to(self.dtype)
        state = {k.removeprefix("model."): v.to(self.dtype) for k, v in state.items()}
        with torch.device("meta"):
            model = LlamaModel(cfg)
        model.load_state_dict(state, strict=False, assign=True)
        with torch.device(device):  # the RoPE buffers were created on the meta device with the module
            model.rotary_emb = LlamaRotaryEmbedding(config=cfg)
        for layer in model.layers:
            layer.self_attn.is_causal = False
        leftover = [n for n, p in model.named_parameters() if p.is_meta]
        if leftover:
            raise RuntimeError(f"baseline weights missing: {leftover[:3]}")
        self.model = model.eval()

    @torch.inference_mode()
    def score(self, input_ids: np.ndarray, lengths: np.ndarray) -> np.ndarray:
        ids = torch.as_tensor(input_ids, dtype=torch.long).to(self.device)
        lens = torch.as_tensor(lengths, dtype=torch.long).to(self.device)
        bsz, seqlen = ids.shape
        real = torch.arange(seqlen, device=self.device)[None, :] < lens[:, None]
        # A 4D boolean mask (True: may attend) is passed through as is: bidirectional, padding keys hidden.
        mask = real[:, None, None, :].expand(bsz, 1, seqlen, seqlen)
        hidden = self.model(input_ids=ids, attention_mask=mask, use_cache=False).last_hidden_state
        m = real[..., None].to(hidden.dtype)
        pooled = (hidden * m).sum(1) / m.sum(1)
        logits = (pooled @ self.score_weight.T)[:, 0].float() / self.temperature
        return logits.cpu().numpy()
