#!/usr/bin/env python
"""Where an eager call's host time goes: cProfile of repeated flex_attention calls (no sync).

    python benchmarks/profile_host.py --case decode   # B=8, Hq=32, Hkv=8, S=8192, D=128, Lq=1, bf16
    python benchmarks/profile_host.py --case forward  # B=4, H=16, S=4096, D=128, bf16
"""
from __future__ import annotations

import argparse
import cProfile
import os
import pstats
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from inductor_flex import flex_attention  # noqa: E402


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--case", choices=("decode", "forward"), default="decode")
    ap.add_argument("--calls", type=int, default=500)
    ap.add_argument("--top", type=int, default=30)
    args = ap.parse_args()
    dev, dt = "cuda", torch.bfloat16
    if args.case == "decode":
        q = torch.randn(8, 32, 1, 128, dtype=dt, device=dev)
        k = torch.randn(8, 8, 8192, 128, dtype=dt, device=dev)
    else:
        q = torch.randn(4, 16, 4096, 128, dtype=dt, device=dev)
        k = torch.randn(4, 16, 4096, 128, dtype=dt, device=dev)
    v = torch.randn_like(k)

    def call():
        return flex_attention(q, k, v, enable_gqa=True)

    for _ in range(20):
        call()
    torch.cuda.synchronize()
    t = time.perf_counter()
    for _ in range(args.calls):
        call()
    host = (time.perf_counter() - t) / args.calls * 1e6
    torch.cuda.synchronize()
    print(f"{args.case}: {host:.1f} us host per call (no profiler)")
    prof = cProfile.Profile()
    prof.enable()
    for _ in range(args.calls):
        call()
    prof.disable()
    torch.cuda.synchronize()
    pstats.Stats(prof).sort_stats("tottime").print_stats(args.top)


if __name__ == "__main__":
    main()
