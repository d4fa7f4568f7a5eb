"""Probe: does issuing the next kv tile's q·k wgmma before this tile's softmax let MMA and MUFU overlap?

A minimal non-causal forward (D=128, no masks, optional softcap) written two ways: the plain loop, and
one that issues q·k of tile j+1 before the softmax of tile j (FlashAttention-3's intra-warpgroup
overlap, by hand). ptxas does interleave the next tile's HGMMAs with the MUFU work (see the op
sequences), but on the H100 the hand-pipelined loop was no faster (2026-11-28,
results/h100_2026-11-28_pipelined_qk_forward_probe.txt), so the templates keep the plain loop.

    python benchmarks/qk_pipeline_probe.py            # CPU: sm_90 cross-compile, HGMMA/MUFU order
    python benchmarks/qk_pipeline_probe.py --gpu      # H100: TFLOP/s and max error vs float64
    python benchmarks/qk_pipeline_probe.py --gpu-sass # H100: op order of the GPU's Triton build
"""
import argparse
import os
import re
import subprocess
import tempfile

import torch
import triton
import triton.language as tl

LOG2E = tl.constexpr(1.4426950408889634)


@triton.jit
def _tanh(x):
    return tl.inline_asm_elementwise("tanh.approx.f32 $0, $1;", "=r,r", [x], dtype=tl.float32, is_pure=True, pack=1)


@triton.jit
def _step(qk, m_i, l_i, acc, v, qk_scale, cap_in, cap_out, SOFTCAP: tl.constexpr):
    if SOFTCAP:
        s = _tanh(qk * cap_in) * cap_out
    else:
        s = qk * qk_scale
    m_new = tl.maximum(m_i, tl.max(s, 1))
    alpha = tl.math.exp2(m_i - m_new)
    p = tl.math.exp2(s - m_new[:, None])
    l_i = l_i * alpha + tl.sum(p, 1)
    acc = acc * alpha[:, None]
    acc = tl.dot(p.to(v.dtype), v, acc)
    return m_new, l_i, acc


@triton.jit
def fa_fwd(Q, K, V, O, qk_scale, cap_in, cap_out, N_CTX, H,
           BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, D: tl.constexpr, SOFTCAP: tl.constexpr,
           PIPE: tl.constexpr):
    start_m = tl.program_id(0)
    off_hz = tl.program_id(1)
    base = off_hz.to(tl.int64) * N_CTX * D
    offs_m = start_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, D)
    q = tl.load(Q + base + offs_m[:, None] * D + offs_d[None, :])
    kp = K + base + offs_n[:, None] * D + offs_d[None, :]
    vp = V + base + offs_n[:, None] * D + offs_d[None, :]
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, D], tl.float32)
    if PIPE:
        k = tl.load(kp)
        qk = tl.dot(q, tl.trans(k))
        for start_n in range(BLOCK_N, N_CTX, BLOCK_N):
            k = tl.load(kp + start_n * D)
            qk_next = tl.dot(q, tl.trans(k))
            v = tl.load(vp + (start_n - BLOCK_N) * D)
            m_i, l_i, acc = _step(qk, m_i, l_i, acc, v, qk_scale, cap_in, cap_out, SOFTCAP)
            qk = qk_next
        v = tl.load(vp + (N_CTX - BLOCK_N) * D)
        m_i, l_i, acc = _step(qk, m_i, l_i, acc, v, qk_scale, cap_in, cap_out, SOFTCAP)
    else:
        for start_n in range(0, N_CTX, BLOCK_N):
            k = tl.load(kp + start_n * D)
            qk = tl.dot(q, tl.trans(k))
            v = tl.load(vp + start_n * D)
            m_i, l_i, acc = _step(qk, m_i, l_i, acc, v, qk_scale, cap_in, cap_out, SOFTCAP)
    acc = acc / l_i[:, None]
    tl.store(O + base + offs_m[:, None] * D + offs_d[None, :], acc.to(O.dtype.element_ty))


def sass(cfg, pipe, softcap, dump=None):
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    bm, bn, w, st = cfg
    sig = {"Q": "*bf16", "K": "*bf16", "V": "*bf16", "O": "*bf16", "qk_scale": "fp32", "cap_in": "fp32",
           "cap_out": "fp32", "N_CTX": "i32", "H": "i32", "BLOCK_M": "constexpr", "BLOCK_N": "constexpr",
           "D": "constexpr", "SOFTCAP": "constexpr", "PIPE": "constexpr"}
    consts = dict(BLOCK_M=bm, BLOCK_N=bn, D=128, SOFTCAP=softcap, PIPE=pipe)
    attrs = {(i,): [["tt.divisibility", 16]] for i in (0, 1, 2, 3, 7)}
    c = triton.compile(ASTSource(fn=fa_fwd, signature=sig, constexprs=consts, attrs=attrs),
                       target=GPUTarget("cuda", 90, 32), options={"num_warps": w, "num_stages": st})
    return op_sequence(c.asm["cubin"], dump)


def op_sequence(cubin: bytes, dump=None) -> str:
    """The kernel's wgmma, MUFU, barrier and copy instructions in SASS order, runs collapsed (OPxN)."""
    tools = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin")
    with tempfile.NamedTemporaryFile(suffix=".cubin", delete=False) as f:
        f.write(cubin)
    try:
        s = subprocess.run([os.path.join(tools, "nvdisasm"), "-c", f.name], capture_output=True, text=True).stdout
    finally:
        os.unlink(f.name)
    if dump:
        with open(dump, "w") as out:
            out.write(s)
    seq = []
    for line in s.splitlines():
        m = re.search(r"\s(HGMMA\S*|WARPGROUP\.\S+|MUFU\.\w+|BAR\.\S+|BRA\b|LDGSTS\S*|DEPBAR\S*)", line)
        if m:
            op = m.group(1)
            if seq and seq[-1][0] == op:
                seq[-1][1] += 1
            else:
                seq.append([op, 1])
    return " ".join(f"{o}x{n}" if n > 1 else o for o, n in seq)


def gpu(args):
    from triton.testing import do_bench
    B, H, S, D = 4, 16, 4096, 128
    torch.manual_seed(0)
    q, k, v = (torch.randn(B, H, S, D, device="cuda", dtype=torch.bfloat16) for _ in range(3))
    sc = D ** -0.5
    flops = 4 * B * H * S * S * D
    import inductor_flex
    from inductor_flex.variants import generate_tanh_softcap
    for softcap in (True, False):
        sm = generate_tanh_softcap(30.0) if softcap else None
        f = lambda: inductor_flex.flex_attention(q, k, v, score_mod=sm)
        f()
        print(f"softcap={softcap} inductor_flex eager: {flops / do_bench(f, warmup=50, rep=300) * 1e-9:.1f} TFLOP/s", flush=True)
        ref = None
        qf, kf, vf = q.double(), k.double(), v.double()
        s = (qf @ kf.transpose(-1, -2)) * sc
        if softcap:
            s = 30 * torch.tanh(s / 30)
        ref = torch.softmax(s, -1) @ vf
        del s
        for cfg in [(64, 64, 4, 3), (128, 64, 8, 3), (128, 64, 8, 2), (64, 128, 4, 2), (128, 128, 8, 2)]:
            for pipe in (False, True):
                bm, bn, w, st = cfg
                o = torch.empty_like(q)
                fn = lambda: fa_fwd[(S // bm, B * H)](q, k, v, o, sc * 1.4426950408889634, sc / 30, 30 * 1.4426950408889634,
                                                      S, H, BLOCK_M=bm, BLOCK_N=bn, D=D, SOFTCAP=softcap, PIPE=pipe,
                                                      num_warps=w, num_stages=st)
                try:
                    fn()
                    err = (o.double() - ref).abs().max().item()
                    ms = do_bench(fn, warmup=50, rep=300)
                    print(f"softcap={softcap} cfg={cfg} pipe={pipe}: {flops / ms * 1e-9:.1f} TFLOP/s err={err:.3e}", flush=True)
                except Exception as e:
                    print(f"softcap={softcap} cfg={cfg} pipe={pipe}: FAILED {type(e).__name__}: {str(e)[:200]}", flush=True)


if __name__ == "__main__":
    p = argparse.ArgumentParser()
    p.add_argument("--gpu", action="store_true")
    p.add_argument("--gpu-sass", action="store_true")
    a = p.parse_args()
    if a.gpu_sass:
        B, H, S, D = 1, 1, 1024, 128
        q, k, v = (torch.randn(B, H, S, D, device="cuda", dtype=torch.bfloat16) for _ in range(3))
        for cfg in [(64, 64, 4, 3), (128, 64, 8, 3)]:
            for pipe in (False, True):
                bm, bn, w, st = cfg
                o = torch.empty_like(q)
                ck = fa_fwd[(S // bm, B * H)](q, k, v, o, 0.1, 0.1, 0.1, S, H, BLOCK_M=bm, BLOCK_N=bn, D=D, SOFTCAP=True,
                                              PIPE=pipe, num_warps=w, num_stages=st)
                print(cfg, pipe, ck.n_regs, ck.n_spills, op_sequence(ck.asm["cubin"]), flush=True)
    elif a.gpu:
        gpu(a)
    else:
        for cfg in [(64, 64, 4, 3), (128, 64, 8, 3)]:
            for pipe in (False, True):
                print(cfg, "pipe" if pipe else "plain", sass(cfg, pipe, True, dump=f"/tmp/sass_{cfg[0]}_{pipe}.txt"))
