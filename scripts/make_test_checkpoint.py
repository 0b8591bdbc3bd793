#!/usr/bin/env python3
"""Write a checkpoint with seeded random weights in the exact real on-disk format.

    python scripts/make_test_checkpoint.py --size tiny --output checkpoints/tiny
    python scripts/make_test_checkpoint.py --size full --output checkpoints/full --device cuda

Sizes: tiny (tests), mid (CPU benchmarks), full (the real 1.24 B shapes, for GPU performance work).
The scores of such a checkpoint are meaningless: it is not a model.
"""

from __future__ import annotations

import argparse
import time

from rankserve.model.synthetic import SIZES, write_checkpoint


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", choices=sorted(SIZES), default="tiny")
    parser.add_argument("--output", required=True, help="directory to write (created if missing)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--shards", type=int, default=1, help="split the weights into N files with an index")
    parser.add_argument("--device", default="cpu", help="where to draw the random numbers (cuda is faster for full)")
    args = parser.parse_args()
    start = time.perf_counter()
    out = write_checkpoint(args.output, args.size, seed=args.seed, shards=args.shards, device=args.device)
    print(f"wrote a random-weight {args.size} checkpoint to {out} in {time.perf_counter() - start:.1f}s")


if __name__ == "__main__":
    main()
