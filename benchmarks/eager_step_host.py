#!/usr/bin/env python
"""Does an eager forward+backward step keep the GPU fed? For one bench_attention.py case, eager
(`ours`), it prints the host time per step of a free-running loop against its wall time (host below
wall: the GPU sets the pace), the do_bench time per step as bench_attention.py measures it, the host
time of each phase inside a do_bench-like loop (L2 clearing, forward call, backward call), and the
number of host-device synchronizations CUDA's sync debug mode reports for two steps (expected 0).

    python benchmarks/eager_step_host.py --case document --S 1024 --B 16
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
import warnings

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import bench_attention as BA  # noqa: E402


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--case", default="document")
    ap.add_argument("--S", type=int, default=1024)
    ap.add_argument("--B", type=int, default=16)
    ap.add_argument("--H", type=int, default=16)
    ap.add_argument("--D", type=int, default=128)
    args = ap.parse_args()
    import triton.testing

    dev = torch.device("cuda")
    bench_args = BA.parse_args([])
    case = BA.build_case(args.case, args.S, args.H, dev, bench_args)
    fn, why = BA.make_peer("ours", case, args.S, dev, bench_args)
    if fn is None:
        raise SystemExit(why)
    q, k, v, dout = (torch.randn(args.B, args.H, args.S, args.D, dtype=torch.bfloat16, device=dev) for _ in range(4))
    leaves = (q, k, v)
    for t in leaves:
        t.requires_grad_()

    def clear():
        for t in leaves:
            t.grad = None

    def step():
        fn(q, k, v).backward(dout)

    for _ in range(5):
        step()
        clear()
    torch.cuda.synchronize()
    print(f"{args.case} S={args.S} B={args.B} H={args.H} D={args.D}, eager fwd+bwd, {torch.cuda.get_device_name()}")
    for _ in range(3):
        t0 = time.perf_counter()
        for _ in range(50):
            step()
            clear()
        t1 = time.perf_counter()
        torch.cuda.synchronize()
        t2 = time.perf_counter()
        print(f"  free-running: host {(t1 - t0) / 50 * 1e6:.0f} us/step, wall {(t2 - t0) / 50 * 1e6:.0f} us/step")
    ms = triton.testing.do_bench(step, warmup=25, rep=100, grad_to_none=list(leaves), return_mode="median")
    print(f"  do_bench (L2 cleared before each step): {ms * 1e3:.0f} us/step")
    cache = torch.empty(64 * 1024 * 1024, dtype=torch.int32, device=dev)
    phases = []
    for _ in range(30):
        clear()
        a = time.perf_counter()
        cache.zero_()
        b = time.perf_counter()
        out = fn(q, k, v)
        c = time.perf_counter()
        out.backward(dout)
        phases.append((b - a, c - b, time.perf_counter() - c))
    torch.cuda.synchronize()
    med = [statistics.median(p[j] for p in phases[5:]) * 1e6 for j in range(3)]
    print("  host us per phase in a do_bench-like loop: clear L2 %.0f, forward %.0f, backward %.0f" % tuple(med))
    torch.cuda.set_sync_debug_mode("warn")
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            for _ in range(2):
                clear()
                step()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    syncs = [str(w.message) for w in caught if "synchroniz" in str(w.message).lower() and "prototype" not in str(w.message)]
    print(f"  synchronizations reported in two steps: {len(syncs)}", *syncs[:3], sep="\n    ")


if __name__ == "__main__":
    main()
