#!/usr/bin/env python
"""How much score area a block-sparse kernel computes per useful score, by tile shape (CPU only).

A kernel walks every partial and full tile of its BlockMask and computes the whole tile, so its
useful TFLOP/s (what bench_attention.py reports: unmasked pairs only) is its raw rate divided by
computed area / useful area. This prints that ratio for the benchmark's masks on several tile
grids: torch flex's BlockMask blocks are 128 x 128 (its kernel computes every listed block whole),
ours are refined to 64 x 64 (refine_block_mask). At equal raw rate, ours / torch flex = ratio(128 x 128) / ratio(ours).

    python benchmarks/tile_area.py --case document --S 1024 [--seeds 0,1,2] [--tiles 128x128,64x64,64x32]
"""
from __future__ import annotations

import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from inductor_flex import create_block_mask  # noqa: E402
from bench_attention import document_ids  # noqa: E402


def mask_of(case: str, S: int, seed: int, num_docs: int, window: int, prefix: int):
    if case == "document":
        ids = document_ids(S, num_docs, seed)
        return lambda b, h, q, k: (ids[q] == ids[k]) & (q >= k)
    if case == "causal":
        return lambda b, h, q, k: q >= k
    if case == "sliding_window":
        return lambda b, h, q, k: (q >= k) & (q - k < window)
    if case == "prefix_lm":
        return lambda b, h, q, k: (q >= k) | (k < prefix)
    raise ValueError(f"--case must be document, causal, sliding_window or prefix_lm, got {case!r}")


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--case", default="document")
    ap.add_argument("--S", type=int, default=1024)
    ap.add_argument("--seeds", default="0", help="document split seeds (bench_attention.py --doc-seed)")
    ap.add_argument("--num-docs", type=int, default=8)
    ap.add_argument("--window", type=int, default=1024)
    ap.add_argument("--prefix", type=int, default=1024)
    ap.add_argument("--tiles", default="128x128,128x64,64x64,64x32,32x32")
    args = ap.parse_args()
    tiles = [tuple(int(x) for x in t.split("x")) for t in args.tiles.split(",")]
    q_idx = torch.arange(args.S)[:, None]
    kv_idx = torch.arange(args.S)[None, :]
    print(f"| seed | useful pairs | density | " + " | ".join(f"{m}x{n}" for m, n in tiles) + " |")
    print("|---|---|---|" + "---|" * len(tiles))
    for seed in (int(s) for s in args.seeds.split(",")):
        mod = mask_of(args.case, args.S, seed, args.num_docs, args.window, args.prefix)
        useful = int(mod(0, 0, q_idx, kv_idx).sum())
        cells = []
        for m, n in tiles:
            bm = create_block_mask(mod, None, None, args.S, args.S, device="cpu", BLOCK_SIZE=(m, n))
            tiles_walked = int(bm.partial_blocks().sum() + bm.full_blocks().sum())
            cells.append(f"{tiles_walked * m * n / useful:.2f}")
        print(f"| {seed} | {useful} | {useful / args.S ** 2:.3f} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
