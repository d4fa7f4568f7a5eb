#!/usr/bin/env python
"""Where an eager call's host time goes: cProfile of repeated flex_attention calls (no sync).

    python benchmarks/profile_host.py --case decode   # B=8, Hq=32, Hkv=8, S=8192, D=128, Lq=1, bf16
    python benchmarks/profile_host.py --case paged    # the same over a shuffled PagedKVCache pool
    python benchmarks/profile_host.py --case forward  # B=4, H=16, S=4096, D=128, bf16
    python benchmarks/profile_host.py --case fwdbwd   # B=16, H=16, S=1024, D=128, document mask,
                                                      # forward + backward

For fwdbwd it also prints the host time of the forward call and of out.backward() apart: when the
backward's host time (the launches of delta, dK/dV and dQ) exceeds the GPU time of the forward, the
GPU waits between the two, which is what makes short eager steps host-bound.

    python benchmarks/profile_host.py --case paged --cpu  # no GPU: CPU tensors, the Triton
                                                          # interpreter, the launch itself stubbed
    python benchmarks/profile_host.py --case fwdbwd --cpu

--cpu times everything an eager call does on the host except the launches (CPU tensors, the
forward / backward / decode launches stubbed), so host-side changes can be compared on a machine
without a GPU; the GPU machine's host has taken 1.5-3x as long.
"""
from __future__ import annotations

import argparse
import cProfile
import os
import pstats
import sys
import time

if "--cpu" in sys.argv:
    os.environ["TRITON_INTERPRET"] = "1"  # before triton is imported: CPU tensors take the kernels

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from inductor_flex import flex_attention  # noqa: E402


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--case", choices=("decode", "paged", "forward", "fwdbwd"), default="decode")
    ap.add_argument("--calls", type=int, default=500)
    ap.add_argument("--top", type=int, default=30)
    ap.add_argument("--cpu", action="store_true", help="on CPU tensors with the launches stubbed")
    args = ap.parse_args()
    dev, dt = "cuda", torch.bfloat16
    opts = None
    if args.cpu:
        import inductor_flex.backward as BW
        import inductor_flex.decode as D
        import inductor_flex.kernel as K

        # the interpreter would run the kernels: time the host only
        D.launch_kernel = K.launch_kernel = BW.launch_kernel = lambda *a, **k: None
        dev, dt, opts = "cpu", torch.float16, {"BACKEND": "TRITON"}  # AUTO takes the math path on CPU
    sync = torch.cuda.synchronize if dev == "cuda" else (lambda: None)
    bm = None
    if args.case == "decode":
        q = torch.randn(8, 32, 1, 128, dtype=dt, device=dev)
        k = torch.randn(8, 8, 8192, 128, dtype=dt, device=dev)
    elif args.case == "paged":
        q, k, v, bm = paged_inputs(dev, dt)
    elif args.case == "forward":
        q = torch.randn(4, 16, 4096, 128, dtype=dt, device=dev)
        k = torch.randn(4, 16, 4096, 128, dtype=dt, device=dev)
    else:
        return fwdbwd(args, dev, dt, opts)
    if args.case != "paged":
        v = torch.randn_like(k)

    def call():
        return flex_attention(q, k, v, block_mask=bm, enable_gqa=True, kernel_options=opts)

    for _ in range(20):
        call()
    sync()
    t = time.perf_counter()
    for _ in range(args.calls):
        call()
    host = (time.perf_counter() - t) / args.calls * 1e6
    sync()
    print(f"{args.case}{' (cpu, launch stubbed)' if args.cpu else ''}: {host:.1f} us host per call (no profiler)")
    prof = cProfile.Profile()
    prof.enable()
    for _ in range(args.calls):
        call()
    prof.disable()
    sync()
    pstats.Stats(prof).sort_stats("tottime").print_stats(args.top)


def paged_inputs(dev, dt, B=8, Hq=32, Hkv=8, S=8192, D=128, page=128):
    """The decode shape over a PagedKVCache pool with shuffled pages (bench_decode.py's paged peer)."""
    from inductor_flex import create_block_mask
    from inductor_flex.paged import PagedKVCache

    cache = PagedKVCache(B * (S // page), page, B, device=dev)
    g = torch.Generator().manual_seed(0)
    cache.free_pages = [cache.free_pages[i] for i in torch.randperm(len(cache.free_pages), generator=g).tolist()]
    for b in range(B):
        cache.reserve(b, S)
    idx = torch.arange(B, device=dev)
    bm = cache.convert_logical_block_mask(create_block_mask(None, None, None, 1, S, device=dev, BLOCK_SIZE=page), idx)
    k_pool, v_pool = (torch.randn(1, Hkv, cache.capacity, D, dtype=dt, device=dev) for _ in range(2))
    return (torch.randn(B, Hq, 1, D, dtype=dt, device=dev), k_pool.expand(B, -1, -1, -1),
            v_pool.expand(B, -1, -1, -1), bm)


def fwdbwd(args, dev, dt, opts):
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    import bench_attention as BA
    from inductor_flex import create_block_mask

    S = 1024
    sync = torch.cuda.synchronize if dev == "cuda" else (lambda: None)
    case = BA.build_case("document", S, 16, torch.device(dev), BA.parse_args([]))
    bm = create_block_mask(case.mask_mod, None, None, S, S, device=dev)
    q, k, v, dout = (torch.randn(16, 16, S, 128, dtype=dt, device=dev) for _ in range(4))
    for t in (q, k, v):
        t.requires_grad_()
    fwd_s, bwd_s = [], []

    def step():
        t0 = time.perf_counter()
        out = flex_attention(q, k, v, block_mask=bm, kernel_options=opts)
        t1 = time.perf_counter()
        out.backward(dout)
        fwd_s.append(t1 - t0)
        bwd_s.append(time.perf_counter() - t1)
        for t in (q, k, v):
            t.grad = None

    for _ in range(5):
        step()
    sync()
    fwd_s.clear()
    bwd_s.clear()
    calls = min(args.calls, 100)  # stay below the launch queue's depth: host time, not GPU time
    for _ in range(calls):
        step()
        sync()
    print(f"fwdbwd: forward {sorted(fwd_s)[calls // 2] * 1e6:.1f} us host, backward "
          f"{sorted(bwd_s)[calls // 2] * 1e6:.1f} us host (medians, synchronized between steps)")
    prof = cProfile.Profile()
    prof.enable()
    for _ in range(calls):
        step()
    prof.disable()
    sync()
    pstats.Stats(prof).sort_stats("tottime").print_stats(args.top)


if __name__ == "__main__":
    main()
