#!/usr/bin/env python
"""The decode benchmark's bandwidth ceiling: a plain Triton kernel that streams exactly the bytes a
decode step reads (K and V, B=8, Hkv=8, S=8192, D=128, bf16) and does nothing else, timed like
`bench_decode.py --l2 flush` (do_bench, which zeroes a 256 MB buffer before every call). What it
reaches is what any decode kernel can reach under that method on this GPU.

    python benchmarks/read_roofline.py [--seq 8192] [--programs 128,132,256,264]
"""
from __future__ import annotations

import argparse

import torch
import triton
import triton.language as tl
import triton.testing


@triton.jit
def _read(K, V, OUT, BLOCK: tl.constexpr, ITERS: tl.constexpr):
    pid = tl.program_id(0)
    acc = tl.zeros([BLOCK], tl.float32)
    base = pid.to(tl.int64) * BLOCK * ITERS
    for i in range(ITERS):
        offs = base + i * BLOCK + tl.arange(0, BLOCK)
        acc += tl.load(K + offs).to(tl.float32) + tl.load(V + offs).to(tl.float32)
    tl.store(OUT + pid * BLOCK + tl.arange(0, BLOCK), acc)  # keeps the loads alive


@triton.jit
def _read_share(K, V, OUT, CHUNKS, PROGRAMS, BLOCK: tl.constexpr):
    # program p streams chunks [p * CHUNKS // PROGRAMS, (p + 1) * CHUNKS // PROGRAMS): any program count
    pid = tl.program_id(0)
    lo = (pid * CHUNKS) // PROGRAMS
    hi = ((pid + 1) * CHUNKS) // PROGRAMS
    acc = tl.zeros([BLOCK], tl.float32)
    for c in range(lo, hi):
        offs = c.to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
        acc += tl.load(K + offs).to(tl.float32) + tl.load(V + offs).to(tl.float32)
    tl.store(OUT + pid * BLOCK + tl.arange(0, BLOCK), acc)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seq", type=int, default=8192)
    ap.add_argument("--programs", default="",
                    help="comma list of program counts for a second table: the same bytes split evenly over "
                         "exactly that many programs (e.g. 128,132,256,264), BLOCK 2048")
    args = ap.parse_args()
    k = torch.randn(8, 8, args.seq, 128, dtype=torch.bfloat16, device="cuda")
    v = torch.randn_like(k)
    n = k.numel()
    print(f"{torch.cuda.get_device_name()}: K+V {2 * n * 2 / 1e6:.0f} MB, do_bench with its L2 flush")
    for block, iters in ((4096, 16), (8192, 8), (2048, 64), (4096, 64)):
        if n % (block * iters):
            continue
        grid = n // (block * iters)
        out = torch.empty(grid * block, device="cuda")
        ms = triton.testing.do_bench(lambda: _read[(grid,)](k, v, out, BLOCK=block, ITERS=iters, num_warps=8),
                                     warmup=25, rep=200, return_mode="median")
        print(f"  BLOCK={block:5d} ITERS={iters:3d} programs={grid:5d}: {ms * 1e3:6.1f} us = {2 * n * 2 / ms / 1e9:.2f} TB/s")
    block = 2048
    for programs in [int(x) for x in args.programs.split(",") if x.strip()]:
        out = torch.empty(programs * block, device="cuda")
        for warps in (4, 8):
            ms = triton.testing.do_bench(
                lambda: _read_share[(programs,)](k, v, out, n // block, programs, BLOCK=block, num_warps=warps),
                warmup=25, rep=200, return_mode="median")
            print(f"  BLOCK={block:5d} programs={programs:5d} warps={warps}: {ms * 1e3:6.1f} us = "
                  f"{2 * n * 2 / ms / 1e9:.2f} TB/s")


if __name__ == "__main__":
    main()
