#!/usr/bin/env python
"""Time the eager backward kernels (dK/dV and dQ) for a grid of tile configs, one case at a time.

The autotuner only tries the few candidates in lowering/configs.py; this sweep shows whether a
config outside them, or a template change, moves the backward. CUDA only.

    python benchmarks/sweep_backward.py --case causal --S 4096 --B 4
    python benchmarks/sweep_backward.py --case document --S 1024 --B 16 --kernels dkdv --out /tmp/sweep
"""
from __future__ import annotations

import argparse
import json
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import bench_attention as BA  # noqa: E402

GRID = {
    "dkdv": [(m, n, w, s) for (m, n) in ((64, 128), (32, 128), (64, 64), (128, 128), (128, 64))
             for w in (4, 8) for s in (2, 3, 4)],
    "dq": [(m, n, w, s) for (m, n) in ((128, 64), (64, 64), (128, 32), (64, 32), (128, 128), (64, 128))
           for w in (4, 8) for s in (2, 3, 4)],
}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    BA.add_case_arguments(ap)
    ap.add_argument("--kernels", default="dkdv,dq")
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)

    import triton.testing

    from inductor_flex import backward as BW
    from inductor_flex import create_block_mask
    from inductor_flex.kernel import cached_plan, load_module, run_forward
    from inductor_flex.lowering.configs import Config

    dev, dt = torch.device("cuda"), torch.bfloat16
    case = BA.build_case(args.case, args.S, args.H, dev, BA.parse_args([]))
    bm = create_block_mask(case.mask_mod, None, None, args.S, args.S, device=dev) if case.mask_mod else None
    g = torch.Generator(device=dev).manual_seed(0)
    shape = (args.B, args.H, args.S, args.D)
    q, k, v, dout = (torch.randn(shape, device=dev, dtype=dt, generator=g) for _ in range(4))
    plan = cached_plan(q, k, v, case.score_mod, bm, None, {})
    out, lse = run_forward(plan, q, k, v)[:2]
    bplan = BW.BackwardPlan(plan, case.score_mod, (), {})
    call = BW.BackwardCall(bplan, q, k, v, out, lse, dout, None)
    module = load_module(bplan.source, False)
    BW._run(module, call.preprocess())
    pairs = case.analytic_pairs * args.B * args.H
    rows = []
    print(f"{args.case} S={args.S} B={args.B} H={args.H} D={args.D} {torch.cuda.get_device_name(dev)}")
    for kind in BA._csv(args.kernels):
        for m, n, w, s in GRID[kind]:
            cfg = Config(m, n, w, s)
            launch = call.dkdv(cfg) if kind == "dkdv" else call.dq_launch(cfg, False)
            try:
                ms = float(triton.testing.do_bench(lambda: BW._run(module, launch), warmup=10, rep=50,
                                                   return_mode="median"))
            except Exception as e:  # noqa: BLE001 - out of resources etc.: recorded, not fatal
                rows.append({"kernel": kind, "config": list(cfg), "error": str(e)[:120]})
                print(f"{kind} {cfg}: {str(e)[:80]}")
                continue
            # dK/dV: 4 GEMMs per score tile, dQ: 3
            tf = (4 if kind == "dkdv" else 3) * 2 * pairs * args.D / (ms * 1e-3) / 1e12
            rows.append({"kernel": kind, "config": list(cfg), "ms": ms, "tflops": tf})
            print(f"{kind} {cfg}: {ms * 1e3:8.1f} us  {tf:6.1f} TFLOP/s", flush=True)
    for kind in BA._csv(args.kernels):
        ok = [r for r in rows if r["kernel"] == kind and "ms" in r]
        if ok:
            best = min(ok, key=lambda r: r["ms"])
            print(f"best {kind}: {best['config']} {best['ms'] * 1e3:.1f} us")
    if args.out:
        os.makedirs(args.out, exist_ok=True)
        with open(os.path.join(args.out, f"sweep_backward_{args.case}_{args.S}x{args.B}_d{args.D}.json"), "w") as f:
            json.dump({"case": args.case, "S": args.S, "B": args.B, "H": args.H, "D": args.D,
                       "gpu": torch.cuda.get_device_name(dev), "rows": rows}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
