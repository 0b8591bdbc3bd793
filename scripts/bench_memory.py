"""Peak memory of one forward pass by batch shape: the activation memory behind `max_batch_tokens` (docs/operations.md,
"Sizing").

The real architecture with the full model's layer shapes (hidden 2048, MLP 8192, 32/8 heads of 64) but `--layers`
layers and a small vocabulary: activations are freed layer by layer and the embedding is a lookup, so neither
changes the peak. Each shape runs in a fresh process. On CPU the peak is the process's peak resident memory during
the forward minus its resident memory just before (ru_maxrss); on CUDA, torch.cuda.max_memory_allocated minus the
memory allocated before. Prints bytes per padded token.

    python scripts/bench_memory.py --device cpu --dtype float32 --shapes 1x2048 4x512 16x128 2x4096
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys


def one(batch: int, seq: int, layers: int, device: str, dtype_name: str) -> dict[str, float]:
    import torch

    from rankserve.model.config import RerankerConfig
    from rankserve.model.llama import Reranker
    from rankserve.model.synthetic import REAL_CONFIG

    torch.manual_seed(0)
    dtype = getattr(torch, dtype_name)
    config = RerankerConfig.from_dict({**REAL_CONFIG, "num_hidden_layers": layers, "vocab_size": 1024})
    model = Reranker(config).to(device=device, dtype=dtype).eval()
    ids = torch.randint(0, 1024, (batch, seq), device=device)
    lengths = torch.full((batch,), seq, dtype=torch.long, device=device)

    def forward(i: torch.Tensor, n: torch.Tensor) -> torch.Tensor:
        return model(i, n)  # the padded forward (the CUDA engine's packed path needs no more memory)

    with torch.inference_mode():
        forward(ids[:1, :16], torch.tensor([16], device=device))  # allocator and kernels warmed
        if device.startswith("cuda"):
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            before = torch.cuda.memory_allocated()
            forward(ids, lengths)
            torch.cuda.synchronize()
            peak = torch.cuda.max_memory_allocated() - before
        else:
            with open("/proc/self/statm") as f:
                before = int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
            forward(ids, lengths)
            peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - before
    tokens = batch * seq
    return {"batch": batch, "seq": seq, "tokens": tokens, "peak_bytes": peak, "bytes_per_token": peak / tokens}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    parser.add_argument("--layers", type=int, default=1)
    parser.add_argument("--shapes", nargs="+", default=["1x2048", "4x512", "16x128", "2x4096"], help="BATCHxSEQ")
    parser.add_argument("--one", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        batch, seq = map(int, args.one.split("x"))
        print(json.dumps(one(batch, seq, args.layers, args.device, args.dtype)))
        return
    print(f"device {args.device}, {args.dtype}, {args.layers} layer(s) of the full model's shape")
    print(f"{'batch':>5} {'seq':>6} {'tokens':>7} {'peak MB':>9} {'KB/token':>9}")
    for shape in args.shapes:
        cmd = [sys.executable, __file__, "--one", shape, "--device", args.device, "--dtype", args.dtype]
        cmd += ["--layers", str(args.layers)]
        r = json.loads(subprocess.run(cmd, check=True, capture_output=True, text=True).stdout.strip().splitlines()[-1])
        print(
            f"{r['batch']:>5} {r['seq']:>6} {r['tokens']:>7} {r['peak_bytes'] / 1e6:>9.0f} "
            f"{r['bytes_per_token'] / 1024:>9.1f}"
        )


if __name__ == "__main__":
    main()
