"""llama-nemotron-rerank-1b-v2: a bidirectional Llama-3.2 encoder, mean-pooled, with a one-logit head.

The single definition of the model. ONNX and TensorRT engines are exports of this module.

Inputs are right-padded token ids `[B, S]` plus each sequence's length `[B]`; positions are `0..len-1`.
Numerics: weights and matmuls run in the weight dtype (bf16 on GPU, fp32 on CPU); the residual stream,
RMSNorm, RoPE, softmax and pooling accumulate in fp32.

`Reranker.forward` is the reference (and what the ONNX export traces). The CUDA engine runs
`Reranker.forward_packed` instead: the same layers on packed tokens (no padding), with fused q|k|v and gate|up
projections, cached RoPE tables, a choice of attention kernel, and optional FP8 linears. Tests prove on CPU that
the two agree.
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Callable

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
        return self.head(self.pool(hidden, mask, lengths))

    def head(self, pooled: Tensor) -> Tensor:
        """Float32 logits `[N]` from pooled vectors `[N, D]`: the score row (fp32), over the temperature."""
        logits = pooled @ self.score.weight.float().T
        return logits[:, 0] / self.config.temperature

    # -- the packed fast path -------------------------------------------------------------------------------

    def rope_table(self, length: int) -> tuple[Tensor, Tensor]:
        """cos/sin `[>= length, head_dim]` fp32, computed once and kept (the same values `forward` computes)."""
        cached = self.__dict__.get("_rope_cache")
        if cached is None or cached[0].shape[0] < length or cached[0].device != self.inv_freq.device:
            cached = rope_cos_sin(self.inv_freq, max(length, self.config.max_length))
            self.__dict__["_rope_cache"] = cached
        return cached

    def prepare_fast_path(self, *, fp8: bool = False) -> None:
        """Fuse q|k|v and gate|up (the unfused weights become views: no extra memory), optionally add FP8 copies,
        and build the RoPE table. `forward` is unaffected."""
        self.__dict__["_fast"] = [FastPath(layer, fp8) for layer in self.model.layers]
        self.__dict__["fp8"] = fp8
        self.rope_table(self.config.max_length)

    def forward_packed(
        self, input_ids: Tensor, positions: Tensor, seq_ids: Tensor, cu_seqlens: Tensor, attend: Attend
    ) -> Tensor:
        """Float32 logits `[N]` for N sequences packed back to back.

        input_ids, positions (0..len-1 within each sequence), seq_ids (which sequence): `[T]`;
        cu_seqlens `[N + 1]` (sequence i is tokens cu[i]..cu[i+1]; an empty one gets a meaningless logit).
        Needs no host synchronisation (CUDA-graph capturable given a capturable `attend`).
        """
        fast = self.__dict__.get("_fast")
        if fast is None:
            self.prepare_fast_path()
            fast = self.__dict__["_fast"]
        cos_table, sin_table = self.rope_table(self.config.max_length)
        cos, sin = cos_table[positions][:, None, :], sin_table[positions][:, None, :]
        h = self.model.embed_tokens(input_ids).float()
        for layer, path in zip(self.model.layers, fast, strict=True):
            h = _layer_packed(layer, path, h, cos, sin, attend)
        hidden = _rms_norm(self.model.norm, h)
        return self.head(self.pool_packed(hidden, seq_ids, cu_seqlens))

    def pool_packed(self, hidden: Tensor, seq_ids: Tensor, cu_seqlens: Tensor) -> Tensor:
        """`pool` for packed hidden states `[T, D]`: one fp32 vector per sequence `[N, D]`."""
        pooling = self.config.pooling
        n_seqs = cu_seqlens.shape[0] - 1
        if pooling == "avg":
            sums = hidden.new_zeros((n_seqs, hidden.shape[-1]), dtype=torch.float32)
            sums.index_add_(0, seq_ids, hidden.float())
            lengths = (cu_seqlens[1:] - cu_seqlens[:-1]).clamp(min=1).float()
            return sums / lengths[:, None]
        last = hidden.shape[0] - 1
        if pooling == "cls":
            return hidden[cu_seqlens[:-1].clamp(max=last)].float()
        if pooling == "last":
            return hidden[(cu_seqlens[1:] - 1).clamp(min=0)].float()
        raise ValueError(f"unknown pooling {pooling!r}")


# --- Fast paths (CUDA engine). `Reranker.forward` above stays the reference and the ONNX export; nothing below
# changes it. The packed layout drops padding: tokens of all sequences back to back, `[T, ...]`.

Attend = Callable[[Tensor, Tensor, Tensor], Tensor]
"""Packed attention: q `[T, H, Dh]`, k/v `[T, Hkv, Dh]` → `[T, H, Dh]`, each token attending to its sequence."""

FP8_MAX = 448.0  # largest float8_e4m3fn value


def _varlen_attn_fn() -> Callable[..., Tensor] | None:
    try:
        from torch.nn.attention.varlen import varlen_attn
    except ImportError:  # PyTorch < 2.9
        return None
    return varlen_attn


def varlen_available() -> bool:
    return _varlen_attn_fn() is not None


def varlen_supports_gqa() -> bool:
    fn = _varlen_attn_fn()
    return fn is not None and "enable_gqa" in inspect.signature(fn).parameters


def varlen_attention(
    cu_seqlens: Tensor, max_seqlen: int, n_heads: int, n_kv_heads: int, gqa: bool | None = None
) -> Attend:
    """FlashAttention over packed sequences (CUDA, bf16/fp16): no padding computed, no mask.

    `max_seqlen` may exceed the longest sequence (a CUDA graph fixes it). `gqa`: whether the kernel takes
    `enable_gqa` (else the KV heads are copied); None asks PyTorch (pass it in under torch.compile).
    """
    fn = _varlen_attn_fn()
    if fn is None:
        raise RuntimeError("torch.nn.attention.varlen needs PyTorch >= 2.9")
    if gqa is None:
        gqa = varlen_supports_gqa()
    cu = cu_seqlens.to(torch.int32)
    repeats = n_heads // n_kv_heads

    def attend(q: Tensor, k: Tensor, v: Tensor) -> Tensor:
        v = v.contiguous()  # a view into the fused q|k|v output; q and k come out of RoPE contiguous
        if gqa:
            return fn(q, k, v, cu, cu, max_seqlen, max_seqlen, enable_gqa=True)
        k, v = k.repeat_interleave(repeats, dim=1), v.repeat_interleave(repeats, dim=1)
        return fn(q, k, v, cu, cu, max_seqlen, max_seqlen)

    return attend


def padded_attention(seq_ids: Tensor, positions: Tensor, lengths: Tensor, max_seqlen: int, *, gqa: bool) -> Attend:
    """Packed attention through SDPA on a padded copy of q/k/v (any device): only attention sees padding.

    With every sequence the same length no mask is passed, so CUDA can take the flash kernel. `gqa=True` uses
    SDPA's `enable_gqa` instead of copying the KV heads (PyTorch >= 2.5).
    """
    n_seqs = lengths.shape[0]
    uniform = bool((lengths == max_seqlen).all()) if n_seqs else True
    key_mask = None
    if not uniform:
        key_mask = (torch.arange(max_seqlen, device=lengths.device)[None, :] < lengths[:, None])[:, None, None, :]

    def scatter(x: Tensor) -> Tensor:
        out = x.new_zeros((n_seqs, max_seqlen, *x.shape[1:]))
        out[seq_ids, positions] = x
        return out.transpose(1, 2)  # [B, H, S, Dh]

    def attend(q: Tensor, k: Tensor, v: Tensor) -> Tensor:
        qp, kp, vp = scatter(q), scatter(k), scatter(v)
        if gqa:
            y = F.scaled_dot_product_attention(qp, kp, vp, attn_mask=key_mask, enable_gqa=True)
        else:
            repeats = qp.shape[1] // kp.shape[1]
            kp, vp = kp.repeat_interleave(repeats, dim=1), vp.repeat_interleave(repeats, dim=1)
            y = F.scaled_dot_product_attention(qp, kp, vp, attn_mask=key_mask)
        return y.transpose(1, 2)[seq_ids, positions]

    return attend


class Fp8Linear(nn.Module):
    """`y = x @ W.T` with W in float8_e4m3 (one scale per output row) and x quantized per row on the fly.

    Uses `torch._scaled_mm` with row-wise scales (Hopper/Ada GPUs; PyTorch's CPU kernel too, slowly, which the
    tests use). Output in `out_dtype` (bf16).
    """

    def __init__(self, weight: Tensor, out_dtype: torch.dtype = torch.bfloat16) -> None:
        super().__init__()
        w = weight.detach().float()
        scale = (w.abs().amax(dim=1, keepdim=True) / FP8_MAX).clamp(min=1e-12)  # [N, 1]
        self.register_buffer("weight_fp8", (w / scale).to(torch.float8_e4m3fn))  # [N, K]
        self.register_buffer("weight_scale", scale.T.contiguous())  # [1, N]
        self.out_dtype = out_dtype

    @staticmethod
    def quantize_rows(x: Tensor) -> tuple[Tensor, Tensor]:
        """float8 rows and their fp32 scales `[M, 1]`."""
        x32 = x.float()
        scale = (x32.abs().amax(dim=1, keepdim=True) / FP8_MAX).clamp(min=1e-12)
        return (x32 / scale).to(torch.float8_e4m3fn), scale

    def forward(self, x: Tensor) -> Tensor:
        lead, k = x.shape[:-1], x.shape[-1]
        x2 = x.reshape(-1, k)
        rows = x2.shape[0]
        pad = -rows % 16  # _scaled_mm wants every dimension a multiple of 16
        if pad:
            x2 = F.pad(x2, (0, 0, 0, pad))
        xq, xs = self.quantize_rows(x2)
        y = torch._scaled_mm(xq, self.weight_fp8.t(), scale_a=xs, scale_b=self.weight_scale, out_dtype=self.out_dtype)
        return y[:rows].reshape(*lead, -1)


def _linear(weight: Tensor) -> nn.Linear:
    with torch.device("meta"):
        lin = nn.Linear(weight.shape[1], weight.shape[0], bias=False)
    lin.weight = nn.Parameter(weight, requires_grad=False)
    return lin


def _fuse_rows(*linears: nn.Linear) -> nn.Linear:
    """One Linear whose weight stacks the given ones' rows; the originals become views of it (no second copy)."""
    fused = torch.cat([lin.weight.detach() for lin in linears], dim=0)
    start = 0
    for lin in linears:
        rows = lin.weight.shape[0]
        lin.weight = nn.Parameter(fused[start : start + rows], requires_grad=False)
        start += rows
    return _linear(fused)


class FastPath:
    """The packed forward's linears for one layer: fused q|k|v and gate|up, optionally FP8. Not submodules of
    the Reranker (its state dict and `forward` are unchanged)."""

    def __init__(self, layer: DecoderLayer, fp8: bool) -> None:
        attn, mlp = layer.self_attn, layer.mlp
        qkv = _fuse_rows(attn.q_proj, attn.k_proj, attn.v_proj)
        gate_up = _fuse_rows(mlp.gate_proj, mlp.up_proj)
        self.splits = (attn.q_proj.weight.shape[0], attn.k_proj.weight.shape[0], attn.v_proj.weight.shape[0])
        self.intermediate = mlp.gate_proj.weight.shape[0]
        out_dtype = attn.o_proj.weight.dtype
        lin: Callable[[nn.Linear], nn.Module] = (lambda m: Fp8Linear(m.weight, out_dtype)) if fp8 else (lambda m: m)
        self.qkv = lin(qkv)
        self.o = lin(attn.o_proj)
        self.gate_up = lin(gate_up)
        self.down = lin(mlp.down_proj)


def _rms_norm(norm: RMSNorm, x: Tensor) -> Tensor:
    """`RMSNorm.forward` through `F.rms_norm` (one fused kernel where PyTorch has one): fp32 in, weight dtype out."""
    return norm.weight * F.rms_norm(x.float(), (x.shape[-1],), eps=norm.eps).to(norm.weight.dtype)


def _layer_packed(layer: DecoderLayer, fast: FastPath, h: Tensor, cos: Tensor, sin: Tensor, attend: Attend) -> Tensor:
    """One decoder layer on packed tokens `h` `[T, D]` (fp32 residual stream)."""
    attn = layer.self_attn
    tokens = h.shape[0]
    q, k, v = fast.qkv(_rms_norm(layer.input_layernorm, h)).split(fast.splits, dim=-1)
    q = apply_rope(q.view(tokens, attn.n_heads, attn.head_dim), cos, sin)
    k = apply_rope(k.view(tokens, attn.n_kv_heads, attn.head_dim), cos, sin)
    v = v.view(tokens, attn.n_kv_heads, attn.head_dim)
    h = h + fast.o(attend(q, k, v).reshape(tokens, -1)).float()
    gate, up = fast.gate_up(_rms_norm(layer.post_attention_layernorm, h)).split(fast.intermediate, dim=-1)
    return h + fast.down(F.silu(gate) * up).float()
