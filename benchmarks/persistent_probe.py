"""Probe: do short block-sparse rows (packed documents at S=1024) run faster in a persistent forward?

The benchmark's document forward at S=1024, B=16 runs 4096 programs of 64 query rows that walk 1 to
10 kv tiles each (4.3 on average), so each program's fixed costs (Q load, pipeline fill, O/LSE
store) weigh as much as its tiles. A minimal document forward (D=128, 64 x 64 tiles, the
document-causal mask on every tile; no templates involved) written three ways:

  grid       one program per (query tile, batch x head), as the templates launch
  persist    a grid of `programs` that each loop over tiles t = pid, pid + P, ... (grid order, so
             the programs running together still share their heads' K/V in L2)
  flatten    the same loop with tl.range(flatten=True): Triton fuses the tile loop and the kv loop
             into one software-pipelined loop, so the next tile's loads can overlap this tile's
             epilogue

    python benchmarks/persistent_probe.py            # CPU: sm_90 cross-compile of every variant
    python benchmarks/persistent_probe.py --gpu      # GPU: us per forward, max error vs float64
"""
import argparse
import os
import sys

import torch
import triton
import triton.language as tl

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

LOG2E = 1.4426950408889634


@triton.jit
def _doc_step(q, k, v, ids_q, ids_k, offs_m, offs_n, m_i, l_i, acc, qk_scale):
    """One kv tile of the document-causal online softmax (the mask on every tile)."""
    qk = tl.dot(q, tl.trans(k))
    keep = (ids_q[:, None] == ids_k[None, :]) & (offs_m[:, None] >= offs_n[None, :])
    s = tl.where(keep, qk * qk_scale, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(s, 1))
    # a row of a later document sees no key in its tile's first kv tiles: keep exp2's argument finite
    m_use = tl.where(m_new == float("-inf"), 0.0, m_new)
    alpha = tl.math.exp2(m_i - m_use)
    p = tl.math.exp2(s - m_use[:, None])
    l_i = l_i * alpha + tl.sum(p, 1)
    acc = acc * alpha[:, None]
    acc = tl.dot(p.to(v.dtype), v, acc)
    return m_new, l_i, acc


@triton.jit
def _doc_tile(Q, K, V, O, LSE, IDS, KV_LO, tile, S, n_m, qk_scale,
              BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, D: tl.constexpr):
    m = tile % n_m
    bh = tile // n_m
    base = bh.to(tl.int64) * S * D
    offs_m = m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, D)
    q = tl.load(Q + base + offs_m[:, None] * D + offs_d[None, :])
    ids_q = tl.load(IDS + offs_m)
    lo = tl.load(KV_LO + m)
    hi = (m * BLOCK_M + BLOCK_M - 1) // BLOCK_N + 1
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, D], tl.float32)
    for n in range(lo, hi):
        offs_n = n * BLOCK_N + tl.arange(0, BLOCK_N)
        k = tl.load(K + base + offs_n[:, None] * D + offs_d[None, :])
        v = tl.load(V + base + offs_n[:, None] * D + offs_d[None, :])
        ids_k = tl.load(IDS + offs_n)
        m_i, l_i, acc = _doc_step(q, k, v, ids_q, ids_k, offs_m, offs_n, m_i, l_i, acc, qk_scale)
    acc = acc / l_i[:, None]
    tl.store(O + base + offs_m[:, None] * D + offs_d[None, :], acc.to(O.dtype.element_ty))
    tl.store(LSE + bh.to(tl.int64) * S + offs_m, m_i + tl.math.log2(l_i))


@triton.jit
def doc_fwd_grid(Q, K, V, O, LSE, IDS, KV_LO, S, n_m, qk_scale,
                 BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, D: tl.constexpr):
    tile = tl.program_id(1) * n_m + tl.program_id(0)
    _doc_tile(Q, K, V, O, LSE, IDS, KV_LO, tile, S, n_m, qk_scale, BLOCK_M, BLOCK_N, D)


@triton.jit
def doc_fwd_persist(Q, K, V, O, LSE, IDS, KV_LO, S, n_m, n_tiles, qk_scale,
                    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, D: tl.constexpr, FLATTEN: tl.constexpr):
    for tile in tl.range(tl.program_id(0), n_tiles, tl.num_programs(0), flatten=FLATTEN):
        _doc_tile(Q, K, V, O, LSE, IDS, KV_LO, tile, S, n_m, qk_scale, BLOCK_M, BLOCK_N, D)


@triton.jit
def doc_fwd_flat(Q, K, V, O, LSE, IDS, ITEM_START, ITEM_TILE, ITEM_N, ITEM_FLAGS, S, n_m, qk_scale,
                 BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, D: tl.constexpr, Q_ONCE: tl.constexpr):
    """One loop over this program's (query tile, kv tile) work items, listed by the host: the
    pipeliner then prefetches the next tile's K/V (and Q) across query-tile boundaries."""
    pid = tl.program_id(0)
    start = tl.load(ITEM_START + pid)
    end = tl.load(ITEM_START + pid + 1)
    offs_d = tl.arange(0, D)
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, D], tl.float32)
    q = tl.zeros([BLOCK_M, D], Q.dtype.element_ty)
    for it in range(start, end):
        tile = tl.load(ITEM_TILE + it)
        n = tl.load(ITEM_N + it)
        flags = tl.load(ITEM_FLAGS + it)
        first = (flags & 1) != 0
        m = tile % n_m
        bh = tile // n_m
        base = bh.to(tl.int64) * S * D
        offs_m = m * BLOCK_M + tl.arange(0, BLOCK_M)
        if Q_ONCE:
            load_q = ((offs_m[:, None] * 0 + flags) & 1) != 0  # (a scalar mask trips the interpreter)
            q_new = tl.load(Q + base + offs_m[:, None] * D + offs_d[None, :], mask=load_q, other=0.0)
            q = tl.where(first, q_new, q)
        else:
            q = tl.load(Q + base + offs_m[:, None] * D + offs_d[None, :])
        ids_q = tl.load(IDS + offs_m)
        offs_n = n * BLOCK_N + tl.arange(0, BLOCK_N)
        k = tl.load(K + base + offs_n[:, None] * D + offs_d[None, :])
        v = tl.load(V + base + offs_n[:, None] * D + offs_d[None, :])
        ids_k = tl.load(IDS + offs_n)
        # a new query tile starts from an empty softmax state: alpha = exp2(-inf) = 0 clears acc
        m_i = tl.where(first, float("-inf"), m_i)
        l_i = tl.where(first, 0.0, l_i)
        m_i, l_i, acc = _doc_step(q, k, v, ids_q, ids_k, offs_m, offs_n, m_i, l_i, acc, qk_scale)
        if (flags & 2) != 0:
            tl.store(O + base + offs_m[:, None] * D + offs_d[None, :], (acc / l_i[:, None]).to(O.dtype.element_ty))
            tl.store(LSE + bh.to(tl.int64) * S + offs_m, m_i + tl.math.log2(l_i))


def flat_items(lo: torch.Tensor, n_m: int, BH: int, BLOCK_M: int, BLOCK_N: int, programs: int,
               greedy: bool = False):
    """(start, tile, n, flags) of doc_fwd_flat. Round robin: program p takes tiles p, p + P, ... in
    grid order. Greedy: each window of P consecutive tiles (so the programs running together still
    share heads) goes out longest tile first, each to the program with the least work so far."""
    import heapq
    lo = lo.cpu().tolist()
    hi = [(m * BLOCK_M + BLOCK_M - 1) // BLOCK_N + 1 for m in range(n_m)]
    n_tiles = n_m * BH
    owned = [[] for _ in range(programs)]
    if greedy:
        heap = [(0, p) for p in range(programs)]
        for w in range(0, n_tiles, programs):
            window = sorted(range(w, min(w + programs, n_tiles)), key=lambda t: lo[t % n_m] - hi[t % n_m])
            for t in window:
                load, p = heapq.heappop(heap)
                owned[p].append(t)
                heapq.heappush(heap, (load + hi[t % n_m] - lo[t % n_m] + 1, p))  # +1: a tile's fixed cost
    else:
        for t in range(n_tiles):
            owned[t % programs].append(t)
    start, tiles, ns, flags = [0], [], [], []
    for p in range(programs):
        for t in owned[p]:
            m = t % n_m
            for n in range(lo[m], hi[m]):
                tiles.append(t)
                ns.append(n)
                flags.append((n == lo[m]) | ((n == hi[m] - 1) << 1))
        start.append(len(tiles))
    return [torch.tensor(x, dtype=torch.int32) for x in (start, tiles, ns, flags)]


def kv_lo(ids: torch.Tensor, BLOCK_M: int, BLOCK_N: int) -> torch.Tensor:
    """First kv tile of each query tile: the tile holding the start of its first row's document."""
    S = ids.numel()
    starts = torch.searchsorted(ids.contiguous(), ids, right=False)  # first index of each token's doc
    first_row = torch.arange(0, S, BLOCK_M, device=ids.device)
    return (starts[first_row] // BLOCK_N).to(torch.int32)


def cross_compile(args_dump=True):
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    base = {"Q": "*bf16", "K": "*bf16", "V": "*bf16", "O": "*bf16", "LSE": "*fp32", "IDS": "*i32",
            "KV_LO": "*i32", "S": "i32", "n_m": "i32"}
    for name, fn, extra, consts in (
            ("grid", doc_fwd_grid, {}, {}),
            ("persist", doc_fwd_persist, {"n_tiles": "i32"}, {"FLATTEN": False}),
            ("flatten", doc_fwd_persist, {"n_tiles": "i32"}, {"FLATTEN": True}),
            ("flat", doc_fwd_flat, {}, {"Q_ONCE": False}),
            ("flat_q1", doc_fwd_flat, {}, {"Q_ONCE": True})):
        if fn is doc_fwd_flat:
            sig = {k: v for k, v in base.items() if k != "KV_LO"}
            sig = dict(list(sig.items())[:6] + [("ITEM_START", "*i32"), ("ITEM_TILE", "*i32"), ("ITEM_N", "*i32"),
                                                ("ITEM_FLAGS", "*i32")] + list(sig.items())[6:])
        else:
            sig = dict(base, **extra)
        sig.update(qk_scale="fp32", BLOCK_M="constexpr", BLOCK_N="constexpr", D="constexpr")
        for c in consts:
            sig[c] = "constexpr"
        c = dict(BLOCK_M=64, BLOCK_N=64, D=128, **consts)
        attrs = {(i,): [["tt.divisibility", 16]] for i in range(10 if fn is doc_fwd_flat else 7)}
        for stages in (2, 3):
            try:
                k = triton.compile(ASTSource(fn=fn, signature=sig, constexprs=c, attrs=attrs),
                                   target=GPUTarget("cuda", 90, 32), options={"num_warps": 4, "num_stages": stages})
                ttgir = k.asm["ttgir"]
                print(f"{name:8s} stages={stages}: ok, async copies {ttgir.count('async_copy_global_to_local')}, "
                      f"scf.for {ttgir.count('scf.for')}, shared {k.metadata.shared} B, regs? spills n/a", flush=True)
                if args_dump:
                    open(f"/tmp/pp_{name}_{stages}.ttgir", "w").write(ttgir)
            except Exception as e:  # noqa: BLE001 - report and go on
                print(f"{name:8s} stages={stages}: FAILED {type(e).__name__}: {str(e)[:300]}", flush=True)


def gpu(args):
    from triton.testing import do_bench

    from bench_attention import document_ids

    dev = torch.device("cuda")
    B, H, S, D, BM, BN = args.B, 16, args.S, 128, 64, 64
    ids = document_ids(S, 8, 0).to(device=dev, dtype=torch.int32)
    g = torch.Generator(device=dev).manual_seed(0)
    q, k, v = (torch.randn(B, H, S, D, device=dev, dtype=torch.bfloat16, generator=g) for _ in range(3))
    lo = kv_lo(ids, BM, BN)
    n_m = S // BM
    n_tiles = n_m * B * H
    qk_scale = D ** -0.5 * LOG2E
    keep = (ids[:, None] == ids[None, :]) & torch.ones(S, S, dtype=torch.bool, device=dev).tril()
    sref = (q.double() @ k.double().transpose(-1, -2)) * D ** -0.5
    ref = torch.softmax(sref.masked_fill(~keep, float("-inf")), -1) @ v.double()
    del sref
    n_sm = torch.cuda.get_device_properties(dev).multi_processor_count

    # the eager product as it runs today, for scale
    from inductor_flex import create_block_mask, flex_attention
    idc = ids.long()
    bm = create_block_mask(lambda b, h, qi, ki: (idc[qi] == idc[ki]) & (qi >= ki), None, None, S, S, device=dev)
    f = lambda: flex_attention(q, k, v, block_mask=bm)  # noqa: E731
    f()
    print(f"inductor_flex eager forward: {do_bench(f, warmup=50, rep=300) * 1e3:.1f} us", flush=True)

    variants = [("grid", None, None)]
    for per_sm in (2, 3):
        variants.append(("persist", per_sm, False))
    for per_sm in (1, 2, 3):
        for q_once in (False, True):
            for greedy in (False, True):
                variants.append(("flat", per_sm, (q_once, greedy)))
    items = {}

    def launcher(name, per_sm, opt, stages, o, lse):
        if name == "grid":
            return lambda: doc_fwd_grid[(n_m, B * H)](
                q, k, v, o, lse, ids, lo, S, n_m, qk_scale, BLOCK_M=BM, BLOCK_N=BN, D=D,
                num_warps=4, num_stages=stages)
        P = min(n_tiles, per_sm * n_sm)
        if name == "persist":
            return lambda: doc_fwd_persist[(P,)](
                q, k, v, o, lse, ids, lo, S, n_m, n_tiles, qk_scale, BLOCK_M=BM, BLOCK_N=BN, D=D,
                FLATTEN=False, num_warps=4, num_stages=stages)
        q_once, greedy = opt
        if (P, greedy) not in items:
            items[P, greedy] = [x.to(dev) for x in flat_items(lo, n_m, B * H, BM, BN, P, greedy)]
        st, it_t, it_n, it_f = items[P, greedy]
        return lambda: doc_fwd_flat[(P,)](
            q, k, v, o, lse, ids, st, it_t, it_n, it_f, S, n_m, qk_scale, BLOCK_M=BM, BLOCK_N=BN, D=D,
            Q_ONCE=q_once, num_warps=4, num_stages=stages)

    for rnd in range(args.rounds):
        for name, per_sm, opt in variants:
            for stages in (2, 3):
                o = torch.empty_like(q)
                lse = torch.empty(B, H, S, device=dev, dtype=torch.float32)
                label = name if per_sm is None else f"{name} x{per_sm}/SM"
                if name == "flat":
                    label += (" q_once" if opt[0] else "") + (" greedy" if opt[1] else "")
                label += f" stages={stages}"
                fn = launcher(name, per_sm, opt, stages, o, lse)
                try:
                    ck = fn()
                    err = (o.double() - ref).abs().max().item()
                    us = do_bench(fn, warmup=50, rep=300) * 1e3
                    res = f"regs {getattr(ck, 'n_regs', '?')} spills {getattr(ck, 'n_spills', '?')}"
                    print(f"round {rnd} {label:36s}: {us:7.1f} us  max err {err:.2e}  {res}", flush=True)
                except Exception as e:  # noqa: BLE001
                    print(f"round {rnd} {label:28s}: FAILED {type(e).__name__}: {str(e)[:200]}", flush=True)


if __name__ == "__main__":
    ap = argparse.ArgumentParser()
    ap.add_argument("--gpu", action="store_true")
    ap.add_argument("--S", type=int, default=1024)
    ap.add_argument("--B", type=int, default=16)
    ap.add_argument("--rounds", type=int, default=2)
    a = ap.parse_args()
    gpu(a) if a.gpu else cross_compile()
