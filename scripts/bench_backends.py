#!/usr/bin/env python3
"""CPU backends side by side: engine pairs/s at mixed lengths for torch, onnxruntime fp32 and onnxruntime int8.

    python scripts/bench_backends.py --checkpoint checkpoints/mid [--pairs 256] [--rounds 5] [--budgets 2048 4096]

All engines score the very same batches: `--pairs` sequences with lengths drawn (seeded) from the CPU workload's
distribution (lognormal, median 86 tokens, clipped to 24-2048, like `bench_serving.py --workload rag-cpu`), sorted
by length and cut into batches of at most `budget` padded tokens and 64 rows, as the scheduler forms them. Rounds
alternate the systems (A, B, C, A, B, C, ...) so that machine noise hits them alike; the table has medians and
ratios to torch at the default budget. It also prints int8's accuracy cost against fp32 on a fixed query set:
`--queries` queries × 20 passages, max |Δlogit| and how often the two rank a query's passages the same way.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

from rankserve.engines.base import Engine
from rankserve.engines.onnxruntime_engine import OnnxRuntimeEngine, OnnxRuntimeOptions
from rankserve.engines.torch_engine import TorchEngine
from rankserve.model.checkpoint import open_checkpoint
from rankserve.model.synthetic import write_checkpoint


def mixed_lengths(n: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return np.clip(np.round(rng.lognormal(np.log(86), 0.75, n)), 24, 2048).astype(np.int64)


def batches(lengths: np.ndarray, budget: int, max_rows: int = 64, seed: int = 1) -> list[tuple[np.ndarray, np.ndarray]]:
    """Length-sorted batches of at most `budget` padded tokens (rows × longest) and `max_rows` rows."""
    rng = np.random.default_rng(seed)
    out, rows = [], []
    for n in sorted(lengths.tolist()):
        if rows and (len(rows) + 1 > max_rows or (len(rows) + 1) * n > budget):
            out.append(rows)
            rows = []
        rows.append(n)
    if rows:
        out.append(rows)
    result = []
    for rows in out:
        width = max(rows)
        ids = np.full((len(rows), width), 128001, dtype=np.int64)
        for i, n in enumerate(rows):
            ids[i, 0] = 128000
            ids[i, 1:n] = rng.integers(0, 128000, n - 1)
        result.append((ids, np.array(rows, dtype=np.int64)))
    return result


def accuracy(fp32: Engine, int8: Engine, queries: int) -> dict[str, float]:
    """int8 vs fp32 on `queries` × 20 (query, passage) sequences sharing a query prefix per group."""
    rng = np.random.default_rng(2)
    deltas, agree_pairs, total_pairs, top1 = [], 0, 0, 0
    for _ in range(queries):
        query = rng.integers(0, 128000, 12)
        lens = mixed_lengths(20, seed=int(rng.integers(1 << 30)))
        width = int(lens.max()) + 13
        ids = np.full((20, width), 128001, dtype=np.int64)
        for i, n in enumerate(lens):
            ids[i, 0] = 128000
            ids[i, 1:13] = query
            ids[i, 13 : 13 + n] = rng.integers(0, 128000, n)
        lengths = lens + 13
        a, b = fp32.score(ids, lengths), int8.score(ids, lengths)
        deltas.append(np.abs(a - b))
        sa, sb = np.sign(a[:, None] - a[None, :]), np.sign(b[:, None] - b[None, :])
        upper = np.triu_indices(20, 1)
        agree_pairs += int((sa[upper] == sb[upper]).sum())
        total_pairs += len(upper[0])
        top1 += int(np.argmax(a) == np.argmax(b))
    d = np.concatenate(deltas)
    return {
        "max_abs": float(d.max()),
        "mean_abs": float(d.mean()),
        "pair_order_agreement": agree_pairs / total_pairs,
        "top1_agreement": top1 / queries,
    }


def _fmt(values: dict[str, float]) -> str:
    return ", ".join(f"{k} {v:.4g}" for k, v in values.items())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", default="checkpoints/mid")
    parser.add_argument("--pairs", type=int, default=256)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--budgets", type=int, nargs="+", default=[2048])
    parser.add_argument("--threads", type=int, default=os.cpu_count())
    parser.add_argument("--queries", type=int, default=20)
    parser.add_argument("--no-int8", action="store_true")
    args = parser.parse_args()

    import torch

    torch.set_num_threads(args.threads)
    if not Path(args.checkpoint, "config.json").exists():
        write_checkpoint(args.checkpoint, "mid")
    ckpt = open_checkpoint(args.checkpoint)
    engines: dict[str, Engine] = {
        "torch fp32": TorchEngine.from_checkpoint(ckpt, device="cpu", dtype="float32"),
        "onnxruntime fp32": OnnxRuntimeEngine.from_checkpoint(ckpt, options=OnnxRuntimeOptions(threads=args.threads)),
    }
    if not args.no_int8:
        options = OnnxRuntimeOptions(threads=args.threads, int8=True)
        engines["onnxruntime int8"] = OnnxRuntimeEngine.from_checkpoint(ckpt, options=options)
    for engine in engines.values():
        engine.warmup()

    lengths = mixed_lengths(args.pairs)
    tokens = int(lengths.sum())
    work = {b: batches(lengths, b) for b in args.budgets}
    systems: list[tuple[str, int, Callable[[], None]]] = []
    for name, engine in engines.items():
        for budget in args.budgets:

            def run(engine: Engine = engine, budget: int = budget) -> None:
                for ids, lens in work[budget]:
                    engine.score(ids, lens)

            systems.append((name, budget, run))
    for _, _, run in systems:  # one untimed pass each
        run()
    times: dict[tuple[str, int], list[float]] = {(n, b): [] for n, b, _ in systems}
    for _ in range(args.rounds):
        for name, budget, run in systems:
            start = time.perf_counter()
            run()
            times[(name, budget)].append(time.perf_counter() - start)

    print(f"checkpoint: {ckpt.path} ({ckpt.config.num_hidden_layers} layers, hidden {ckpt.config.hidden_size})")
    print(f"threads: {args.threads}; pairs: {args.pairs}; tokens: {tokens} (mean {tokens / args.pairs:.0f}, ", end="")
    print(f"p50 {int(np.median(lengths))}, max {int(lengths.max())}); rounds: {args.rounds}")
    base = statistics.median(times[("torch fp32", args.budgets[0])])
    print("| backend | budget (tokens) | batches | pairs/s (median) | tokens/s | vs torch fp32 |")
    print("|---|---:|---:|---:|---:|---:|")
    for name, budget, _ in systems:
        t = statistics.median(times[(name, budget)])
        row = (
            f"| {name} | {budget} | {len(work[budget])} | {args.pairs / t:,.1f} | {tokens / t:,.0f} | {base / t:.2f}× |"
        )
        print(row)
    if "onnxruntime int8" in engines:
        acc = accuracy(engines["onnxruntime fp32"], engines["onnxruntime int8"], args.queries)
        print(f"int8 vs fp32 on {args.queries} queries × 20 passages: {_fmt(acc)}")
        fp = accuracy(engines["torch fp32"], engines["onnxruntime fp32"], args.queries)
        print(f"onnxruntime fp32 vs torch fp32: {_fmt(fp)}")


if __name__ == "__main__":
    main()
