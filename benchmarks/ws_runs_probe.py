#!/usr/bin/env python
"""Forward kernel time of a causal BlockMask (B=4, H=16, S=4096, D=128, bf16) under variants of the
rendered source: the warp-specialized loop over the mask's runs (template RUNS) as rendered, and
with one of its parts changed (some changes give wrong answers: this times the kernel, it checks nothing), against
the plain configs. Tells which part of the specialized BlockMask loop costs what on the GPU.

    python benchmarks/ws_runs_probe.py [--S 4096 --B 4] [--mask causal|prefix_lm]
"""

import torch
import triton

from inductor_flex import create_block_mask
from inductor_flex import compat
from inductor_flex import kernel as K
from inductor_flex import variants as V
from inductor_flex.lowering.configs import Config
from inductor_flex.validation import validate_kernel_options

from ab_timing import probe_parser

OR_FULL = "tl.where((i < n_full) | mask_mod("
PATCHES = {
    "as_rendered": [],
    # the mask alone on every tile (right only where full blocks agree with mask_mod, as
    # create_block_mask's do): what keeping it off the full blocks costs
    "mask_alone": [(OR_FULL, "tl.where(mask_mod(")],
    # no mask at all (wrong answers): what the mask costs
    "no_mask": [(OR_FULL, "tl.where(True | mask_mod(")],
    # causal only: full run from block 0, the partial block right after it, so i * BLOCK_N is the tile
    "start_from_i": [("start_n = tl.where(i < n_full, full_n, part_n) + i * BLOCK_N", "start_n = i * BLOCK_N")],
}


def main():
    ap = probe_parser(__doc__, rounds=None)
    ap.add_argument("--mask", default="causal", choices=("causal", "prefix_lm"))
    args = ap.parse_args()
    B, H, S, D = args.B, 16, args.S, 128
    q, k, v = (torch.randn(B, H, S, D, device="cuda", dtype=torch.bfloat16) for _ in range(3))
    mm = V.generate_causal_mask() if args.mask == "causal" else V.generate_prefix_lm_mask(S // 4)
    bm = create_block_mask(mm, None, None, S, S, device="cuda")
    i = torch.arange(S, device="cuda")
    flops = 4 * B * H * S * S * D * mm(0, 0, i[:, None], i[None, :]).float().mean().item()
    out = torch.empty_like(q)
    lse = torch.empty(B, H, S, device="cuda")
    compat.ensure_triton_allocator()
    opts = validate_kernel_options({"BACKEND": "TRITON", "REFINE_BLOCK_MASK": False})
    plan = K.ForwardPlan(q, k, v, None, bm, None, opts)

    def timed(source, cfg, **override):
        grid, a, consts = K.forward_launch(plan, q, k, v, out, lse, lse, cfg)
        consts = dict(consts, **override)  # (the plan keeps the returned dict)
        fn = K.load_module(source, False).flex_fwd_kernel
        run = lambda: fn[grid](*a, **consts, num_warps=cfg.num_warps, num_stages=cfg.num_stages)  # noqa: E731
        run()
        ms = triton.testing.do_bench(run, warmup=25, rep=100)
        return flops / ms / 1e9

    ws = Config(128, 128, 4, 2, True)
    for name, patches in PATCHES.items():
        src = plan.source
        for a, b in patches:
            assert a in src, (name, a)
            src = src.replace(a, b)
        print(f"ws {name:22s} {timed(src, ws):6.1f} TFLOP/s", flush=True)
    for cfg in (Config(128, 128, 8, 2), Config(128, 64, 8, 3), Config(128, 64, 4, 3)):
        plain = timed(plan.source, cfg)
        runs = timed(plan.source, cfg, RUNS=True)
        print(f"plain {cfg.BLOCK_M}x{cfg.BLOCK_N} w{cfg.num_warps} s{cfg.num_stages}: index loads {plain:6.1f}, "
              f"runs {runs:6.1f} TFLOP/s", flush=True)
    # the specialized loop once more, to see the drift over the run
    print(f"ws as_rendered (again)     {timed(plan.source, ws):6.1f} TFLOP/s", flush=True)


if __name__ == "__main__":
    main()
