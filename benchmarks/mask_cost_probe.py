#!/usr/bin/env python
"""What a document mask_mod's loads cost inside the kernels: the benchmark's document case
(S=1024, B=16, H=16, D=128, bf16, 8 causal docs) with three mask_mods that give the same mask:

  gather     the benchmark's generate_doc_mask_mod(causal, ids): loads ids[q], ids[kv], then the doc
             starts offsets[ids[q]], offsets[ids[kv]] (two dependent loads per side, every kv tile)
  same_doc   ids[q] == ids[kv] and q >= kv: one load per side
  arith      the doc of a position counted from the 7 doc boundaries as constants: no loads

Each is timed eager (forward, forward+backward; do_bench medians) for ours and compiled torch flex.
With --configs, ours' forward is also timed with each pinned tile config (BMxBNxWARPSxSTAGES) on the
benchmark's mask_mod.

    python benchmarks/mask_cost_probe.py [--S 1024 --B 16] [--configs 64x64x4x2,32x64x4x2] [--out DIR]
"""
from __future__ import annotations

import argparse
import json
import os
import sys

import torch
import triton.testing

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--S", type=int, default=1024)
    ap.add_argument("--B", type=int, default=16)
    ap.add_argument("--out", default=None)
    ap.add_argument("--no-torch-flex", action="store_true")
    ap.add_argument("--configs", default="", help="comma list of BMxBNxWARPSxSTAGES forward configs to pin")
    args = ap.parse_args()

    from ab_timing import fwd_fwdbwd_ms
    from bench_attention import document_ids
    from inductor_flex import create_block_mask, flex_attention
    from inductor_flex import variants as V

    S, B, H, D, dev = args.S, args.B, 16, 128, "cuda"
    ids = document_ids(S, 8, 0).to(dev)
    lengths = torch.bincount(ids.long()).tolist()
    bounds = [sum(lengths[:i + 1]) for i in range(len(lengths) - 1)]

    def same_doc(b, h, q_idx, kv_idx):
        return (ids[q_idx] == ids[kv_idx]) & (q_idx >= kv_idx)

    def doc_of(x):
        d = x * 0
        for s in bounds:
            d = d + (x >= s).to(torch.int32)
        return d

    def arith(b, h, q_idx, kv_idx):
        return (doc_of(q_idx) == doc_of(kv_idx)) & (q_idx >= kv_idx)

    mods = {"gather": V.generate_doc_mask_mod(V.generate_causal_mask(), ids), "same_doc": same_doc, "arith": arith}
    q, k, v = (torch.randn(B, H, S, D, device=dev, dtype=torch.bfloat16, requires_grad=True) for _ in range(3))
    dout = torch.randn(B, H, S, D, device=dev, dtype=torch.bfloat16)
    pairs = sum(n * (n + 1) // 2 for n in lengths)
    fwd_flops = 4 * B * H * pairs * D
    peers = {"ours": (flex_attention, create_block_mask)}
    if not args.no_torch_flex:
        from torch.nn.attention.flex_attention import create_block_mask as tcbm
        from torch.nn.attention.flex_attention import flex_attention as tfa
        peers["torch_flex"] = (torch.compile(tfa, fullgraph=True), tcbm)
    rows = []
    want = None
    for name, mm in mods.items():
        for peer, (fa, cbm) in peers.items():
            bm = cbm(mm, None, None, S, S, device=dev)
            with torch.no_grad():
                out = fa(q, k, v, block_mask=bm)
            if want is None:
                want = out.float()
            err = (out.float() - want).abs().max().item()
            fwd, fb = fwd_fwdbwd_ms(lambda: fa(q, k, v, block_mask=bm), (q, k, v), dout)
            row = {"mask_mod": name, "peer": peer, "fwd_ms": fwd, "fwdbwd_ms": fb,
                   "fwd_tflops": fwd_flops / fwd / 1e9, "fwdbwd_tflops": 3.5 * fwd_flops / fb / 1e9,
                   "max_abs_diff_vs_first": err}
            rows.append(row)
            print(f"{name:9s} {peer:10s} fwd {fwd * 1e3:7.1f} us ({row['fwd_tflops']:6.1f} TFLOP/s)  "
                  f"f+b {fb * 1e3:7.1f} us ({row['fwdbwd_tflops']:6.1f})  diff {err:.2e}", flush=True)
    bm = create_block_mask(mods["gather"], None, None, S, S, device=dev)
    for spec in [c for c in args.configs.split(",") if c.strip()]:
        bm_, bn, w, st = (int(x) for x in spec.split("x"))
        opts = {"BLOCK_M": bm_, "BLOCK_N": bn, "num_warps": w, "num_stages": st, "REFINE_BLOCK_MASK": True}
        try:
            with torch.no_grad():
                out = flex_attention(q, k, v, block_mask=bm, kernel_options=opts)
                err = (out.float() - want).abs().max().item()
                fwd = triton.testing.do_bench(lambda: flex_attention(q, k, v, block_mask=bm, kernel_options=opts),
                                              warmup=25, rep=100, return_mode="median")
            row = {"mask_mod": "gather", "peer": "ours", "config": spec, "fwd_ms": fwd,
                   "fwd_tflops": fwd_flops / fwd / 1e9, "max_abs_diff_vs_first": err}
            print(f"gather    ours {spec:12s} fwd {fwd * 1e3:7.1f} us ({row['fwd_tflops']:6.1f} TFLOP/s)  "
                  f"diff {err:.2e}", flush=True)
        except Exception as e:  # noqa: BLE001 - a config that does not build is reported, not fatal
            row = {"mask_mod": "gather", "peer": "ours", "config": spec, "error": f"{type(e).__name__}: {e}"[:300]}
            print(row, flush=True)
        rows.append(row)
    if args.out:
        os.makedirs(args.out, exist_ok=True)
        with open(os.path.join(args.out, f"mask_cost_S{S}.json"), "w") as f:
            json.dump({"device": torch.cuda.get_device_name(), "S": S, "B": B, "lengths": lengths, "rows": rows}, f,
                      indent=1)


if __name__ == "__main__":
    main()
