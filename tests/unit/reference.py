"""An independent reference for the reranker, built from Hugging Face transformers' stock `LlamaModel`.

It shares no code with `rankserve.model`: it reads config.json and the safetensors files itself, lets
transformers build the layers (RMSNorm, RoPE with the llama3 scaling, GQA, SwiGLU), makes attention
bidirectional with a 4D additive key-padding mask, and mean-pools like NVIDIA's reference code.

Like the model card's reference it LEFT-pads batches (positions `arange(padded_len)`), whereas rankserve
right-pads with positions `0..len-1`: RoPE is relative and padding keys are masked, so both agree up to
rounding, and the parity tests check the padding/position handling as well as the layers.

Knobs reintroduce the classic port bugs, so the sentinel tests can show the parity tests would catch them:
`causal=True` (a causal mask), `pooling="last"`/`"cls"`, `rope_scaling=False` (no llama3 scaling).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

import torch
from safetensors.torch import load_file
from transformers import LlamaConfig, LlamaModel

# Keys of the checkpoint's config.json that LlamaConfig must not see (custom or irrelevant).
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


class Reference:
    def __init__(
        self,
        checkpoint_dir: str | Path,
        *,
        causal: bool = False,
        pooling: str | None = None,
        rope_scaling: bool = True,
    ) -> None:
        path = Path(checkpoint_dir)
        raw = json.loads((path / "config.json").read_text(encoding="utf-8"))
        fields = {k: v for k, v in raw.items() if k not in NON_LLAMA_KEYS}
        if not rope_scaling:
            fields["rope_scaling"] = None
        cfg = LlamaConfig(**fields)
        cfg._attn_implementation = "eager"
        self.config = cfg
        self.causal = causal
        self.pooling = pooling or raw.get("pooling", "avg")
        self.temperature = float(raw.get("temperature", 1.0))
        self.pad_token_id = int(raw.get("pad_token_id", 128001))

        state: dict[str, torch.Tensor] = {}
        for f in sorted(path.glob("*.safetensors")):
            state |= load_file(str(f))
        self.score_weight = state.pop("score.weight").float()
        state = {k.removeprefix("model."): v for k, v in state.items()}
        model = LlamaModel(cfg).float().eval()
        missing, unexpected = model.load_state_dict(state, strict=False)
        # The only non-checkpoint entries are buffers (rotary inv_freq), which load_state_dict does not list.
        assert not missing and not unexpected, (missing, unexpected)
        for layer in model.layers:
            layer.self_attn.is_causal = False
        self.model = model

    def rope_inv_freq(self) -> torch.Tensor:
        return self.model.rotary_emb.inv_freq

    def _left_pad(self, sequences: Sequence[Sequence[int]]) -> tuple[torch.Tensor, torch.Tensor]:
        width = max(len(s) for s in sequences)
        ids = torch.full((len(sequences), width), self.pad_token_id, dtype=torch.long)
        real = torch.zeros((len(sequences), width), dtype=torch.bool)
        for i, s in enumerate(sequences):
            ids[i, width - len(s) :] = torch.as_tensor(list(s), dtype=torch.long)
            real[i, width - len(s) :] = True
        return ids, real

    def _mask(self, real: torch.Tensor) -> torch.Tensor:
        """4D additive mask `[B, 1, S, S]`: 0 where query row may see key column, finfo.min elsewhere."""
        allowed = real[:, None, None, :].expand(-1, 1, real.shape[1], -1)
        if self.causal:
            s = real.shape[1]
            allowed = allowed & torch.ones(s, s, dtype=torch.bool).tril()
            # Left padding + causal: a padding query row would see no key at all; let it see itself (its output
            # is never pooled) so eager softmax gets no all-masked row.
            allowed = allowed | torch.eye(s, dtype=torch.bool)
        mask = torch.zeros(allowed.shape, dtype=torch.float32)
        return mask.masked_fill(~allowed, torch.finfo(torch.float32).min)

    @torch.no_grad()
    def hidden_states(self, sequences: Sequence[Sequence[int]]) -> tuple[torch.Tensor, torch.Tensor]:
        """Final-norm hidden states `[B, S, D]` (left-padded) and the real-token mask `[B, S]`."""
        ids, real = self._left_pad(sequences)
        out = self.model(input_ids=ids, attention_mask=self._mask(real), use_cache=False)
        return out.last_hidden_state, real

    @torch.no_grad()
    def logits(self, sequences: Sequence[Sequence[int]]) -> torch.Tensor:
        """Float32 logits `[B]`, one per token-id sequence (BOS included by the caller)."""
        hidden, real = self.hidden_states(sequences)
        if self.pooling == "avg":
            m = real[..., None].float()
            pooled = (hidden * m).sum(1) / m.sum(1)
        elif self.pooling == "last":
            pooled = hidden[:, -1]  # left padding: the last position is every sequence's last real token
        elif self.pooling == "cls":
            # The first real token (BOS). NVIDIA's code takes column 0, which under left padding is a padding
            # row for all but the longest sequence; the real checkpoint pools "avg", so this never matters.
            first = real.float().argmax(1)
            pooled = hidden[torch.arange(hidden.shape[0]), first]
        else:
            raise ValueError(f"unknown pooling {self.pooling!r}")
        return (pooled @ self.score_weight.T)[:, 0] / self.temperature


def right_pad(sequences: Sequence[Sequence[int]], pad_token_id: int = 128001) -> tuple[torch.Tensor, torch.Tensor]:
    """rankserve's engine input: right-padded ids `[B, S]` (int64) and lengths `[B]`."""
    width = max(len(s) for s in sequences)
    ids = torch.full((len(sequences), width), pad_token_id, dtype=torch.long)
    for i, s in enumerate(sequences):
        ids[i, : len(s)] = torch.as_tensor(list(s), dtype=torch.long)
    return ids, torch.tensor([len(s) for s in sequences], dtype=torch.long)


@torch.no_grad()
def model_logits(
    model: torch.nn.Module, sequences: Sequence[Sequence[int]], pad_token_id: int = 128001
) -> torch.Tensor:
    """rankserve's model on a right-padded batch of the sequences."""
    ids, lengths = right_pad(sequences, pad_token_id)
    return model(ids, lengths).float()


def max_abs_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float() - b.float()).abs().max())
