"""The PyTorch engine: `rankserve.model.llama.Reranker` on CPU (padded, fp32) or CUDA (packed, bf16).

On CUDA a batch is packed (padding dropped, `packing.pack`) and run through `Reranker.forward_packed`:
fused q|k|v and gate|up GEMMs, cached RoPE tables, FlashAttention over the packed sequences
(`torch.nn.attention.varlen`, PyTorch >= 2.9; else SDPA on a padded copy of q/k/v, with `enable_gqa`), one
pinned host buffer and one asynchronous copy per batch. Options (`TorchOptions`: the `torch_*` settings, or
`RANKSERVE_TORCH_*` environment variables when the engine is built directly; docs/gpu.md): CUDA graphs for
small batches captured at warm-up, `torch.compile`, FP8 GEMMs (Hopper/Ada). On CPU the padded reference
`Reranker.forward` runs, unchanged.
"""

from __future__ import annotations

import logging

import numpy as np
import torch

from rankserve.engines.base import EngineInfo, EngineOutOfMemory
from rankserve.engines.cuda_graphs import GraphRunner
from rankserve.engines.packing import Packed, pack
from rankserve.engines.torch_options import CUDA_BATCH_TOKENS, TorchOptions

__all__ = ["TorchEngine", "TorchOptions", "fp8_supported", "pick_device", "pick_dtype"]
from rankserve.model.checkpoint import Checkpoint, load_model
from rankserve.model.llama import (
    Attend,
    Reranker,
    padded_attention,
    varlen_attention,
    varlen_available,
    varlen_supports_gqa,
)

log = logging.getLogger(__name__)

# Measured with scripts/bench_engine.py (docs/benchmarks.md): on CPU, tokens/s peaks at 1-2 k padded tokens per
# batch and falls slowly beyond. The CUDA value (CUDA_BATCH_TOKENS, torch_options.py) is not measured yet.
CPU_BATCH_TOKENS = 2048

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
# scaled_dot_product_attention(enable_gqa=...) since PyTorch 2.5
SDPA_GQA = tuple(int(x) for x in torch.__version__.split(".")[:2]) >= (2, 5)


def pick_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise RuntimeError(f"--device {device} asked for, but PyTorch sees no CUDA GPU")
    return dev


def pick_dtype(dtype: str, device: torch.device) -> torch.dtype:
    if dtype == "auto":
        # bf16 is the checkpoint's precision and fast on GPUs; CPUs without AMX run fp32 faster.
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    if dtype not in DTYPES:
        raise ValueError(f"dtype must be auto or one of {sorted(DTYPES)}, got {dtype!r}")
    return DTYPES[dtype]


def fp8_supported(device: torch.device) -> bool:
    """FP8 tensor cores: compute capability 8.9 (Ada) or 9.0+ (Hopper)."""
    return device.type == "cuda" and torch.cuda.get_device_capability(device) >= (8, 9)


class TorchEngine:
    def __init__(
        self,
        model: Reranker,
        device: torch.device,
        max_length: int,
        pad_token_id: int,
        options: TorchOptions | None = None,
    ) -> None:
        self.model = model
        self.device = device
        self.options = options or TorchOptions()
        dtype = next(model.parameters()).dtype
        self.packed = self.options.packed == "on" or (self.options.packed == "auto" and device.type == "cuda")
        self.attention = self._pick_attention(dtype)
        if self.options.fp8 and not fp8_supported(device):
            raise RuntimeError("FP8 GEMMs need an Ada or Hopper GPU (compute capability >= 8.9)")
        precision = str(dtype).removeprefix("torch.") + ("+fp8" if self.options.fp8 else "")
        self.info = EngineInfo(
            backend="torch",
            device=str(device),
            precision=precision,
            max_length=max_length,
            pad_token_id=pad_token_id,
            preferred_batch_tokens=CPU_BATCH_TOKENS if device.type == "cpu" else CUDA_BATCH_TOKENS,
        )
        self._gqa = varlen_supports_gqa() if self.attention == "varlen" else False
        self._host: torch.Tensor | None = None  # pinned staging buffer for the packed inputs, grown on demand
        self._forward = self._forward_packed
        self.graphs: GraphRunner | None = None
        if self.packed:
            model.prepare_fast_path(fp8=self.options.fp8)
            if self.options.compile:
                self._forward = torch.compile(self._forward_packed, dynamic=True)

    @classmethod
    def from_checkpoint(
        cls,
        ckpt: Checkpoint,
        *,
        device: str = "auto",
        dtype: str = "auto",
        max_length: int | None = None,
        options: TorchOptions | None = None,
    ) -> TorchEngine:
        dev = pick_device(device)
        model = load_model(ckpt, device=dev, dtype=pick_dtype(dtype, dev))
        limit = min(max_length or ckpt.config.max_length, ckpt.config.max_length)
        opts = options if options is not None else TorchOptions.from_env()
        return cls(model, dev, limit, ckpt.config.pad_token_id, opts)

    def _pick_attention(self, dtype: torch.dtype) -> str:
        choice = self.options.attention
        flash_ok = self.device.type == "cuda" and dtype in (torch.bfloat16, torch.float16) and varlen_available()
        if choice == "varlen" and not flash_ok:
            raise RuntimeError("varlen attention needs CUDA, bf16/fp16 and PyTorch >= 2.9")
        if choice == "auto":
            return "varlen" if flash_ok else "sdpa"
        return choice

    # -- scoring ------------------------------------------------------------------------------------------

    @torch.inference_mode()
    def score(self, input_ids: np.ndarray, lengths: np.ndarray) -> np.ndarray:
        try:
            if self.packed:
                return self._score_packed(pack(input_ids, lengths))
            ids = torch.from_numpy(np.ascontiguousarray(input_ids, dtype=np.int64)).to(self.device, non_blocking=True)
            lens = torch.from_numpy(np.ascontiguousarray(lengths, dtype=np.int64)).to(self.device, non_blocking=True)
            return self.model(ids, lens).float().cpu().numpy()
        except torch.cuda.OutOfMemoryError as e:  # raised for any CUDA device; CPU allocation failures differ
            if self.device.type == "cuda":
                torch.cuda.empty_cache()  # give back what the failed batch held before a smaller one runs
            raise EngineOutOfMemory(f"{self.device} out of memory on a batch of {input_ids.shape}") from e

    def _score_packed(self, p: Packed) -> np.ndarray:
        logits = self.graphs.run(p) if self.graphs is not None else None
        if logits is None:
            t = self._to_device(p)
            logits = self._forward(*t, p.max_seqlen)[: p.n_real]
        return logits.float().cpu().numpy()

    def _to_device(self, p: Packed) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """One copy from a reused pinned buffer. Safe to reuse: each batch synchronises on its logits, which
        the stream orders after this copy."""
        flat = p.host_buffer()
        if self._host is None or self._host.numel() < flat.size:
            self._host = torch.empty(max(flat.size, 1 << 16), dtype=torch.int64, pin_memory=self.device.type == "cuda")
        self._host.numpy()[: flat.size] = flat
        dev = self._host[: flat.size].to(self.device, non_blocking=True)
        t = p.tokens
        return dev[:t], dev[t : 2 * t], dev[2 * t : 3 * t], dev[3 * t :]

    def attend_fn(
        self, positions: torch.Tensor, seq_ids: torch.Tensor, cu_seqlens: torch.Tensor, max_seqlen: int
    ) -> Attend:
        cfg = self.model.config
        if self.attention == "varlen":
            return varlen_attention(cu_seqlens, max_seqlen, cfg.num_attention_heads, cfg.num_key_value_heads, self._gqa)
        gqa = self.device.type == "cuda" and SDPA_GQA  # no copies of the KV heads
        return padded_attention(seq_ids, positions, cu_seqlens[1:] - cu_seqlens[:-1], max_seqlen, gqa=gqa)

    def _forward_packed(
        self,
        input_ids: torch.Tensor,
        positions: torch.Tensor,
        seq_ids: torch.Tensor,
        cu_seqlens: torch.Tensor,
        max_seqlen: int,
    ) -> torch.Tensor:
        attend = self.attend_fn(positions, seq_ids, cu_seqlens, max_seqlen)
        return self.model.forward_packed(input_ids, positions, seq_ids, cu_seqlens, attend)

    # -- start-up -----------------------------------------------------------------------------------------

    def warmup(self) -> None:
        if self.packed and self.attention == "varlen" and self.options.attention == "auto":
            self.check_varlen()
        shapes = [(1, 8), (4, 64)]
        if self.device.type == "cuda":
            shapes += [
                (8, 512),
                (max(1, CUDA_BATCH_TOKENS // 512), 512),
                (2, 2048),
                (1, min(8192, self.info.max_length)),
            ]
        rng = np.random.default_rng(0)
        for batch, seqlen in shapes:
            seqlen = min(seqlen, self.info.max_length)
            ids = rng.integers(0, 128000, (batch, seqlen), dtype=np.int64)
            # Mixed lengths too, so that masked and packed kernels are loaded (and compiled) before traffic.
            self.score(ids, np.full(batch, seqlen, dtype=np.int64))
            self.score(ids, np.maximum(1, rng.integers(seqlen // 2, seqlen + 1, batch)))
        if self.packed and self.options.cuda_graphs and self.graphs is None:
            try:
                self.capture_graphs()
            except Exception:  # same logits without graphs: serve eagerly rather than not at all
                log.exception("CUDA graph capture failed; running every batch eagerly")
                self.graphs = None

    @torch.inference_mode()
    def check_varlen(self) -> bool:
        """Chosen automatically, the varlen kernel must agree with SDPA on a small mixed batch; if it fails or
        disagrees (an untried PyTorch build), the engine uses SDPA and says so. Returns whether varlen stays."""
        rng = np.random.default_rng(1)
        lengths = np.array([37, 5, 64, 1], dtype=np.int64)
        ids = rng.integers(0, 128000, (len(lengths), int(lengths.max())), dtype=np.int64)
        p = pack(ids, lengths)
        try:
            t = self._to_device(p)
            got = self._forward_packed(*t, p.max_seqlen)
            self.attention = "sdpa"
            want = self._forward_packed(*t, p.max_seqlen)
            diff = float((got.float() - want.float()).abs().max())
            tol = 0.05 * max(1.0, float(want.float().abs().max()))
            if not diff <= tol:
                raise RuntimeError(f"varlen and SDPA logits differ by {diff:.4g} (> {tol:.3g})")
        except Exception as e:
            log.warning("varlen attention unusable here (%s); using SDPA on padded copies instead", e)
            self.attention = "sdpa"
            return False
        self.attention = "varlen"
        return True

    def capture_graphs(self) -> None:
        if not self.packed:
            raise RuntimeError("CUDA graphs run the packed path (RANKSERVE_TORCH_PACKED is off)")
        if self.device.type == "cuda" and self.attention != "varlen":
            raise RuntimeError("CUDA graphs need the varlen attention kernel (SDPA on a padded copy syncs)")
        o = self.options
        runner = GraphRunner(
            self._forward,
            self.device,
            max_tokens=o.graph_max_tokens,
            step=o.graph_step,
            max_batch=o.graph_max_batch,
            max_length=self.info.max_length,
            pad_token_id=self.info.pad_token_id,
            use_graphs=self.device.type == "cuda",
        )
        with torch.inference_mode():
            runner.capture()
        self.graphs = runner
