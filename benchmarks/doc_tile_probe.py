"""Document masks at short lengths: which kv tile and which eager kernel build pays (CUDA only).

The benchmark's packed-document case (bench_attention.build_case) at S=1024, B=16, H=16, D=128,
bf16, timed as replayed CUDA graphs (GPU time, no host work), eager ours with:

  default      create_block_mask's 128-blocks, walked on their 64 x 64 refinement
  spec         the same with kernel_options SPECIALIZE_LAYOUT=True (strides and lengths baked in, as
               Inductor does; the eager floor leaves calls this short generic)
  64x32        a BlockMask of 64 x 32 blocks (tile_area.py: 1.56 computed per useful score against
               1.73 at 64 x 64), REFINE_BLOCK_MASK=False
  64x32_spec   both
  32x64        a BlockMask of 32 x 64 blocks: the dK/dV kernel's tile is then 64 keys (a whole
               wgmma M) by 32 queries, where 64 x 32 blocks give it 32 keys

Variants are timed round-robin for --rounds rounds (the GPU warms, and one pass can rank them
wrong), fwd and fwd+bwd, each round's TFLOP/s printed. --kernels also prints each variant's
kernels' times (torch.profiler, eager steps): a forward and dQ walking one grid and dK/dV another
would take the sum of the best of each.

    python benchmarks/doc_tile_probe.py --S 1024 --B 16 --rounds 2
    python benchmarks/doc_tile_probe.py --variants default,64x32,32x64 --rounds 2 --kernels
"""
import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_attention import BWD_FLOP_FACTOR, add_case_arguments, capture_graph, probe_setup  # noqa: E402


def main():
    ap = argparse.ArgumentParser()
    add_case_arguments(ap, "document", 1024, 16)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--variants", default="default,spec,64x32,64x32_spec")
    ap.add_argument("--kernels", action="store_true", help="also each variant's kernel times (profiler)")
    args = ap.parse_args()

    from triton.testing import do_bench

    from inductor_flex import create_block_mask, flex_attention

    dev = torch.device("cuda")
    case, q, k, v, dout = probe_setup(args, dev)
    S, B, H, D = args.S, args.B, args.H, args.D
    fwd_flops = 4.0 * B * H * D * case.analytic_pairs
    masks = {128: create_block_mask(case.mask_mod, None, None, S, S, device=dev),
             (64, 32): create_block_mask(case.mask_mod, None, None, S, S, device=dev, BLOCK_SIZE=(64, 32)),
             (32, 64): create_block_mask(case.mask_mod, None, None, S, S, device=dev, BLOCK_SIZE=(32, 64))}
    variants = {
        "default": (masks[128], {}),
        "spec": (masks[128], {"SPECIALIZE_LAYOUT": True}),
        "64x32": (masks[(64, 32)], {"REFINE_BLOCK_MASK": False}),
        "64x32_spec": (masks[(64, 32)], {"REFINE_BLOCK_MASK": False, "SPECIALIZE_LAYOUT": True}),
        "32x64": (masks[(32, 64)], {"REFINE_BLOCK_MASK": False}),
    }
    chosen = args.variants.split(",")
    steps = {}
    ref = None
    for name in chosen:
        bm, opts = variants[name]

        def fwd(bm=bm, opts=opts):
            with torch.no_grad():
                return flex_attention(q, k, v, block_mask=bm, kernel_options=opts)

        def fwdbwd(bm=bm, opts=opts):
            for t in (q, k, v):
                t.grad = None
            flex_attention(q, k, v, block_mask=bm, kernel_options=opts).backward(dout)

        out = fwd()
        ref = out if ref is None else ref
        print(f"{name}: max |out - default| {(out.float() - ref.float()).abs().max().item():.3e}", flush=True)
        steps[name] = (capture_graph(fwd, dev), capture_graph(fwdbwd, dev))
        if args.kernels:
            from profile_kernels import kernel_times

            times = kernel_times(fwdbwd, 10)
            print(f"  {name} kernels per fwd+bwd step ({sum(us for us, _ in times.values()):.1f} us):", flush=True)
            for kname, (us, n) in sorted(times.items(), key=lambda kv: -kv[1][0]):
                print(f"  {us:9.1f} us  x{n:<3g} {kname[:90]}", flush=True)
    print(f"{args.case} S={S} B={B} H={H} D={D} bf16, density {case.analytic_pairs / S / S:.3f}; TFLOP/s fwd / f+b")
    for r in range(args.rounds):
        for name in chosen:
            f, fb = steps[name]
            ms_f = do_bench(f, warmup=25, rep=200, return_mode="median")
            ms_fb = do_bench(fb, warmup=25, rep=200, return_mode="median")
            print(f"round {r} {name:12s} {fwd_flops / ms_f / 1e9:7.1f} / {BWD_FLOP_FACTOR * fwd_flops / ms_fb / 1e9:7.1f}"
                  f"   ({ms_f * 1e3:.1f} / {ms_fb * 1e3:.1f} us)", flush=True)


if __name__ == "__main__":
    main()
