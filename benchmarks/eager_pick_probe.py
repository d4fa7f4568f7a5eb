#!/usr/bin/env python
"""How the eager forward's autotuner picks for one case: every candidate config pinned through
kernel_options and timed round-robin (forward only, no grad, as bench_attention's `fwd`), then the
autotuner run afresh several times (its cache cleared) with its pick and the call's time printed.
Then the picked config's call three ways: replayed from a CUDA graph (the kernel alone), timed as
the benchmark times it, and the host's time to enqueue it. For a benchmark row where eager falls
behind the compiled call.

    python benchmarks/eager_pick_probe.py --case prefix_lm --S 4096 --B 4 --D 64 --rounds 3 --picks 3
"""
from __future__ import annotations

import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_attention import build_case  # noqa: E402


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--case", default="prefix_lm")
    ap.add_argument("--S", type=int, default=4096)
    ap.add_argument("--B", type=int, default=4)
    ap.add_argument("--D", type=int, default=64)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--picks", type=int, default=3)
    ap.add_argument("--no-candidates", action="store_true", help="skip the pinned candidates' timings")
    args = ap.parse_args()
    from triton.testing import do_bench

    from inductor_flex import create_block_mask, flex_attention
    from inductor_flex import kernel as K

    dev = torch.device("cuda")
    case = build_case(args.case, args.S, 16, dev, argparse.Namespace(num_docs=8, doc_seed=0, window=1024,
                                                                       prefix=1024, softcap=30.0))
    bm = (create_block_mask(case.mask_mod, None, None, args.S, args.S, device=dev)
          if case.mask_mod is not None else None)
    g = torch.Generator(device=dev).manual_seed(0)
    q, k, v = (torch.randn(args.B, 16, args.S, args.D, device=dev, dtype=torch.bfloat16, generator=g) for _ in range(3))
    flops = 4 * args.B * 16 * args.D * case.analytic_pairs

    def call(opts=None):
        with torch.no_grad():
            return flex_attention(q, k, v, score_mod=case.score_mod, block_mask=bm, kernel_options=opts)

    ref = call()
    plan = next(p for p, *_ in K._plans.values())
    cands = list(plan.candidates)
    print(f"{args.case} S={args.S} B={args.B} D={args.D}: {len(cands)} candidates, "
          f"ws_applies={K.ws_applies(plan)} runs={K.plan_runs(plan)} union_walk={K.plan_union_walk(plan)}", flush=True)
    for r in range(0 if args.no_candidates else args.rounds):
        for c in cands:
            opts = dict(BLOCK_M=c.BLOCK_M, BLOCK_N=c.BLOCK_N, num_warps=c.num_warps, num_stages=c.num_stages,
                        WARP_SPECIALIZE=bool(c.warp_specialize))
            try:
                out = call(opts)
                err = (out.float() - ref.float()).abs().max().item()
                ms = do_bench(lambda: call(opts), warmup=25, rep=100)
                print(f"round {r} {c}: {ms * 1e3:8.1f} us {flops / ms * 1e-9:6.1f} TFLOP/s (diff to the "
                      f"default call {err:.1e})", flush=True)
            except Exception as e:  # noqa: BLE001
                print(f"round {r} {c}: FAILED {type(e).__name__}: {str(e)[:200]}", flush=True)
    # where a config's call time moves from round to round: the kernel (a CUDA graph of the call,
    # no host work) against the call timed as the benchmark does, and the host's enqueue time
    import time
    g_out = call()
    graph = torch.cuda.CUDAGraph()
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        call()
        with torch.cuda.graph(graph):
            g_out = call()
    torch.cuda.current_stream().wait_stream(s)
    del g_out
    print(f"the default call's config: {plan.config}", flush=True)
    for r in range(args.rounds):
        ms_graph = do_bench(graph.replay, warmup=25, rep=100)
        ms_call = do_bench(call, warmup=25, rep=100)
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        for _ in range(50):
            call()
        host_us = (time.perf_counter() - t0) / 50 * 1e6
        torch.cuda.synchronize()
        print(f"round {r}: graph replay {ms_graph * 1e3:.1f} us, eager call {ms_call * 1e3:.1f} us, host enqueue "
              f"{host_us:.1f} us per call (50 calls, no sync)", flush=True)
    for i in range(args.picks):
        K._autotuned.clear()
        call()
        picked = list(K._autotuned.values())
        ms = do_bench(call, warmup=25, rep=100)
        print(f"autotune {i}: picked {picked}, call {ms * 1e3:.1f} us {flops / ms * 1e-9:.1f} TFLOP/s", flush=True)


if __name__ == "__main__":
    main()
