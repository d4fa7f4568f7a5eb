#!/usr/bin/env python
"""What the form of a score_mod costs: the benchmark's ALiBi, score + slope * (kv - q) (three
full-tile operations after the scale: a subtract, a multiply, an add), against the same bias
distributed over the two index vectors, (score + slope * kv) - slope * q (the multiplies on one
row / column, and score * scale + slope * kv is one FMA). Eager forward and forward+backward of ours
and compiled torch flex (B=4, H=16, S=4096, D=128, bf16), alternating, do_bench medians.

    python benchmarks/mod_form_probe.py [--rounds 2]
"""
from __future__ import annotations


import torch

from ab_timing import probe_parser


def main():
    ap = probe_parser(__doc__)
    ap.add_argument("--no-torch-flex", action="store_true")
    args = ap.parse_args()
    from ab_timing import fwd_fwdbwd_ms
    from inductor_flex import flex_attention
    from inductor_flex import variants as V

    H = 16

    def alibi_distributed(score, b, h, q_idx, kv_idx):
        slope = torch.exp2(-8.0 * (h + 1) / H)
        return (score + slope * kv_idx) - slope * q_idx

    mods = {"alibi": V.generate_alibi_bias(H), "alibi_distributed": alibi_distributed}
    B, S, D = args.B, args.S, 128
    q, k, v = (torch.randn(B, H, S, D, device="cuda", dtype=torch.bfloat16, requires_grad=True) for _ in range(3))
    dout = torch.randn_like(q)
    flops = 4 * B * H * S * S * D
    peers = {"ours": flex_attention}
    if not args.no_torch_flex:
        from torch.nn.attention.flex_attention import flex_attention as tfa
        peers["torch_flex"] = torch.compile(tfa, fullgraph=True)
    ref = {}
    for r in range(args.rounds):
        for peer, fa in peers.items():
            for name, mod in mods.items():
                with torch.no_grad():
                    out = fa(q, k, v, score_mod=mod)
                ref.setdefault(peer, out.float())
                err = (out.float() - ref[peer]).abs().max().item()
                fwd, fb = fwd_fwdbwd_ms(lambda: fa(q, k, v, score_mod=mod), (q, k, v), dout)
                print(f"round {r} {peer:10s} {name:18s} fwd {flops / fwd / 1e9:6.1f}  f+b {3.5 * flops / fb / 1e9:6.1f} "
                      f"TFLOP/s  diff vs alibi {err:.1e}", flush=True)


if __name__ == "__main__":
    main()
