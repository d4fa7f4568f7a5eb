#!/usr/bin/env python
"""The decode benchmark's bandwidth ceiling: a plain Triton kernel that streams exactly the bytes a
decode step reads (K and V, B=8, Hkv=8, S=8192, D=128, bf16) and does nothing else, timed like
`bench_decode.py --l2 flush` (do_bench, which zeroes a 256 MB buffer before every call). What it
reaches is what any decode kernel can reach under that method on this GPU.

    python benchmarks/read_roofline.py [--seq 8192] [--programs 128,132,256,264] [--tma]
"""
from __future__ import annotations

import argparse

import torch
import triton
import triton.language as tl
import triton.testing


@triton.jit
def _read(K, V, OUT, BLOCK: tl.constexpr, ITERS: tl.constexpr, EVICT: tl.constexpr = "",
          CACHE: tl.constexpr = ""):
    pid = tl.program_id(0)
    acc = tl.zeros([BLOCK], tl.float32)
    base = pid.to(tl.int64) * BLOCK * ITERS
    for i in range(ITERS):
        offs = base + i * BLOCK + tl.arange(0, BLOCK)
        acc += (tl.load(K + offs, eviction_policy=EVICT, cache_modifier=CACHE).to(tl.float32)
                + tl.load(V + offs, eviction_policy=EVICT, cache_modifier=CACHE).to(tl.float32))
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


@triton.jit
def _read_tma(K, V, OUT, ROWS, TILES_PER_PROGRAM, BLOCK_N: tl.constexpr, D: tl.constexpr):
    # program p streams row tiles [p * TILES_PER_PROGRAM, ...) of K and V as [ROWS, D] matrices
    # through tensor descriptors (TMA), as the decode kernel's USE_TMA path does
    pid = tl.program_id(0)
    kd = tl.make_tensor_descriptor(K, shape=[ROWS, D], strides=[D, 1], block_shape=[BLOCK_N, D])
    vd = tl.make_tensor_descriptor(V, shape=[ROWS, D], strides=[D, 1], block_shape=[BLOCK_N, D])
    acc = tl.zeros([D], tl.float32)
    for i in range(pid * TILES_PER_PROGRAM, (pid + 1) * TILES_PER_PROGRAM):
        acc += tl.sum(kd.load([i * BLOCK_N, 0]).to(tl.float32) + vd.load([i * BLOCK_N, 0]).to(tl.float32), 0)
    tl.store(OUT + pid * D + tl.arange(0, D), acc)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seq", type=int, default=8192)
    ap.add_argument("--programs", default="",
                    help="comma list of program counts for a second table: the same bytes split evenly over "
                         "exactly that many programs (e.g. 128,132,256,264), BLOCK 2048")
    ap.add_argument("--tma", action="store_true", help="also stream K/V tiles through TMA tensor descriptors")
    ap.add_argument("--hints", action="store_true",
                    help="also the plain loads with L2 eviction / cache hints (evict_first, evict_last, .cg): whether "
                         "reads that leave the flush's dirty lines in L2 avoid their write-back")
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
    if args.hints:
        for evict, cache in (("", ""), ("evict_first", ""), ("evict_last", ""), ("", ".cg")):
            block, iters = 4096, 16
            grid = n // (block * iters)
            out = torch.empty(grid * block, device="cuda")
            ms = triton.testing.do_bench(
                lambda: _read[(grid,)](k, v, out, BLOCK=block, ITERS=iters, EVICT=evict, CACHE=cache, num_warps=8),
                warmup=25, rep=200, return_mode="median")
            print(f"  hints evict={evict or '-':12s} cache={cache or '-':4s}: {ms * 1e3:6.1f} us = "
                  f"{2 * n * 2 / ms / 1e9:.2f} TB/s")
    if args.tma:
        triton.set_allocator(lambda size, align, stream: torch.empty(size, dtype=torch.int8, device="cuda"))
        rows = n // 128
        for bn, programs, warps, stages in ((64, 128, 4, 3), (64, 128, 4, 5), (128, 128, 4, 3), (128, 128, 8, 4),
                                            (64, 256, 4, 3), (64, 512, 4, 3), (128, 256, 4, 4), (64, 1024, 4, 4)):
            tiles = rows // bn
            if tiles % programs:
                continue
            out = torch.empty(programs * 128, device="cuda")
            ms = triton.testing.do_bench(
                lambda: _read_tma[(programs,)](k, v, out, rows, tiles // programs, BLOCK_N=bn, D=128,
                                               num_warps=warps, num_stages=stages),
                warmup=25, rep=200, return_mode="median")
            print(f"  TMA BLOCK_N={bn:4d} programs={programs:5d} warps={warps} stages={stages}: {ms * 1e3:6.1f} us = "
                  f"{2 * n * 2 / ms / 1e9:.2f} TB/s")
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
