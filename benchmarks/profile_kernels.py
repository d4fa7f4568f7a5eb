#!/usr/bin/env python
"""Where the GPU time of one forward+backward goes, kernel by kernel, for each peer (CUDA only).

Runs the bench_attention.py cases and peers under torch.profiler and prints, per peer, every kernel
launched by one fwd+bwd step with its mean time per step, so a slower peer shows which kernel
(the dK/dV or dQ template, delta, a copy, a layout change) costs the difference.

    python benchmarks/profile_kernels.py --case causal --S 4096 --B 4 --peers ours,ours_compiled,torch_flex
    python benchmarks/profile_kernels.py --case document --S 1024 --B 16 --out /tmp/prof
"""
from __future__ import annotations

import argparse
import collections
import json
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import bench_attention as BA  # noqa: E402


def kernel_times(step, steps: int):
    """{kernel name: (mean us per step, launches per step)} over `steps` profiled steps."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(steps):
            step()
        torch.cuda.synchronize()
    total = collections.defaultdict(float)
    count = collections.Counter()
    for evt in prof.events():
        if evt.device_type == torch.autograd.DeviceType.CUDA:
            total[evt.name] += evt.device_time
            count[evt.name] += 1
    return {name: (total[name] / steps, count[name] / steps) for name in total}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    BA.add_case_arguments(ap)
    ap.add_argument("--peers", default="ours,ours_compiled,torch_flex")
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--fwd-only", action="store_true")
    ap.add_argument("--ours-kernel-options", default=None, help="JSON kernel_options for ours / ours_compiled")
    ap.add_argument("--out", default=None, help="folder for a JSON of the tables")
    ap.add_argument("--verbose", action="store_true", help="log inductor_flex's config choices")
    args = ap.parse_args(argv)
    if args.verbose:
        import logging

        logging.basicConfig(format="%(name)s: %(message)s")
        logging.getLogger("inductor_flex").setLevel(logging.INFO)
    bench_args = BA.parse_args(["--ours-kernel-options", args.ours_kernel_options] if args.ours_kernel_options else [])
    dev, dt = torch.device("cuda"), torch.bfloat16
    case = BA.build_case(args.case, args.S, args.H, dev, bench_args)
    g = torch.Generator(device=dev).manual_seed(0)
    shape = (args.B, args.H, args.S, args.D)
    q, k, v, dout = (torch.randn(shape, device=dev, dtype=dt, generator=g) for _ in range(4))
    for t in (q, k, v):
        t.requires_grad_(not args.fwd_only)
    report = {"case": args.case, "S": args.S, "B": args.B, "H": args.H, "D": args.D,
              "gpu": torch.cuda.get_device_name(dev), "torch": torch.__version__, "peers": {}}
    for peer in BA._csv(args.peers):
        fn, why = BA.make_peer(peer, case, args.S, dev, bench_args)
        if fn is None:
            print(f"{peer}: {why}")
            continue

        def step():
            out = fn(q, k, v)
            if not args.fwd_only:
                out.backward(dout)
            for t in (q, k, v):
                t.grad = None

        for _ in range(3):  # compile, autotune, warm
            step()
        torch.cuda.synchronize()
        times = kernel_times(step, args.steps)
        total = sum(us for us, _ in times.values())
        # wall time per step: above the kernel total when the host cannot keep the GPU fed
        t0 = time.perf_counter()
        for _ in range(args.steps):
            step()
        torch.cuda.synchronize()
        wall = (time.perf_counter() - t0) / args.steps * 1e6
        report["peers"][peer] = {"total_us": total, "wall_us": wall, "kernels": times}
        print(f"\n## {peer}: {total:.1f} us of kernels, {wall:.1f} us wall per "
              f"{'fwd' if args.fwd_only else 'fwd+bwd'} step")
        for name, (us, n) in sorted(times.items(), key=lambda kv: -kv[1][0]):
            print(f"{us:10.1f} us  x{n:<4g} {name[:110]}")
    if args.out:
        os.makedirs(args.out, exist_ok=True)
        path = os.path.join(args.out, f"profile_{args.case}_{args.S}x{args.B}_d{args.D}.json")
        with open(path, "w") as f:
            json.dump(report, f, indent=1)
        print("wrote", path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
