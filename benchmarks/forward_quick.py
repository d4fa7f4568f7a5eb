"""Quick forward-only comparison on one GPU: ours (eager) vs torch flex (compiled) vs SDPA.

python benchmarks/forward_quick.py [--out results.json]
"""
import argparse
import json
import time

import torch
import torch.nn.functional as Fn
import triton.testing

import inductor_flex as ours
from inductor_flex.variants import (
    generate_alibi_bias, generate_causal_mask, generate_doc_mask_mod, generate_sliding_window, generate_tanh_softcap,
)


def doc_ids(S, n_docs, device):
    g = torch.Generator().manual_seed(0)
    cuts = torch.sort(torch.randperm(S - 1, generator=g)[: n_docs - 1] + 1).values
    ids = torch.zeros(S, dtype=torch.int32)
    ids[cuts] = 1
    return ids.cumsum(0).to(torch.int32).to(device)


def cases(S, H):
    ids = doc_ids(S, max(2, S // 512), "cuda")
    return {
        "noop": (None, None),
        "causal": (None, generate_causal_mask()),
        "alibi": (generate_alibi_bias(H), None),
        "softcap": (generate_tanh_softcap(30.0), None),
        "sliding1024": (None, generate_sliding_window(1024)),
        "document": (None, generate_doc_mask_mod(generate_causal_mask(), ids)),
    }


def density(mask_mod, S):
    if mask_mod is None:
        return 1.0
    m = ours.create_mask(mask_mod, 1, 1, S, S, device="cuda")
    return m.float().mean().item()


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=None)
    ap.add_argument("--shapes", default="4096x4,1024x16")
    ap.add_argument("--dim", type=int, default=128)
    ap.add_argument("--cases", default="noop,causal,alibi,softcap,sliding1024,document")
    args = ap.parse_args()
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.nn.attention import flex_attention as tf

    torch_flex = torch.compile(tf.flex_attention)
    H, D = 16, args.dim
    rows = []
    for shape in args.shapes.split(","):
        S, B = map(int, shape.split("x"))
        q, k, v = (torch.randn(B, H, S, D, device="cuda", dtype=torch.bfloat16) for _ in range(3))
        for name, (sm, mm) in cases(S, H).items():
            if name not in args.cases.split(","):
                continue
            if S <= 1024 and name not in ("document", "causal", "noop"):
                continue
            dens = density(mm, S)
            flops = 4 * B * H * S * S * D * dens
            row = {"case": name, "S": S, "B": B, "D": D, "density": dens}
            bm_ours = ours.create_block_mask(mm, None, None, S, S, device="cuda") if mm else None
            bm_tf = tf.create_block_mask(mm, None, None, S, S, device="cuda") if mm else None
            peers = {
                "ours": lambda: ours.flex_attention(q, k, v, score_mod=sm, block_mask=bm_ours),
                "torch_flex": lambda: torch_flex(q, k, v, score_mod=sm, block_mask=bm_tf),
            }
            if name in ("noop", "causal"):
                for label, be in (("sdpa_flash", SDPBackend.FLASH_ATTENTION), ("sdpa_cudnn", SDPBackend.CUDNN_ATTENTION)):
                    def f(be=be):
                        with sdpa_kernel(be):
                            return Fn.scaled_dot_product_attention(q, k, v, is_causal=name == "causal")
                    peers[label] = f
            ref = None
            for label, fn in peers.items():
                try:
                    t0 = time.time()
                    out = fn()
                    torch.cuda.synchronize()
                    row[f"{label}_first_s"] = round(time.time() - t0, 2)
                    if ref is None:
                        ref = out
                    else:
                        row[f"{label}_maxdiff_vs_ours"] = (out.float() - ref.float()).abs().max().item()
                    ms = triton.testing.do_bench(fn, warmup=25, rep=100)
                    row[f"{label}_ms"] = ms
                    row[f"{label}_tflops"] = flops / ms / 1e9
                except Exception as e:  # noqa: BLE001
                    row[f"{label}_error"] = f"{type(e).__name__}: {str(e)[:200]}"
            for peer in ("torch_flex", "sdpa_cudnn", "sdpa_flash"):
                if f"{peer}_tflops" in row and "ours_tflops" in row:
                    row[f"ours_over_{peer}"] = row["ours_tflops"] / row[f"{peer}_tflops"]
            rows.append(row)
            print(" | ".join(f"{k}={v:.3g}" if isinstance(v, float) else f"{k}={v}" for k, v in row.items()), flush=True)
    meta = {"gpu": torch.cuda.get_device_name(), "torch": torch.__version__, "triton": triton.__version__,
            "date": time.strftime("%Y-%m-%d")}
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"meta": meta, "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
