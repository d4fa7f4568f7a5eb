"""MUFU throughput on the GPU: tanh and exp2 in float32 against the packed 16-bit forms.

Softcap spends two MUFU operations per score (tanh, exp2). PTX has packed forms (tanh.approx.f16x2,
.bf16x2, ex2.approx.f16x2) that would halve that if the unit ran them at the float32 rate per pair;
the sm_90 SASS splits each into two MUFU.*.F16 instructions, so this times them. Each thread runs
long independent chains of one operation; the rate is values per clock per SM at the clock given.

    python benchmarks/mufu_rate.py --clock-ghz 1.98
"""
import argparse

import torch, triton, triton.language as tl
from triton.testing import do_bench

@triton.jit
def k(X, Y, ITERS: tl.constexpr, BLOCK: tl.constexpr, OP: tl.constexpr):
    o = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    x = tl.load(X + o)
    if OP == 0:
        for i in range(ITERS):
            x = tl.inline_asm_elementwise("tanh.approx.f32 $0, $1;", "=r,r", [x], dtype=tl.float32, is_pure=True, pack=1)
    elif OP == 1:
        h = x.to(tl.float16)
        for i in range(ITERS):
            h = tl.inline_asm_elementwise("tanh.approx.f16x2 $0, $1;", "=r,r", [h], dtype=tl.float16, is_pure=True, pack=2)
        x = h.to(tl.float32)
    elif OP == 2:
        for i in range(ITERS):
            x = tl.inline_asm_elementwise("ex2.approx.ftz.f32 $0, $1;", "=r,r", [x], dtype=tl.float32, is_pure=True, pack=1)
    elif OP == 3:
        h = x.to(tl.float16)
        for i in range(ITERS):
            h = tl.inline_asm_elementwise("ex2.approx.f16x2 $0, $1;", "=r,r", [h], dtype=tl.float16, is_pure=True, pack=2)
        x = h.to(tl.float32)
    elif OP == 4:
        h = x.to(tl.bfloat16)
        for i in range(ITERS):
            h = tl.inline_asm_elementwise("tanh.approx.bf16x2 $0, $1;", "=r,r", [h], dtype=tl.bfloat16, is_pure=True, pack=2)
        x = h.to(tl.float32)
    tl.store(Y + o, x)

ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
ap.add_argument("--clock-ghz", type=float, default=1.98, help="SM clock for the per-clock rate (nvidia-smi clocks.sm)")
args = ap.parse_args()
BLOCK, ITERS = 4096, 512
n = BLOCK * 132 * 16
x = torch.rand(n, device="cuda") * -0.5
y = torch.empty_like(x)
sm = torch.cuda.get_device_properties(0).multi_processor_count
for op, name in enumerate(["tanh.f32", "tanh.f16x2", "ex2.f32", "ex2.f16x2", "tanh.bf16x2"]):
    f = lambda: k[(n // BLOCK,)](x, y, ITERS, BLOCK, op, num_warps=8)
    f(); torch.cuda.synchronize()
    ms = do_bench(f, warmup=20, rep=100)
    clk = args.clock_ghz * 1e9
    rate = n * ITERS / (ms * 1e-3) / sm / clk
    print(f"{name:12s} {ms*1e3:8.1f} us  {rate:6.1f} values/clk/SM (at {clk/1e9:.3f} GHz)", flush=True)
