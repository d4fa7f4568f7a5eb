"""Triton's Hopper warp specialization (tl.range(warp_specialize=True)) on a plain FA forward.

A standalone forward (Q, K, V through TMA descriptors, D=128, bf16, B=4, H=16, S=4096) timed with
and without warp specialization, each output checked against SDPA. The switches of the kernel turn
on, one at a time or in pairs, what the flex forward template does differently from the plain
kernel; that is how the template's warp-specialized variant was made to compute right answers.

    python benchmarks/ws_probe.py            # tile configs, warp-specialized or not
    python benchmarks/ws_probe.py --bisect   # template features: each alone, all but one, pairs

Results on the H100 with Triton 3.6 (2026-11-27): benchmarks/results/h100_2026-11-27_ws_*.json.
"""
import argparse
import itertools
import json
import os

import torch
import triton
import triton.language as tl

# LSE_STORE: the row lse stored through pointers after the loop; O_PTR: O stored through pointers
# (else a descriptor); PER_BH: descriptors on per-(batch, head) base pointers (else one matrix of
# all heads' rows); SHIFT: the -inf guard on the row max; ADD_FORM: acc * alpha + dot(p, v) (else
# the dot accumulates into the rescaled acc); IDX_LOOP: the loop counts tiles (else offsets)
FEATURES = ("LSE_STORE", "O_PTR", "PER_BH", "SHIFT", "ADD_FORM", "IDX_LOOP")


@triton.jit
def fa_fwd(Q, K, V, O, LSE, S, qk_scale, D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
           WS: tl.constexpr, LSE_STORE: tl.constexpr, O_PTR: tl.constexpr, PER_BH: tl.constexpr,
           SHIFT: tl.constexpr, ADD_FORM: tl.constexpr, IDX_LOOP: tl.constexpr):
    start_m = tl.program_id(0)
    off_bh = tl.program_id(1)
    offs_m = start_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, D)
    if PER_BH:
        base = off_bh.to(tl.int64) * S * D
        dq = tl.make_tensor_descriptor(Q + base, shape=[S, D], strides=[D, 1], block_shape=[BLOCK_M, D])
        dk = tl.make_tensor_descriptor(K + base, shape=[S, D], strides=[D, 1], block_shape=[BLOCK_N, D])
        dv = tl.make_tensor_descriptor(V + base, shape=[S, D], strides=[D, 1], block_shape=[BLOCK_N, D])
        rows = 0
    else:
        rows = off_bh * S
        dq = tl.make_tensor_descriptor(Q, shape=[rows + S, D], strides=[D, 1], block_shape=[BLOCK_M, D])
        dk = tl.make_tensor_descriptor(K, shape=[rows + S, D], strides=[D, 1], block_shape=[BLOCK_N, D])
        dv = tl.make_tensor_descriptor(V, shape=[rows + S, D], strides=[D, 1], block_shape=[BLOCK_N, D])
    q = dq.load([rows + start_m * BLOCK_M, 0])
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, D], tl.float32)
    if IDX_LOOP:
        n = tl.cdiv(S, BLOCK_N)
        step = 1
    else:
        n = S
        step = BLOCK_N
    for it in tl.range(0, n, step, warp_specialize=WS):
        if IDX_LOOP:
            start_n = it * BLOCK_N
        else:
            start_n = it
        k = dk.load([rows + start_n, 0])
        qk = tl.dot(q, k.T)
        m_new = tl.maximum(m_i, tl.max(qk, 1) * qk_scale)
        if SHIFT:
            m_s = tl.where(m_new == float("-inf"), 0.0, m_new)
        else:
            m_s = m_new
        p = tl.math.exp2(qk * qk_scale - m_s[:, None])
        alpha = tl.math.exp2(m_i - m_s)
        l_i = l_i * alpha + tl.sum(p, 1)
        v = dv.load([rows + start_n, 0])
        if ADD_FORM:
            acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v)
        else:
            acc = tl.dot(p.to(v.dtype), v, acc * alpha[:, None])
        m_i = m_new
    acc = acc / l_i[:, None]
    if O_PTR:
        optr = O + off_bh.to(tl.int64) * S * D + offs_m[:, None] * D + offs_d[None, :]
        tl.store(optr, acc.to(O.dtype.element_ty), mask=offs_m[:, None] < S)
    else:
        do = tl.make_tensor_descriptor(O, shape=[off_bh * S + S, D], strides=[D, 1], block_shape=[BLOCK_M, D])
        do.store([off_bh * S + start_m * BLOCK_M, 0], acc.to(O.dtype.element_ty))
    if LSE_STORE:
        tl.store(LSE + off_bh.to(tl.int64) * S + offs_m, m_i + tl.math.log2(l_i), mask=offs_m < S)


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--bisect", action="store_true", help="template features instead of tile configs")
    ap.add_argument("--out", default=os.environ.get("OUT", "."), help="directory for ws_probe.json")
    args = ap.parse_args()
    from triton.testing import do_bench

    triton.set_allocator(lambda size, align, stream: torch.empty(size, device="cuda", dtype=torch.int8))
    B, H, S, D = 4, 16, 4096, 128
    torch.manual_seed(0)
    q, k, v = (torch.randn(B, H, S, D, device="cuda", dtype=torch.bfloat16) for _ in range(3))
    ref = torch.nn.functional.scaled_dot_product_attention(q, k, v)
    flops = 4 * B * H * S * S * D
    plain = dict.fromkeys(FEATURES, False)
    if args.bisect:
        runs = [("probe", {})] + [(f, {f: True}) for f in FEATURES]
        runs += [("all-" + f, {g: True for g in FEATURES if g != f}) for f in FEATURES]
        runs += [(a + "+" + b, {a: True, b: True}) for a, b in itertools.combinations(FEATURES, 2)]
        jobs = [(name, flags, (128, 128, 4, 2), True) for name, flags in runs]
    else:
        tiles = [(128, 128, 8, 2), (128, 128, 8, 3), (128, 64, 4, 3), (128, 128, 4, 2), (128, 64, 8, 3),
                 (128, 128, 4, 3), (64, 128, 4, 3)]
        jobs = [("probe", {}, t, ws) for t in tiles for ws in (False, True)]
    res = []
    for name, flags, (bm, bn, warps, stages), ws in jobs:
        o = torch.zeros_like(q)
        lse = torch.empty(B, H, S, device="cuda", dtype=torch.float32)

        def fn():
            fa_fwd[(S // bm, B * H)](q, k, v, o, lse, S, D ** -0.5 * 1.4426950408889634, D=D, BLOCK_M=bm,
                                     BLOCK_N=bn, WS=ws, num_warps=warps, num_stages=stages, **dict(plain, **flags))
        r = dict(variant=name, bm=bm, bn=bn, warps=warps, stages=stages, ws=ws)
        try:
            fn()
            torch.cuda.synchronize()
            r["err"] = (o.float() - ref.float()).abs().max().item()
            r["tflops"] = round(flops / do_bench(fn, warmup=25, rep=100) / 1e9, 1)
        except Exception as e:  # noqa: BLE001 - a config that does not build is a result too
            r["error"] = f"{type(e).__name__}: {str(e).splitlines()[0][:160]}"
        print(r, flush=True)
        res.append(r)
    path = os.path.join(args.out, "ws_probe.json")
    with open(path, "w") as f:
        json.dump(res, f, indent=1)
    print("wrote", path)


if __name__ == "__main__":
    main()
