#!/usr/bin/env python
"""How steady Inductor's pick of the compiled forward config is: compile the same call several
times with Inductor's caches off (each compile autotunes afresh), print every choice's autotune
time (max_autotune's AUTOTUNE table, on stderr) and time the compiled call that resulted.

    python benchmarks/compiled_pick_probe.py --case noop --repeats 3
"""
from __future__ import annotations

import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from inductor_flex import create_block_mask, flex_attention  # noqa: E402


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--case", choices=("noop", "causal"), default="noop")
    ap.add_argument("--S", type=int, default=4096)
    ap.add_argument("--B", type=int, default=4)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    import torch._inductor.config as icfg
    import triton.testing

    icfg.max_autotune = True  # only for the AUTOTUNE table: the flex template autotunes regardless
    icfg.force_disable_caches = True
    q, k, v = (torch.randn(args.B, 16, args.S, 128, device="cuda", dtype=torch.bfloat16) for _ in range(3))
    bm = None
    if args.case == "causal":
        bm = create_block_mask(lambda b, h, qi, ki: qi >= ki, None, None, args.S, args.S, device="cuda")
    flops = 4 * args.B * 16 * args.S * args.S * 128 * (0.5 if args.case == "causal" else 1.0)
    eager_ms = triton.testing.do_bench(lambda: flex_attention(q, k, v, block_mask=bm), warmup=50, rep=300)
    print(f"eager: {eager_ms:.3f} ms {flops / eager_ms / 1e9:.1f} TFLOP/s", flush=True)
    for i in range(args.repeats):
        torch._dynamo.reset()
        fn = torch.compile(lambda q, k, v: flex_attention(q, k, v, block_mask=bm), fullgraph=True)
        fn(q, k, v)
        ms = triton.testing.do_bench(lambda: fn(q, k, v), warmup=50, rep=300)
        print(f"compile {i}: {ms:.3f} ms {flops / ms / 1e9:.1f} TFLOP/s", flush=True)


if __name__ == "__main__":
    main()
