#!/usr/bin/env python
"""Why the compiled warp-specialized ALiBi forward outran the eager one (H100, 2026-11-27: 530 against
455-486 TFLOP/s, B=4 H=16 S=4096 D=128 bf16): one process, forward medians, alternating rounds, of

  eager   ALiBi with the warp-specialized config pinned (kernel_options WARP_SPECIALIZE=True), printed
          with printer.TILE_FLOAT_FORM on (the default until this probe): a float subtract of the
          converted index vectors kv_idx.to(f32) - q_idx.to(f32) per score
  eager   the same with it off (the default since): kv_idx - q_idx as an integer tile converted per
          score, as Inductor prints it
  compiled ALiBi, WARP_SPECIALIZE=True (Inductor-rendered template)
  and noop eager / compiled with the same config, for scale.

    python benchmarks/alibi_ws_probe.py [--rounds 2]
"""
from __future__ import annotations


import torch
import triton.testing

from ab_timing import probe_parser


def main():
    ap = probe_parser(__doc__)
    args = ap.parse_args()
    from inductor_flex import flex_attention, printer
    from inductor_flex import variants as V

    B, H, S, D = args.B, 16, args.S, 128
    q, k, v = (torch.randn(B, H, S, D, device="cuda", dtype=torch.bfloat16) for _ in range(3))
    flops = 4 * B * H * S * S * D
    ws = {"WARP_SPECIALIZE": True}
    alibi = V.generate_alibi_bias(H)

    def alibi_int(score, b, h, q_idx, kv_idx):  # the same mod, another code object: printed apart
        slope = torch.exp2(-8.0 * (h + 1) / H)
        return score + slope * (kv_idx - q_idx)
    compiled = torch.compile(flex_attention, fullgraph=True)

    def eager_float():
        printer.TILE_FLOAT_FORM = True
        try:
            return flex_attention(q, k, v, score_mod=alibi, kernel_options=ws)
        finally:
            printer.TILE_FLOAT_FORM = False

    calls = {
        "eager alibi float vec": eager_float,
        "eager alibi int tile": lambda: flex_attention(q, k, v, score_mod=alibi_int, kernel_options=ws),
        "compiled alibi": lambda: compiled(q, k, v, score_mod=alibi, kernel_options=ws),
        "eager noop": lambda: flex_attention(q, k, v, kernel_options=ws),
        "compiled noop": lambda: compiled(q, k, v, kernel_options=ws),
    }
    ref = calls["eager alibi float vec"]().float()
    for name, call in calls.items():
        diff = (call().float() - ref).abs().max().item() if "alibi" in name else 0.0
        print(f"{name:22s} max diff vs float vec {diff:.1e}", flush=True)
    for r in range(args.rounds):
        for name, call in calls.items():
            with torch.no_grad():
                ms = triton.testing.do_bench(call, warmup=25, rep=100, return_mode="median")
            print(f"round {r} {name:22s} fwd {flops / ms / 1e9:6.1f} TFLOP/s ({ms * 1e3:.0f} us)", flush=True)


if __name__ == "__main__":
    main()
