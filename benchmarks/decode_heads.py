#!/usr/bin/env python
"""Decode variants the default plan does not take, timed in one process under do_bench's L2 flush
(B=8, Hq=32, Hkv=8, D=128, bf16, S=8192 and 65536): query heads per program (the whole GQA group of
4 by default; 2 or 1 read each K/V tile from more programs) x split count x BLOCK_N / stages,
against SDPA; prints each variant's largest difference from SDPA's output. Writes $OUT/decode_heads.json.

    python benchmarks/decode_heads.py
"""
import json
import os
import torch, triton.testing
import torch.nn.functional as F
import inductor_flex.decode as dec
from inductor_flex import flex_attention

orig = dec._heads_per_program
B, Hq, Hkv, D = 8, 32, 8, 128
rows = []
for S in (8192, 65536):
    q = torch.randn(B, Hq, 1, D, dtype=torch.bfloat16, device="cuda")
    k = torch.randn(B, Hkv, S, D, dtype=torch.bfloat16, device="cuda")
    v = torch.randn_like(k)
    ref = F.scaled_dot_product_attention(q, k, v, enable_gqa=True)
    nbytes = 2 * k.numel() * 2
    variants = [("h4 auto", 4, {}), ("h2 s1", 2, {"SPLIT_KV": 1}), ("h2 s2", 2, {"SPLIT_KV": 2}),
                ("h1 s1", 1, {"SPLIT_KV": 1}), ("h4 s2 bn128", 4, {"SPLIT_KV": 2, "BLOCK_N": 128}),
                ("h2 s1 bn128", 2, {"SPLIT_KV": 1, "BLOCK_N": 128}), ("h2 s1 st4", 2, {"SPLIT_KV": 1, "num_stages": 4}),
                ("h4 s3", 4, {"SPLIT_KV": 3}), ("h4 s4", 4, {"SPLIT_KV": 4})]
    if S == 65536:
        variants += [("h2 s2 ", 2, {"SPLIT_KV": 2}), ("h2 s4", 2, {"SPLIT_KV": 4}), ("h1 s2", 1, {"SPLIT_KV": 2})]
    for rep in range(2):
        for name, heads, opts in variants:
            dec._heads_per_program = lambda g, Lq, mh, h=heads: h if mh == 1 else 1
            dec._plans.clear()
            fn = lambda: flex_attention(q, k, v, enable_gqa=True, kernel_options=dict(opts, BACKEND="TRITON_DECODE"))
            out = fn()
            err = (out.float() - ref.float()).abs().max().item()
            ms = triton.testing.do_bench(fn, warmup=25, rep=200, return_mode="median")
            rows.append(dict(S=S, variant=name, rep=rep, ms=ms, tbs=nbytes / ms / 1e9, err=err))
            print(f"S={S} {name:14s} rep{rep} {ms*1e3:7.1f} us {nbytes/ms/1e9:5.2f} TB/s err {err:.2e}", flush=True)
        ms = triton.testing.do_bench(lambda: F.scaled_dot_product_attention(q, k, v, enable_gqa=True), warmup=25, rep=200, return_mode="median")
        print(f"S={S} sdpa rep{rep} {ms*1e3:7.1f} us {nbytes/ms/1e9:5.2f} TB/s", flush=True)
        rows.append(dict(S=S, variant="sdpa", rep=rep, ms=ms, tbs=nbytes / ms / 1e9))
json.dump(rows, open(os.path.join(os.environ.get("OUT", "/tmp"), "decode_heads.json"), "w"), indent=1)
