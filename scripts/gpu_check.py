#!/usr/bin/env python3
"""The GPU check: correctness and speed of the PyTorch CUDA engine, each against its baseline in the same run.

    python scripts/gpu_check.py --output DIR            # on a GPU (scripts/gpu_check.sh installs and calls this)
    python scripts/gpu_check.py --output DIR --dry-run  # on a CPU: tiny checkpoint, tiny sizes, every code path

Stages, in order; each records its numbers or its error and the next one runs regardless, and a stage that
would not fit the time left is skipped and said so (`--budget`, default 420 s; gpu_check.sh passes 360, so the
whole check stays under 8 minutes with the install and the GPU unit tests):

1. environment: GPU, driver, PyTorch; the measured bf16 matmul rate (8192³), the yardstick of MFU.
2. checkpoints: the tiny one (parity) and the full-size one with random weights, drawn on the GPU.
3. parity (tiny): CPU fp32 reference engine vs each GPU variant (packed varlen, SDPA, CUDA graphs, FP8) and vs
   the Hugging Face eager baseline: max |Δlogit|.
4. engine (full): pairs/s, tokens/s and MFU at 128/512/2048-token pairs for the eager baseline (transformers'
   LlamaModel made bidirectional, SDPA, padded bf16 batch), our padded forward and our packed engine; a batch
   token-budget sweep at 512.
5. mixed (full): the RAG mix (scripts/bench_workload.py `rag`): the baseline runs one padded forward per
   request; the packed engine runs batches of <= budget real tokens in arrival order.
6. fp8 (full, Hopper/Ada): speed at 512 and accuracy against bf16 and fp32: max/mean |Δlogit|, Spearman rank
   correlation and top-10 agreement over 100-passage requests.
7. graphs / compile (full): the latency of a small request with CUDA graphs, and torch.compile's speed.
8. latency (full): one request of 1 query × 100 passages of ~256 tokens: engine alone and eager baseline.
9. http (full): `rankserve serve` in a subprocess: p50/p99 of the 1 × 100 × 256 request, then closed-loop
   throughput at 8 and 32 clients on the RAG mix; engine-alone rate from /v1/metrics; ratio to the baseline.

Writes gpu_check.json and gpu_check.md to --output; prints the short table last.
FLOPs per pair of S tokens: 2·(linear parameters)·S + 4·layers·hidden·S² (docs: shared spec performance.md).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import datetime as dt
import gc
import json
import os
import platform
import statistics
import subprocess
import sys
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "scripts"))

from gpu_baseline import HFEager  # noqa: E402
from rankserve.engines.torch_engine import TorchEngine, TorchOptions, fp8_supported  # noqa: E402
from rankserve.model.checkpoint import open_checkpoint  # noqa: E402
from rankserve.model.config import RerankerConfig  # noqa: E402
from rankserve.model.synthetic import write_checkpoint  # noqa: E402

BF16_PEAK_TFLOPS = {"H100": 989.0, "H200": 989.0, "A100": 312.0, "L40S": 362.0}


# -- small helpers ------------------------------------------------------------------------------------------------


def flops_per_pair(cfg: RerankerConfig, seqlen: int) -> float:
    d, q, kv = cfg.hidden_size, cfg.num_attention_heads * cfg.head_dim, cfg.num_key_value_heads * cfg.head_dim
    linear = cfg.num_hidden_layers * (d * (q + 2 * kv) + q * d + 3 * d * cfg.intermediate_size) + d
    return 2.0 * linear * seqlen + 4.0 * cfg.num_hidden_layers * d * seqlen * seqlen


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_calls(fn: Callable[[], Any], device: torch.device, *, min_reps: int, min_seconds: float) -> list[float]:
    """Seconds per call (host clock after a device sync: the engines return host arrays, so they sync anyway)."""
    fn()  # warm-up: kernels loaded, allocator grown
    sync(device)
    times: list[float] = []
    start = time.perf_counter()
    while len(times) < min_reps or time.perf_counter() - start < min_seconds:
        t0 = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - t0)
        if len(times) >= 200:
            break
    return times


def random_batch(rng: np.random.Generator, lengths: list[int] | np.ndarray, pad: int) -> tuple[np.ndarray, np.ndarray]:
    lengths = np.asarray(lengths, dtype=np.int64)
    ids = np.full((len(lengths), int(lengths.max())), pad, dtype=np.int64)
    for i, n in enumerate(lengths):
        ids[i, :n] = rng.integers(1000, 120000, n)
    return ids, lengths


def free_device_memory() -> None:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def spearman(a: np.ndarray, b: np.ndarray) -> float:
    ra, rb = np.argsort(np.argsort(a)), np.argsort(np.argsort(b))
    return float(np.corrcoef(ra, rb)[0, 1])


@dataclass
class Check:
    args: argparse.Namespace
    device: torch.device
    started: float = field(default_factory=time.monotonic)
    results: dict[str, Any] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    full_dir: Path | None = None
    tiny_dir: Path | None = None
    matmul_tflops: float | None = None
    peak_tflops: float | None = None
    workload: Any = None

    @property
    def left(self) -> float:
        return self.args.budget - (time.monotonic() - self.started)

    def options(self, **kw: Any) -> TorchOptions:
        """Packed on CPU too in a dry run, so the same code paths run."""
        if self.device.type == "cpu":
            kw.setdefault("packed", "on")
        return TorchOptions(**kw)

    def engine(self, ckpt_dir: Path, *, dtype: str = "auto", **kw: Any) -> TorchEngine:
        opts = kw.pop("options", None) or self.options(**kw)
        return TorchEngine.from_checkpoint(
            open_checkpoint(str(ckpt_dir)), device=str(self.device), dtype=dtype, options=opts
        )

    def stage(self, name: str, fn: Callable[[], dict[str, Any] | None], need_seconds: float = 0.0) -> None:
        if self.left < need_seconds:
            self.results[name] = {"skipped": f"{self.left:.0f}s left, needs about {need_seconds:.0f}s"}
            print(f"[{name}] skipped: {self.results[name]['skipped']}", flush=True)
            return
        print(f"[{name}] ... ({self.left:.0f}s left)", flush=True)
        t0 = time.monotonic()
        try:
            out = fn() or {}
        except Exception as e:
            out = {"error": f"{type(e).__name__}: {e}", "traceback": traceback.format_exc(limit=8)}
            print(out["traceback"], file=sys.stderr, flush=True)
        out["seconds"] = round(time.monotonic() - t0, 1)
        self.results[name] = out
        free_device_memory()
        print(
            f"[{name}] done in {out['seconds']}s" + (f" — ERROR {out['error']}" if "error" in out else ""), flush=True
        )

    def rate(self, cfg: RerankerConfig, seqlen: int, pairs_per_s: float) -> dict[str, Any]:
        flops = flops_per_pair(cfg, seqlen) * pairs_per_s
        out = {
            "pairs_s": round(pairs_per_s, 1),
            "tokens_s": round(pairs_per_s * seqlen),
            "tflops": round(flops / 1e12, 1),
        }
        if self.peak_tflops:
            out["mfu_peak"] = round(flops / 1e12 / self.peak_tflops, 3)
        if self.matmul_tflops:
            out["mfu_measured"] = round(flops / 1e12 / self.matmul_tflops, 3)
        return out


# -- stages -------------------------------------------------------------------------------------------------------


def stage_environment(c: Check) -> dict[str, Any]:
    out: dict[str, Any] = {
        "date_utc": dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "device": str(c.device),
        "dry_run": c.args.dry_run,
    }
    with contextlib.suppress(Exception):
        import transformers

        out["transformers"] = transformers.__version__
    if c.device.type == "cuda":
        props = torch.cuda.get_device_properties(c.device)
        out |= {
            "gpu": props.name,
            "sms": props.multi_processor_count,
            "memory_gib": round(props.total_memory / 2**30, 1),
            "capability": ".".join(map(str, torch.cuda.get_device_capability(c.device))),
            "cuda": torch.version.cuda,
        }
        with contextlib.suppress(Exception):
            out["driver"] = subprocess.run(
                ["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                capture_output=True,
                text=True,
                timeout=20,
            ).stdout.strip()
        c.peak_tflops = next((v for k, v in BF16_PEAK_TFLOPS.items() if k in props.name), None)
    n = 8192 if c.device.type == "cuda" else 512
    dtype = torch.bfloat16 if c.device.type == "cuda" else torch.float32
    a = torch.randn(n, n, device=c.device, dtype=dtype)
    b = torch.randn(n, n, device=c.device, dtype=dtype)
    times = time_calls(lambda: a @ b, c.device, min_reps=10, min_seconds=0.5)
    c.matmul_tflops = 2 * n**3 / statistics.median(times) / 1e12
    out["matmul"] = {"n": n, "dtype": str(dtype), "tflops_median": round(c.matmul_tflops, 1)}
    out["bf16_peak_tflops"] = c.peak_tflops
    return out


def stage_checkpoints(c: Check) -> dict[str, Any]:
    root = Path(c.args.workdir)
    c.tiny_dir = root / "tiny"
    if not (c.tiny_dir / "config.json").is_file():
        write_checkpoint(c.tiny_dir, "tiny", seed=0)
    size = "tiny" if c.args.dry_run else "full"
    c.full_dir = root / size
    t0 = time.monotonic()
    if not (c.full_dir / "config.json").is_file():
        write_checkpoint(c.full_dir, size, seed=0, device="cuda" if c.device.type == "cuda" else "cpu")
    cfg = open_checkpoint(str(c.full_dir)).config
    return {
        "full": str(c.full_dir),
        "size": size,
        "write_seconds": round(time.monotonic() - t0, 1),
        "layers": cfg.num_hidden_layers,
        "hidden": cfg.hidden_size,
    }


def stage_parity(c: Check) -> dict[str, Any]:
    assert c.tiny_dir is not None
    rng = np.random.default_rng(1)
    batches = [random_batch(rng, lens, 128001) for lens in ([7], [300, 20, 77, 5], [128] * 8, [1, 2, 3], [900, 31])]
    reference = TorchEngine.from_checkpoint(
        open_checkpoint(str(c.tiny_dir)), device="cpu", dtype="float32", options=TorchOptions(packed="off")
    )
    want = [reference.score(ids, lens) for ids, lens in batches]
    scale = max(float(np.abs(w).max()) for w in want)
    variants: dict[str, Callable[[], Any]] = {
        "packed (default)": lambda: c.engine(c.tiny_dir),
        "packed sdpa": lambda: c.engine(c.tiny_dir, attention="sdpa"),
        "padded forward": lambda: c.engine(c.tiny_dir, options=TorchOptions(packed="off")),
        "cuda graphs": lambda: c.engine(c.tiny_dir, cuda_graphs=True, graph_max_tokens=1024),
    }
    if fp8_supported(c.device):
        variants["fp8"] = lambda: c.engine(c.tiny_dir, fp8=True)
    out: dict[str, Any] = {"reference": "the CPU fp32 engine (padded forward)", "max_abs_logit": round(scale, 3)}
    tol = 0.03 * max(1.0, scale)
    for name, make in variants.items():
        try:
            engine = make()
            engine.warmup()
            got = [engine.score(ids, lens) for ids, lens in batches]
            diff = max(float(np.abs(g - w).max()) for g, w in zip(got, want, strict=True))
            limit = tol * (4 if name == "fp8" else 1)
            out[name] = {"max_abs_diff": round(diff, 5), "ok": bool(diff <= limit), "precision": engine.info.precision}
        except Exception as e:
            out[name] = {"error": f"{type(e).__name__}: {e}"}
    try:
        hf = HFEager(c.tiny_dir, c.device)
        diff = max(float(np.abs(hf.score(ids, lens) - w).max()) for (ids, lens), w in zip(batches, want, strict=True))
        out["hf eager baseline"] = {"max_abs_diff": round(diff, 5), "ok": bool(diff <= tol)}
    except Exception as e:
        out["hf eager baseline"] = {"error": f"{type(e).__name__}: {e}"}
    out["tolerance"] = round(tol, 4)
    return out


def _uniform(
    c: Check,
    name: str,
    score: Callable[[np.ndarray, np.ndarray], Any],
    cfg: RerankerConfig,
    lengths: list[int],
    budget: int,
) -> dict[str, Any]:
    rng = np.random.default_rng(2)
    out = {}
    for seqlen in lengths:
        batch = max(1, budget // seqlen)
        ids, lens = random_batch(rng, [seqlen] * batch, cfg.pad_token_id)
        times = time_calls(
            lambda ids=ids, lens=lens: score(ids, lens), c.device, min_reps=3, min_seconds=c.args.seconds
        )
        out[str(seqlen)] = {"batch": batch, **c.rate(cfg, seqlen, batch / statistics.median(times))}
        print(f"  {name:>16} {seqlen:>5} tokens × {batch:>3}: {out[str(seqlen)]}", flush=True)
    return out


def stage_engine(c: Check) -> dict[str, Any]:
    assert c.full_dir is not None
    cfg = open_checkpoint(str(c.full_dir)).config
    lengths, budget = c.args.lengths, c.args.budget_tokens
    out: dict[str, Any] = {"budget_tokens": budget}
    hf = HFEager(c.full_dir, c.device)
    out["hf eager"] = _uniform(c, "hf eager", hf.score, cfg, lengths, budget)
    del hf
    free_device_memory()
    padded = c.engine(c.full_dir, options=TorchOptions(packed="off"))
    out["rankserve padded"] = _uniform(c, "padded", padded.score, cfg, lengths, budget)
    del padded
    free_device_memory()
    packed = c.engine(c.full_dir)
    packed.warmup()
    out["rankserve packed"] = _uniform(c, "packed", packed.score, cfg, lengths, budget)
    out["attention"] = packed.attention
    sweep_len = 512 if 512 in lengths else lengths[len(lengths) // 2]
    out["budget sweep"] = {
        str(b): _uniform(c, f"budget {b}", packed.score, cfg, [sweep_len], b)[str(sweep_len)] for b in c.args.sweep
    }
    return out


def _arrival_batches(pair_tokens: list[list[int]], budget: int, max_batch: int) -> list[list[int]]:
    """Sequence lengths in arrival order, cut into batches of <= budget real tokens (what packing needs)."""
    batches: list[list[int]] = [[]]
    for req in pair_tokens:
        for n in req:
            cur = batches[-1]
            if cur and (sum(cur) + n > budget or len(cur) >= max_batch):
                batches.append([])
            batches[-1].append(n)
    return [b for b in batches if b]


def stage_mixed(c: Check) -> dict[str, Any]:
    import bench_workload

    assert c.full_dir is not None
    cfg = open_checkpoint(str(c.full_dir)).config
    profile = bench_workload.PROFILES[c.args.profile]
    c.workload = wl = bench_workload.build(profile, c.args.requests, 0, str(c.full_dir / "tokenizer.json"))
    rng = np.random.default_rng(3)
    requests = [random_batch(rng, [min(n, cfg.max_length) for n in req], cfg.pad_token_id) for req in wl.pair_tokens]
    passages = sum(len(r[1]) for r in requests)
    real = sum(int(r[1].sum()) for r in requests)
    out: dict[str, Any] = {
        "workload": wl.stats["description"],
        "requests": len(requests),
        "passages": passages,
        "real_tokens": real,
    }
    hf = HFEager(c.full_dir, c.device)
    hf.score(*requests[0])
    sync(c.device)
    t0 = time.perf_counter()
    for ids, lens in requests:
        hf.score(ids, lens)
    sync(c.device)
    t = time.perf_counter() - t0
    padded = sum(r[0].size for r in requests)
    out["hf eager"] = {
        "passages_s": round(passages / t, 1),
        "tokens_s": round(real / t),
        "padding_eff": round(real / padded, 3),
    }
    del hf
    free_device_memory()
    engine = c.engine(c.full_dir)
    engine.warmup()
    flat = [n for ids, lens in requests for n in lens.tolist()]
    batches = [random_batch(rng, b, cfg.pad_token_id) for b in _arrival_batches([flat], c.args.budget_tokens, 64)]
    engine.score(*batches[0])
    t0 = time.perf_counter()
    for ids, lens in batches:
        engine.score(ids, lens)
    t = time.perf_counter() - t0
    out["rankserve packed"] = {
        "passages_s": round(passages / t, 1),
        "tokens_s": round(real / t),
        "padding_eff": 1.0,
        "batches": len(batches),
    }
    out["speedup"] = round(out["rankserve packed"]["passages_s"] / out["hf eager"]["passages_s"], 2)
    return out


def stage_fp8(c: Check) -> dict[str, Any]:
    assert c.full_dir is not None
    if not fp8_supported(c.device):
        return {"skipped": "FP8 needs an Ada or Hopper GPU"}
    cfg = open_checkpoint(str(c.full_dir)).config
    rng = np.random.default_rng(4)
    requests = [random_batch(rng, rng.integers(64, 512, 100), cfg.pad_token_id) for _ in range(c.args.fp8_requests)]
    logits: dict[str, list[np.ndarray]] = {}
    out: dict[str, Any] = {}
    for name, kw in (
        ("fp32", {"dtype": "float32", "options": TorchOptions(packed="off")}),
        ("bf16", {}),
        ("fp8", {"fp8": True}),
    ):
        engine = c.engine(c.full_dir, **kw)
        logits[name] = [engine.score(ids, lens) for ids, lens in requests]
        if name != "fp32":
            engine.warmup()
            out[f"{name} speed"] = _uniform(c, name, engine.score, cfg, [512], c.args.budget_tokens)["512"]
        del engine
        free_device_memory()
    for name in ("bf16", "fp8"):
        diffs = np.concatenate([np.abs(a - b) for a, b in zip(logits[name], logits["fp32"], strict=True)])
        rho = [spearman(a, b) for a, b in zip(logits[name], logits["fp32"], strict=True)]
        top10 = [
            len(set(np.argsort(-a)[:10]) & set(np.argsort(-b)[:10])) / 10
            for a, b in zip(logits[name], logits["fp32"], strict=True)
        ]
        out[f"{name} vs fp32"] = {
            "max_abs": round(float(diffs.max()), 4),
            "mean_abs": round(float(diffs.mean()), 4),
            "spearman_mean": round(float(np.mean(rho)), 5),
            "top10_agreement": round(float(np.mean(top10)), 3),
        }
    if c.args.compile and c.left > 120:
        try:
            engine = c.engine(c.full_dir, fp8=True, compile=True)
            engine.warmup()
            out["fp8+compile speed"] = _uniform(c, "fp8+compile", engine.score, cfg, [512], c.args.budget_tokens)["512"]
            del engine
        except Exception as e:
            out["fp8+compile speed"] = {"error": f"{type(e).__name__}: {e}"}
        free_device_memory()
    scale = float(np.abs(np.concatenate(logits["fp32"])).mean())
    out["mean_abs_logit_fp32"] = round(scale, 3)
    out["fp8 / bf16 speed"] = round(out["fp8 speed"]["pairs_s"] / out["bf16 speed"]["pairs_s"], 2)
    return out


def _latency_batch(c: Check, cfg: RerankerConfig) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(5)
    n = 100 if not c.args.dry_run else 20
    return random_batch(
        rng, rng.integers(240, 273, n) if not c.args.dry_run else rng.integers(24, 33, n), cfg.pad_token_id
    )


def stage_graphs(c: Check) -> dict[str, Any]:
    """Small batches, where launch overhead shows: eager packed vs CUDA graphs vs torch.compile."""
    assert c.full_dir is not None
    cfg = open_checkpoint(str(c.full_dir)).config
    rng = np.random.default_rng(6)
    small = [random_batch(rng, lens, cfg.pad_token_id) for lens in ([200], [64, 300, 128], [512, 512, 100, 900])]
    out: dict[str, Any] = {"batches": [b[1].tolist() for b in small]}
    variants = [("eager", {}), ("cuda graphs", {"cuda_graphs": True})]
    if c.args.compile:
        variants.append(("torch.compile", {"compile": True}))
    base: list[np.ndarray] | None = None
    for name, kw in variants:
        if name == "torch.compile" and c.left < 200:
            out[name] = {"skipped": "too little time left"}
            continue
        try:
            t0 = time.monotonic()
            engine = c.engine(c.full_dir, **kw)
            engine.warmup()
            ready = time.monotonic() - t0
            got = [engine.score(ids, lens) for ids, lens in small]
            base = base or got
            diff = max(float(np.abs(g - b).max()) for g, b in zip(got, base, strict=True))
            ms = [
                round(
                    1000
                    * statistics.median(
                        time_calls(lambda b=b, e=engine: e.score(*b), c.device, min_reps=10, min_seconds=0.3)
                    ),
                    2,
                )
                for b in small
            ]
            out[name] = {
                "ms_per_batch": ms,
                "max_abs_diff_vs_eager": round(diff, 4),
                "load_and_warmup_s": round(ready, 1),
            }
            if name == "torch.compile":
                out[name]["512"] = _uniform(c, name, engine.score, cfg, [512], c.args.budget_tokens)["512"]
            del engine
        except Exception as e:
            out[name] = {"error": f"{type(e).__name__}: {e}"}
        free_device_memory()
    return out


def stage_latency(c: Check) -> dict[str, Any]:
    assert c.full_dir is not None
    cfg = open_checkpoint(str(c.full_dir)).config
    ids, lens = _latency_batch(c, cfg)
    out: dict[str, Any] = {"passages": len(lens), "mean_tokens": round(float(lens.mean()), 1)}
    for name, make in (
        ("hf eager", lambda: HFEager(c.full_dir, c.device)),
        ("rankserve packed", lambda: c.engine(c.full_dir)),
    ):
        model = make()
        if hasattr(model, "warmup"):
            model.warmup()
        times = time_calls(lambda m=model: m.score(ids, lens), c.device, min_reps=10, min_seconds=c.args.seconds)
        out[name] = {"p50_ms": round(1000 * statistics.median(times), 1), "min_ms": round(1000 * min(times), 1)}
        del model
        free_device_memory()
    return out


def stage_http(c: Check) -> dict[str, Any]:
    import httpx

    import bench_serving
    import bench_workload

    assert c.full_dir is not None
    out_dir = Path(c.args.output)
    port = bench_serving.free_port()
    cmd = [
        *bench_serving.rankserve_cmd(),
        "serve",
        "--model",
        str(c.full_dir),
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--log-level",
        "warning",
        "--device",
        str(c.device),
        "--backend",
        "torch",  # not TensorRT, whatever is installed: this checks the PyTorch engine
    ]
    server = bench_serving.Server("rankserve", cmd, port, out_dir / "server.log")
    out: dict[str, Any] = {"command": " ".join(cmd[1:])}
    server.start()
    try:
        server.wait_ready(time.monotonic() + min(240.0, max(30.0, c.left - 30)))
        # One request of 1 query × 100 passages of ~256 tokens, sequentially.
        prof = (
            bench_workload.Profile("latency", 100, 100, 245, 0.02, 230, 260)
            if not c.args.dry_run
            else bench_workload.Profile("latency", 20, 20, 24, 0.02, 20, 28)
        )
        lat = bench_workload.build(prof, 4, 1, str(c.full_dir / "tokenizer.json"))
        times = []
        with httpx.Client(timeout=60.0) as client:
            for i in range(c.args.latency_requests + 2):
                t0 = time.perf_counter()
                r = client.post(
                    f"{server.base}/v1/ranking",
                    content=lat.payloads[i % len(lat)],
                    headers={"content-type": "application/json"},
                )
                r.raise_for_status()
                if i >= 2:
                    times.append(time.perf_counter() - t0)
        out["latency_1x100"] = {
            "mean_pair_tokens": round(float(np.mean(lat.pair_tokens[0])), 1),
            "p50_ms": round(1000 * float(np.percentile(times, 50)), 1),
            "p99_ms": round(1000 * float(np.percentile(times, 99)), 1),
            "requests": len(times),
        }
        wl = c.workload or bench_workload.build(
            bench_workload.PROFILES[c.args.profile], c.args.requests, 0, str(c.full_dir / "tokenizer.json")
        )
        out["workload"] = wl.stats["description"]
        for clients in c.args.clients:
            before = bench_serving.scrape(server.base)
            records, unfinished = asyncio.run(
                bench_serving.builtin_window(server.base, wl, clients, 10**9, c.args.http_seconds, 60.0)
            )
            after = bench_serving.scrape(server.base)
            ok = [r for r in records if r.ok]
            span = max((r.end for r in ok), default=0.0)
            passages = sum(wl.passages[r.index % len(wl)] for r in ok)
            lat_s = sorted(r.end - r.start for r in ok)
            deltas = bench_serving.metric_deltas(before, after)
            e2e = passages / span if span else 0.0
            engine = (
                deltas.get("passages", 0) / deltas["inference_seconds"] if deltas.get("inference_seconds") else None
            )
            out[f"{clients} clients"] = {
                "passages_s": round(e2e, 1),
                "requests_ok": len(ok),
                "errors": len(records) - len(ok) + unfinished,
                "p50_ms": round(1000 * float(np.percentile(lat_s, 50)), 1) if lat_s else None,
                "p99_ms": round(1000 * float(np.percentile(lat_s, 99)), 1) if lat_s else None,
                "engine_alone_passages_s": round(engine, 1) if engine else None,
                "serving_efficiency": round(e2e / engine, 3) if engine else None,
                "padding_eff": round(deltas["real_tokens"] / deltas["computed_tokens"], 3)
                if deltas.get("computed_tokens")
                else None,
                "mean_batch": round(deltas["batch_size_sum"] / deltas["batches"], 1) if deltas.get("batches") else None,
            }
            mixed = c.results.get("mixed", {})
            if "hf eager" in mixed:
                out[f"{clients} clients"]["vs_hf_eager"] = round(e2e / mixed["hf eager"]["passages_s"], 2)
            print(f"  {clients} clients: {out[f'{clients} clients']}", flush=True)
    finally:
        server.stop()
    return out


# -- report -------------------------------------------------------------------------------------------------------


def _get(d: dict[str, Any], *path: str) -> Any:
    for p in path:
        if not isinstance(d, dict) or p not in d:
            return None
        d = d[p]
    return d


def summary_rows(r: dict[str, Any]) -> list[tuple[str, str, str]]:
    """(what, result, target) rows of the short table."""

    def fmt(v: Any, unit: str = "") -> str:
        return "n/a" if v is None else f"{v:,}{unit}" if isinstance(v, int | float) else str(v)

    rows = []
    env = r.get("environment", {})
    rows.append(
        (
            "GPU / matmul TFLOP/s",
            f"{env.get('gpu', env.get('device'))} / {fmt(_get(env, 'matmul', 'tflops_median'))}",
            "≈790",
        )
    )
    par = r.get("parity", {})
    oks = [k for k, v in par.items() if isinstance(v, dict) and v.get("ok")]
    bad = [k for k, v in par.items() if isinstance(v, dict) and ("error" in v or v.get("ok") is False)]
    if oks or bad:
        failed = f", FAILED: {', '.join(bad)}" if bad else ""
        rows.append(("parity vs CPU fp32 (tiny)", f"{len(oks)} ok{failed}", "all ok"))
    eng = r.get("engine", {})
    for L in ("128", "512", "2048"):
        p = _get(eng, "rankserve packed", L)
        h = _get(eng, "hf eager", L)
        if p:
            ratio = f", {p['pairs_s'] / h['pairs_s']:.2f}× eager" if h else ""
            mfu = p.get("mfu_measured")
            rows.append(
                (
                    f"engine pairs/s @{L}",
                    f"{fmt(p['pairs_s'])} (MFU {fmt(mfu)}{ratio})",
                    "≥550 @512" if L == "512" else "",
                )
            )
    mixed = r.get("mixed", {})
    if "speedup" in mixed:
        rows.append(("mixed RAG engine vs eager", f"{mixed['speedup']}×", "≥2.5×"))
    fp8 = r.get("fp8", {})
    if "fp8 / bf16 speed" in fp8:
        rows.append(
            (
                "FP8 / bf16 @512",
                f"{fp8['fp8 / bf16 speed']}× (max|Δ| {_get(fp8, 'fp8 vs fp32', 'max_abs')}, "
                f"ρ {_get(fp8, 'fp8 vs fp32', 'spearman_mean')})",
                "≥1.4×",
            )
        )
    lat = r.get("latency", {})
    if "rankserve packed" in lat:
        rows.append(
            (
                "1×100×256 engine p50 ms",
                f"{lat['rankserve packed']['p50_ms']} (eager {_get(lat, 'hf eager', 'p50_ms')})",
                "≤60",
            )
        )
    http = r.get("http", {})
    if "latency_1x100" in http:
        rows.append(("1×100×256 HTTP p50 ms", fmt(http["latency_1x100"]["p50_ms"]), "≤60"))
    for k in [k for k in http if k.endswith(" clients")]:
        if isinstance(http[k], dict) and "passages_s" in http[k]:
            h = http[k]
            rows.append(
                (
                    f"HTTP {k} passages/s",
                    f"{h['passages_s']} (eff {fmt(h['serving_efficiency'])}, "
                    f"{fmt(h.get('vs_hf_eager'))}× eager, {h['errors']} err)",
                    "eff ≥0.9",
                )
            )
    for name, v in r.items():
        if isinstance(v, dict) and ("error" in v or "skipped" in v):
            rows.append((f"stage {name}", v.get("error") or f"skipped: {v['skipped']}", ""))
    return rows


def render_markdown(r: dict[str, Any], command: str) -> str:
    env = r.get("environment", {})
    lines = [
        "# GPU check",
        "",
        f"- **Date:** {env.get('date_utc')}",
        f"- **Device:** {env.get('gpu', env.get('device'))}, driver {env.get('driver', 'n/a')}, "
        f"CUDA {env.get('cuda', 'n/a')}, "
        f"PyTorch {env.get('torch')}, transformers {env.get('transformers', 'n/a')}",
        f"- **Command:** `{command}`",
        f"- **Dry run (CPU, tiny checkpoint):** {env.get('dry_run')}",
        "",
        "| what | result | target |",
        "|---|---|---|",
        *[f"| {a} | {b} | {t} |" for a, b, t in summary_rows(r)],
        "",
    ]
    eng = r.get("engine", {})
    if any(k in eng for k in ("hf eager", "rankserve packed")):
        lines += [
            "## Engine, uniform lengths",
            "",
            f"Token budget per batch {eng.get('budget_tokens')}; attention `{eng.get('attention')}`.",
            "",
            "| system | tokens/pair | batch | pairs/s | tokens/s | TFLOP/s | MFU (peak) | MFU (measured matmul) |",
            "|---|---:|---:|---:|---:|---:|---:|---:|",
        ]
        for name in ("hf eager", "rankserve padded", "rankserve packed"):
            for L, v in (eng.get(name) or {}).items():
                lines.append(
                    f"| {name} | {L} | {v['batch']} | {v['pairs_s']:,} | {v['tokens_s']:,} | {v['tflops']} | "
                    f"{v.get('mfu_peak', 'n/a')} | {v.get('mfu_measured', 'n/a')} |"
                )
        lines += [
            "",
            "Budget sweep (packed, tokens per batch → pairs/s): "
            + ", ".join(f"{b}: {v['pairs_s']}" for b, v in (eng.get("budget sweep") or {}).items()),
            "",
        ]
    for name in ("parity", "mixed", "fp8", "graphs", "latency", "http", "checkpoints", "environment"):
        if name in r:
            lines += [f"## {name}", "", "```json", json.dumps(r[name], indent=1, default=str)[:6000], "```", ""]
    return "\n".join(lines)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--output", required=True, help="folder for gpu_check.json, gpu_check.md and the server log")
    p.add_argument("--workdir", default="/tmp/rankserve-gpu-check", help="where the checkpoints are written")
    p.add_argument("--dry-run", action="store_true", help="CPU, tiny checkpoint, tiny sizes: exercise the code paths")
    p.add_argument("--budget", type=float, help="seconds for all stages (default 420; dry run 600)")
    p.add_argument(
        "--compile", action=argparse.BooleanOptionalAction, help="time torch.compile too (default: on a GPU only)"
    )
    p.add_argument("--skip", nargs="*", default=[], help="stages to skip")
    args = p.parse_args(argv)
    dry = args.dry_run
    args.budget = args.budget or (600.0 if dry else 420.0)
    args.compile = (not dry) if args.compile is None else args.compile
    args.lengths = [16, 64, 128] if dry else [128, 512, 2048]
    args.budget_tokens = 512 if dry else 16384
    args.sweep = [256, 1024] if dry else [4096, 8192, 16384, 32768]
    args.seconds = 0.2 if dry else 1.0
    args.requests = 6 if dry else 60
    args.profile = "rag-cpu" if dry else "rag"  # scripts/bench_workload.py
    args.fp8_requests = 2 if dry else 8
    args.latency_requests = 3 if dry else 20
    args.clients = [2] if dry else [8, 32]
    args.http_seconds = 3.0 if dry else 20.0
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.dry_run:
        device = torch.device("cpu")
    elif not torch.cuda.is_available():
        print("gpu_check: PyTorch sees no CUDA GPU (use --dry-run on a CPU)", file=sys.stderr)
        return 2
    else:
        device = torch.device("cuda")
    out = Path(args.output)
    out.mkdir(parents=True, exist_ok=True)
    c = Check(args, device)
    stages: list[tuple[str, Callable[[], Any], float]] = [
        ("environment", lambda: stage_environment(c), 0),
        ("checkpoints", lambda: stage_checkpoints(c), 0),
        ("parity", lambda: stage_parity(c), 30),
        ("engine", lambda: stage_engine(c), 60),
        ("mixed", lambda: stage_mixed(c), 40),
        ("latency", lambda: stage_latency(c), 30),
        ("http", lambda: stage_http(c), 100),
        ("graphs", lambda: stage_graphs(c), 40),
        ("fp8", lambda: stage_fp8(c), 50),
    ]
    for name, fn, need in stages:
        if name in args.skip:
            c.results[name] = {"skipped": "--skip"}
            continue
        c.stage(name, fn, need)
    c.results["total_seconds"] = round(time.monotonic() - c.started, 1)
    command = "scripts/gpu_check.sh " + " ".join(sys.argv[1:]) if os.environ.get("GPU_CHECK_SH") else " ".join(sys.argv)
    (out / "gpu_check.json").write_text(json.dumps(c.results, indent=1, default=str) + "\n", encoding="utf-8")
    (out / "gpu_check.md").write_text(render_markdown(c.results, command), encoding="utf-8")
    print(f"\nwrote {out / 'gpu_check.json'} and {out / 'gpu_check.md'} ({c.results['total_seconds']}s)\n")
    width = max(len(a) for a, _, _ in summary_rows(c.results))
    for a, b, t in summary_rows(c.results):
        print(f"{a:<{width}}  {b}" + (f"   [target {t}]" if t else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
