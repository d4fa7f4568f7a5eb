#!/usr/bin/env python
"""Decode benchmark: one query token per sequence against a long KV cache (bf16, GQA).

Shape (the issue's): B=8, Hq=32, Hkv=8, D=128, Lq=1, S_kv in 1024, 8192, 32768, 65536.
Metric: K+V bytes read per second = 2 * B * Hkv * S_kv * D * 2 bytes / time (higher is better).

Peers
  ours_eager        inductor_flex.flex_attention (AUTO picks the decode kernel), called from Python
  ours_graph        the same call captured in a CUDA graph: kernel time without Python overhead
  ours_compiled     torch.compile(inductor_flex.flex_attention): the decode op inside a compiled graph
  ours_compiled_graph  the compiled call captured in a CUDA graph
  ours_paged_eager  over a PagedKVCache pool with shuffled pages (converted BlockMask)
  ours_paged_graph  the same, CUDA graph
  torch_flex        torch.compile(torch.nn.attention.flex_attention) - a comparison only
  sdpa              F.scaled_dot_product_attention(enable_gqa=True)

Every failure is recorded as "error: ..." and the run goes on; results are rewritten after each S.

    python benchmarks/bench_decode.py --out benchmarks/results
"""
from __future__ import annotations

import argparse
import itertools
import datetime as _dt
import json
import os
import sys
import time
import traceback
from types import SimpleNamespace

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from inductor_flex import create_block_mask, flex_attention  # noqa: E402
from inductor_flex import decode as D  # noqa: E402
from inductor_flex.paged import PagedKVCache  # noqa: E402

PEERS = ("ours_eager", "ours_graph", "ours_compiled", "ours_compiled_graph", "ours_paged_eager", "ours_paged_graph",
         "torch_flex", "sdpa")
HOST_TIMED = ("ours_eager", "ours_compiled", "ours_paged_eager")


# How a timed call meets the L2 cache (--l2):
#   rotate  (default) calls cycle through copies of the inputs that together exceed twice the L2, so
#           each reads its K/V from HBM, and nothing is written between calls
#   flush   do_bench's: a 256 MB buffer is zeroed before every call (L2 then holds dirty lines that
#           the timed call's reads must first write back: a few microseconds of a 0.1 ms call)
#   warm    back-to-back calls on one input set (its tail may still be in L2)
L2_MODE = ["rotate"]


def bench_ms(fn) -> float:
    import triton.testing

    if L2_MODE[0] == "flush":
        return triton.testing.do_bench(fn, warmup=25, rep=200, return_mode="median")
    for _ in range(10):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(15):  # batches of back-to-back calls: their throughput, host time included
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(20):
            fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / 20)
    return sorted(times)[len(times) // 2]


def cycling(calls):
    """One callable that runs calls[0], calls[1], ... in turn."""
    if len(calls) == 1:
        return calls[0]
    it = itertools.cycle(calls)
    return lambda: next(it)()


def input_copies(nbytes: int) -> int:
    if L2_MODE[0] != "rotate":
        return 1
    l2 = getattr(torch.cuda.get_device_properties(0), "L2_cache_size", 50 << 20)
    return max(2, -(-2 * l2 // nbytes) + 1)


def graph_of(fn):
    fn()
    torch.cuda.synchronize()
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        fn()
    return g.replay


def host_us(fn, n=50) -> float:
    """Python time per call (no sync): what an eager decode step costs the CPU."""
    fn()
    torch.cuda.synchronize()
    t = time.perf_counter()
    for _ in range(n):
        fn()
    host = (time.perf_counter() - t) / n * 1e6
    torch.cuda.synchronize()
    return host


def run_shape(S, B, Hq, Hkv, Dh, page_size, torch_flex_ok):
    dev, dt = "cuda", torch.bfloat16
    nbytes = 2 * B * Hkv * S * Dh * 2
    res = {"S": S, "bytes": nbytes}

    # paged pool with shuffled pages, one page table for every input copy: the same K/V, scattered
    n_pages = B * (S // page_size)
    cache = PagedKVCache(n_pages, page_size, B, device=dev)
    g = torch.Generator().manual_seed(0)
    cache.free_pages = [cache.free_pages[i] for i in torch.randperm(n_pages, generator=g).tolist()]
    for b in range(B):
        cache.reserve(b, S)
    idx = torch.arange(B, device=dev)
    logical = create_block_mask(None, None, None, 1, S, device=dev, BLOCK_SIZE=128)
    phys = cache.convert_logical_block_mask(logical, idx)

    sets = []
    for _ in range(input_copies(nbytes)):
        s = SimpleNamespace(q=torch.randn(B, Hq, 1, Dh, dtype=dt, device=dev),
                            k=torch.randn(B, Hkv, S, Dh, dtype=dt, device=dev),
                            v=torch.randn(B, Hkv, S, Dh, dtype=dt, device=dev))
        k_pool = torch.empty(1, Hkv, cache.capacity, Dh, dtype=dt, device=dev)
        v_pool = torch.empty_like(k_pool)
        cache.assign(idx, torch.arange(S, device=dev)[None].expand(B, S), s.k, s.v, k_pool, v_pool)
        s.kp, s.vp = k_pool.expand(B, -1, -1, -1), v_pool.expand(B, -1, -1, -1)
        sets.append(s)
    res["input_copies"] = len(sets)

    def ours(s):
        return lambda: flex_attention(s.q, s.k, s.v, enable_gqa=True)

    def paged(s):
        return lambda: flex_attention(s.q, s.kp, s.vp, block_mask=phys, enable_gqa=True)

    def compiled_peer(fn):
        compiled = torch.compile(fn, fullgraph=True)
        return lambda s: (lambda: compiled(s.q, s.k, s.v, enable_gqa=True))

    # peer -> () -> (input copy -> call); compiled peers compile once for all copies
    makers = {
        "ours_eager": lambda: ours,
        "ours_graph": lambda: (lambda s: graph_of(ours(s))),
        "ours_compiled": lambda: compiled_peer(flex_attention),
        "ours_paged_eager": lambda: paged,
        "ours_paged_graph": lambda: (lambda s: graph_of(paged(s))),
        "sdpa": lambda: (lambda s: (lambda: F.scaled_dot_product_attention(s.q, s.k, s.v, enable_gqa=True))),
    }

    def compiled_graph():
        make = compiled_peer(flex_attention)
        return lambda s: graph_of(make(s))

    makers["ours_compiled_graph"] = compiled_graph
    if torch_flex_ok:
        def torch_flex_maker():
            from torch.nn.attention.flex_attention import flex_attention as tfa

            return compiled_peer(tfa)
        makers["torch_flex"] = torch_flex_maker

    s0 = sets[0]
    ref = F.scaled_dot_product_attention(s0.q.float(), s0.k.float(), s0.v.float(), enable_gqa=True)
    for peer in PEERS:
        if peer not in makers:
            res[peer] = "skipped"
            continue
        try:
            make = makers[peer]()
            calls = [make(s) for s in sets]
            out = None if peer.endswith("graph") else calls[0]()
            torch.cuda.synchronize()
            if out is not None:
                err = (out.float() - ref).abs().max().item()
                if err > 2e-2:
                    raise AssertionError(f"max error {err:.3e} vs fp32 SDPA")
            call = cycling(calls)
            ms = bench_ms(call)
            entry = {"ms": ms, "TB/s": nbytes / (ms * 1e-3) / 1e12}
            if peer in HOST_TIMED:
                entry["host_us_per_call"] = host_us(call)
            res[peer] = entry
        except Exception as e:  # noqa: BLE001
            res[peer] = f"error: {type(e).__name__}: {str(e)[:300]}"
            traceback.print_exc()
    # the plans of this S: key shape (B, Hkv, S) contiguous, (B, Hkv, B * S) for the page pool
    res["decode_configs"] = {
        ("paged" if key[3][2] == B * S else "contiguous"): f"{p.config} split={p.split} heads={p.heads}"
        for key, p in D._plans.items() if p.config is not None and key[3][2] in (S, B * S)}
    return res


def to_markdown(meta, rows) -> str:
    lines = [f"# Decode benchmark ({meta['device']}, torch {meta['torch']}, triton {meta['triton']})", "",
             f"B={meta['B']}, Hq={meta['Hq']}, Hkv={meta['Hkv']}, D={meta['D']}, Lq=1, bf16; "
             "K+V TB/s (ms); eager rows also give the host time per call; "
             + {"flush": "L2 cleared before every call (do_bench).",
                "warm": "back-to-back calls on one input set, no L2 clearing (--l2 warm).",
                "rotate": "back-to-back calls cycling through input copies that exceed twice the L2 "
                          "(--l2 rotate): every call reads K/V from HBM."}[meta.get("l2", "flush")], "",
             "| S_kv | " + " | ".join(PEERS) + " |", "|---|" + "---|" * len(PEERS)]
    for r in rows:
        cells = []
        for p in PEERS:
            e = r.get(p)
            if isinstance(e, dict):
                c = f"{e['TB/s']:.2f} ({e['ms']:.3f})"
                if "host_us_per_call" in e:
                    c += f" host {e['host_us_per_call']:.0f}us"
                cells.append(c)
            else:
                cells.append(str(e)[:40])
        lines.append(f"| {r['S']} | " + " | ".join(cells) + " |")
    lines.append("")
    for r in rows:
        lines.append(f"- S={r['S']} decode plans: {r.get('decode_configs')}")
    return "\n".join(lines) + "\n"


def sweep(S, B, Hq, Hkv, Dh, splits, extra=None):
    """CUDA-graph time of the decode kernel for every (tile config, split) pinned through kernel_options."""
    from inductor_flex.lowering.decode_configs import decode_configs

    dev, dt = "cuda", torch.bfloat16
    nbytes = 2 * B * Hkv * S * Dh * 2
    sets = [(torch.randn(B, Hq, 1, Dh, dtype=dt, device=dev), torch.randn(B, Hkv, S, Dh, dtype=dt, device=dev),
             torch.randn(B, Hkv, S, Dh, dtype=dt, device=dev)) for _ in range(input_copies(nbytes))]
    q = sets[0][0]
    rows = []
    for cfg in decode_configs(Dh, Dh, dt, 128, q.device):
        for split in splits:
            opts = {"BACKEND": "TRITON_DECODE", "BLOCK_N": cfg.BLOCK_N, "num_warps": cfg.num_warps,
                    "num_stages": cfg.num_stages, "SPLIT_KV": split, **(extra or {})}
            try:
                ms = bench_ms(cycling([graph_of(lambda q=q, k=k, v=v: flex_attention(q, k, v, enable_gqa=True,
                                                                                    kernel_options=opts))
                                       for q, k, v in sets]))
                rows.append({"S": S, "config": str(cfg), "split": split, "options": extra or {}, "ms": ms, "TB/s": nbytes / (ms * 1e-3) / 1e12})
            except Exception as e:  # noqa: BLE001
                rows.append({"S": S, "config": str(cfg), "split": split, "error": f"{type(e).__name__}: {e}"[:200]})
            print(rows[-1], flush=True)
    return rows


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="benchmarks/results", help="directory or .json path")
    ap.add_argument("--seqs", default="8192,65536,1024,32768")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--hq", type=int, default=32)
    ap.add_argument("--hkv", type=int, default=8)
    ap.add_argument("--dim", type=int, default=128)
    ap.add_argument("--page-size", type=int, default=128)
    ap.add_argument("--no-torch-flex", action="store_true")
    ap.add_argument("--max-seconds", type=float, default=240, help="skip torch_flex compiles past this")
    ap.add_argument("--sweep", default="", help="comma-separated split counts: time every tile config x split "
                    "(CUDA graph) instead of the peers, e.g. --sweep 2,4,5,8,16,32")
    ap.add_argument("--l2", choices=("rotate", "flush", "warm"), default="rotate",
                    help="how timed calls meet the L2 (see L2_MODE); results before 2026-11-26 used flush")
    ap.add_argument("--kernel-options", default="{}",
                    help='JSON kernel_options added to every --sweep call, e.g. \'{"USE_TMA": true}\'')
    args = ap.parse_args()
    L2_MODE[0] = args.l2
    if not torch.cuda.is_available():
        sys.exit("bench_decode.py needs a CUDA GPU")
    import triton

    out = args.out
    if not out.endswith(".json"):
        os.makedirs(out, exist_ok=True)
        out = os.path.join(out, f"decode_{_dt.date.today().isoformat()}.json")
    else:
        os.makedirs(os.path.dirname(out) or ".", exist_ok=True)
    meta = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "triton": triton.__version__,
            "B": args.batch, "Hq": args.hq, "Hkv": args.hkv, "D": args.dim, "page_size": args.page_size,
            "l2": L2_MODE[0]}
    if args.sweep:
        splits = [int(x) for x in args.sweep.split(",")]
        rows = [r for S in args.seqs.split(",")
                for r in sweep(int(S), args.batch, args.hq, args.hkv, args.dim, splits, json.loads(args.kernel_options))]
        with open(out[:-5] + "_sweep.json", "w") as f:
            json.dump({"meta": meta, "sweep": rows}, f, indent=1)
        return
    rows = []
    t0 = time.time()
    for S in [int(s) for s in args.seqs.split(",")]:
        ok = not args.no_torch_flex and time.time() - t0 < args.max_seconds
        r = run_shape(S, args.batch, args.hq, args.hkv, args.dim, args.page_size, ok)
        rows.append(r)
        with open(out, "w") as f:
            json.dump({"meta": meta, "results": rows}, f, indent=1)
        md = to_markdown(meta, rows)
        with open(out[:-5] + ".md", "w") as f:
            f.write(md)
        print(md, flush=True)
        torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
