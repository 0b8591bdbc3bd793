#!/usr/bin/env python3
"""Engine throughput by batch shape: how many padded tokens per batch the engine wants.

    python scripts/bench_engine.py --checkpoint checkpoints/mid [--lengths 64 256 1024] [--budgets 2048 8192 32768]

For each sequence length and token budget (batch = budget // length) it times `engine.score` on random ids,
alternating budgets round-robin so that machine noise hits them alike, and prints the median tokens/s. Used to
choose the default `max_batch_tokens` (docs/configuration.md).
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import numpy as np

from rankserve.engines import create_engine
from rankserve.model.checkpoint import open_checkpoint
from rankserve.model.synthetic import write_checkpoint


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", default="checkpoints/mid")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--dtype", default="auto")
    parser.add_argument("--lengths", type=int, nargs="+", default=[64, 256, 1024])
    parser.add_argument("--budgets", type=int, nargs="+", default=[1024, 2048, 4096, 8192, 16384, 32768])
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()

    if not Path(args.checkpoint, "config.json").exists():
        write_checkpoint(args.checkpoint, "mid")
    engine = create_engine(
        open_checkpoint(args.checkpoint), backend="torch", device=args.device, dtype=args.dtype, max_length=None
    )
    engine.warmup()
    rng = np.random.default_rng(0)
    print(f"engine: {engine.info}")
    print("| seq len | budget (tokens) | batch | tokens/s (median) | pairs/s |")
    print("|---|---|---|---|---|")
    for length in args.lengths:
        shapes = [(max(1, b // length), b) for b in args.budgets if b >= length]
        times: dict[int, list[float]] = {b: [] for _, b in shapes}
        for batch, _ in shapes:  # one untimed pass per shape
            engine.score(rng.integers(0, 128000, (batch, length)), np.full(batch, length))
        for _ in range(args.rounds):
            for batch, budget in shapes:
                ids = rng.integers(0, 128000, (batch, length))
                start = time.perf_counter()
                engine.score(ids, np.full(batch, length))
                times[budget].append(time.perf_counter() - start)
        for batch, budget in shapes:
            t = statistics.median(times[budget])
            print(f"| {length} | {budget} | {batch} | {batch * length / t:,.0f} | {batch / t:,.1f} |")


if __name__ == "__main__":
    main()
