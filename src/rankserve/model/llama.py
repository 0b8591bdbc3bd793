"""llama-nemotron-rerank-1b-v2: a bidirectional Llama-3.2 encoder, mean-pooled, with a one-logit head.

The single definition of the model. ONNX and TensorRT engines are exports of this module.

Inputs are right-padded token ids `[B, S]` plus each sequence's length `[B]`; positions are `0..len-1`.
Numerics: weights and matmuls run in the weight dtype (bf16 on GPU, fp32 on CPU); the residual stream,
RMSNorm, RoPE, softmax and pooling accumulate in fp32.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from rankserve.model.config import RerankerConfig, RopeScaling


def rope_inv_freq(head_dim: int, theta: float, scaling: RopeScaling | None) -> Tensor:
    """RoPE inverse frequencies, with Llama 3's wavelength-dependent scaling if configured."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim))
    if scaling is None:
        return inv_freq
    low_wavelen = scaling.original_max_position_embeddings / scaling.low_freq_factor
    high_wavelen = scaling.original_max_position_embeddings / scaling.high_freq_factor
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > low_wavelen, inv_freq / scaling.factor, inv_freq)
    smooth = (scaling.original_max_position_embeddings / wavelen - scaling.low_freq_factor) / (
        scaling.high_freq_factor - scaling.low_freq_factor
    )
    smoothed = (1 - smooth) * scaled / scaling.factor + smooth * scaled
    is_medium = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
    return torch.where(is_medium, smoothed, scaled)


def rope_cos_sin(inv_freq: Tensor, seq_len: int) -> tuple[Tensor, Tensor]:
    """cos/sin tables `[seq_len, head_dim]` in fp32 ("rotate half" layout: the halves repeat)."""
    positions = torch.arange(seq_len, dtype=torch.float32, device=inv_freq.device)
    freqs = torch.outer(positions, inv_freq.float())
    emb = torch.cat((freqs, freqs), dim=-1)
    return emb.cos(), emb.sin()


def apply_rope(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """x: `[B, H, S, D]`; cos/sin: `[S, D]` fp32. Computed in fp32, returned in x's dtype."""
    x32 = x.float()
    half = x32.shape[-1] // 2
    rotated = torch.cat((-x32[..., half:], x32[..., :half]), dim=-1)
    return (x32 * cos + rotated * sin).to(x.dtype)


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: Tensor) -> Tensor:
        """x in fp32 (the residual stream); the result is cast to the weight dtype before the scale."""
        x = x.float()
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x.to(self.weight.dtype)


class Attention(nn.Module):
    def __init__(self, config: RerankerConfig) -> None:
        super().__init__()
        self.n_heads = config.num_attention_heads
        self.n_kv_heads = config.num_key_value_heads
        self.head_dim = config.head_dim
        d, q, kv = config.hidden_size, self.n_heads * self.head_dim, self.n_kv_heads * self.head_dim
        self.q_proj = nn.Linear(d, q, bias=False)
        self.k_proj = nn.Linear(d, kv, bias=False)
        self.v_proj = nn.Linear(d, kv, bias=False)
        self.o_proj = nn.Linear(q, d, bias=False)

    def forward(self, x: Tensor, cos: Tensor, sin: Tensor, key_mask: Tensor) -> Tensor:
        """key_mask: bool `[B, 1, 1, S]`, True where the key is a real token. No causal mask."""
        bsz, seqlen, _ = x.shape
        q = self.q_proj(x).view(bsz, seqlen, self.n_heads, self.head_dim).transpose(1, 2)
        k = self.k_proj(x).view(bsz, seqlen, self.n_kv_heads, self.head_dim).transpose(1, 2)
        v = self.v_proj(x).view(bsz, seqlen, self.n_kv_heads, self.head_dim).transpose(1, 2)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        # Grouped-query attention: each KV head serves n_heads / n_kv_heads query heads.
        repeats = self.n_heads // self.n_kv_heads
        k = k.repeat_interleave(repeats, dim=1)
        v = v.repeat_interleave(repeats, dim=1)
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=key_mask, is_causal=False)
        return self.o_proj(y.transpose(1, 2).reshape(bsz, seqlen, -1))


class MLP(nn.Module):
    def __init__(self, config: RerankerConfig) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=False)
        self.up_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=False)
        self.down_proj = nn.Linear(config.intermediate_size, config.hidden_size, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class DecoderLayer(nn.Module):
    def __init__(self, config: RerankerConfig) -> None:
        super().__init__()
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.self_attn = Attention(config)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.mlp = MLP(config)

    def forward(self, h: Tensor, cos: Tensor, sin: Tensor, key_mask: Tensor) -> Tensor:
        h = h + self.self_attn(self.input_layernorm(h), cos, sin, key_mask).float()
        return h + self.mlp(self.post_attention_layernorm(h)).float()


class Backbone(nn.Module):
    """Named `model` in the reranker so that parameter names match the checkpoint's keys."""

    def __init__(self, config: RerankerConfig) -> None:
        super().__init__()
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(config) for _ in range(config.num_hidden_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)


class Reranker(nn.Module):
    def __init__(self, config: RerankerConfig) -> None:
        super().__init__()
        self.config = config
        self.model = Backbone(config)
        self.score = nn.Linear(config.hidden_size, config.num_labels, bias=False)
        self.register_buffer(
            "inv_freq", rope_inv_freq(config.head_dim, config.rope_theta, config.rope_scaling), persistent=False
        )

    def hidden_states(self, input_ids: Tensor, lengths: Tensor) -> tuple[Tensor, Tensor]:
        """Final-norm hidden states `[B, S, D]` (weight dtype) and the padding mask `[B, S]` (bool)."""
        seqlen = input_ids.shape[1]
        mask = torch.arange(seqlen, device=input_ids.device)[None, :] < lengths[:, None]
        # Bidirectional: a query position may attend to every real key, before or after it. Padded query
        # rows attend to the real keys too, so no row is all-masked (no NaN); pooling ignores them.
        key_mask = mask[:, None, None, :]
        cos, sin = rope_cos_sin(self.inv_freq, seqlen)
        h = self.model.embed_tokens(input_ids).float()
        for layer in self.model.layers:
            h = layer(h, cos, sin, key_mask)
        return self.model.norm(h), mask

    def pool(self, hidden: Tensor, mask: Tensor, lengths: Tensor) -> Tensor:
        """One vector per sequence, fp32."""
        pooling = self.config.pooling
        if pooling == "avg":
            m = mask.unsqueeze(-1).float()
            return (hidden.float() * m).sum(1) / m.sum(1)
        if pooling == "cls":
            return hidden[:, 0].float()
        if pooling == "last":
            return hidden[torch.arange(hidden.shape[0], device=hidden.device), lengths - 1].float()
        raise ValueError(f"unknown pooling {pooling!r}")

    def forward(self, input_ids: Tensor, lengths: Tensor) -> Tensor:
        """Float32 logits `[B]` for right-padded `input_ids` `[B, S]` with `lengths` `[B]`."""
        hidden, mask = self.hidden_states(input_ids, lengths)
        pooled = self.pool(hidden, mask, lengths)
        logits = pooled @ self.score.weight.float().T
        return logits[:, 0] / self.config.temperature
