#!/usr/bin/env python
"""Eager forward A/B of the warp-specialized config in one process: each score_mod timed with
kernel_options WARP_SPECIALIZE True (only the specialized config) and False (never), alternating,
then with autotuning free to choose (its log shows every candidate's time).

    python benchmarks/ws_ab.py [--cases noop,alibi,softcap] [--S 4096 --B 4]
"""
from __future__ import annotations

import argparse
import logging

import torch
import triton.testing


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cases", default="noop,alibi,softcap")
    ap.add_argument("--S", type=int, default=4096)
    ap.add_argument("--B", type=int, default=4)
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    from inductor_flex import flex_attention
    from inductor_flex import variants as V

    mods = {"noop": None, "alibi": V.generate_alibi_bias(16), "softcap": V.generate_tanh_softcap(30.0)}
    B, H, S, D = args.B, 16, args.S, 128
    q, k, v = (torch.randn(B, H, S, D, device="cuda", dtype=torch.bfloat16) for _ in range(3))
    flops = 4 * B * H * S * S * D
    for name in args.cases.split(","):
        mod = mods[name]
        times = {True: [], False: []}
        for _ in range(args.rounds):
            for ws in (True, False):
                opts = {"WARP_SPECIALIZE": ws}
                ms = triton.testing.do_bench(lambda: flex_attention(q, k, v, score_mod=mod, kernel_options=opts),
                                             warmup=25, rep=100, return_mode="median")
                times[ws].append(ms)
        auto = triton.testing.do_bench(lambda: flex_attention(q, k, v, score_mod=mod), warmup=25, rep=100,
                                       return_mode="median")
        line = "  ".join(f"WS={ws}: " + ", ".join(f"{flops / t / 1e9:.1f}" for t in ts) for ws, ts in times.items())
        print(f"{name:8s} TFLOP/s {line}  autotuned: {flops / auto / 1e9:.1f}", flush=True)


if __name__ == "__main__":
    main()
