#!/usr/bin/env python
"""Eager A/B of a boolean kernel option in one process: each score_mod timed with the option True
and False, alternating (an H100 under sustained load slows by several percent within a run), then
with the option left to its default. By default the option is WARP_SPECIALIZE (True: only the
warp-specialized forward config, False: never; default: autotuning chooses, its log shows every
candidate's time).

    python benchmarks/ws_ab.py [--cases noop,alibi,softcap] [--S 4096 --B 4]
    python benchmarks/ws_ab.py --option SEPARABLE_SCORE_MOD --cases alibi --fwdbwd --base '{"WARP_SPECIALIZE": false}'
    python benchmarks/ws_ab.py --cases causal,prefix_lm   # BlockMask cases (TFLOP/s of unmasked work)
"""
from __future__ import annotations

import json
import logging

import torch

from ab_timing import probe_parser


def main():
    ap = probe_parser(__doc__, rounds=3)
    ap.add_argument("--cases", default="noop,alibi,softcap")
    ap.add_argument("--option", default="WARP_SPECIALIZE", help="the boolean kernel option to A/B")
    ap.add_argument("--base", default="{}", help="JSON kernel_options applied to every call")
    ap.add_argument("--fwdbwd", action="store_true", help="also time forward+backward")
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    from ab_timing import fwd_fwdbwd_ms
    from inductor_flex import create_block_mask, flex_attention
    from inductor_flex import variants as V

    base = json.loads(args.base)
    B, H, S, D = args.B, 16, args.S, 128
    masks = {"causal": V.generate_causal_mask(), "prefix_lm": V.generate_prefix_lm_mask(S // 4)}
    mods = {"noop": None, "alibi": V.generate_alibi_bias(16), "softcap": V.generate_tanh_softcap(30.0)}
    q, k, v = (torch.randn(B, H, S, D, device="cuda", dtype=torch.bfloat16, requires_grad=True) for _ in range(3))
    dout = torch.randn_like(q)

    def timed(name, opts):
        mod, bm, density = mods.get(name), None, 1.0
        if name in masks:
            bm = create_block_mask(masks[name], None, None, S, S, device="cuda")
            i = torch.arange(S, device="cuda")
            density = masks[name](0, 0, i[:, None], i[None, :]).float().mean().item()
        flops = 4 * B * H * S * S * D * density
        fwd, fb = fwd_fwdbwd_ms(lambda: flex_attention(q, k, v, score_mod=mod, block_mask=bm, kernel_options=opts),
                                (q, k, v), dout, backward=args.fwdbwd)
        if not args.fwdbwd:
            return f"{flops / fwd / 1e9:.1f}"
        return f"{flops / fwd / 1e9:.1f}/{3.5 * flops / fb / 1e9:.1f}"

    for name in args.cases.split(","):
        times = {True: [], False: []}
        for _ in range(args.rounds):
            for flag in (True, False):
                times[flag].append(timed(name, {**base, args.option: flag}))
        auto = timed(name, dict(base))
        line = "  ".join(f"{args.option}={flag}: " + ", ".join(ts) for flag, ts in times.items())
        unit = "fwd/f+b TFLOP/s" if args.fwdbwd else "fwd TFLOP/s"
        print(f"{name:8s} {unit} {line}  default: {auto}", flush=True)


if __name__ == "__main__":
    main()
