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

# (name, PTX, element type, values per asm call)
FORMS = [
    ("tanh.f32", "tanh.approx.f32 $0, $1;", tl.float32, 1),
    ("tanh.f16x2", "tanh.approx.f16x2 $0, $1;", tl.float16, 2),
    ("ex2.f32", "ex2.approx.ftz.f32 $0, $1;", tl.float32, 1),
    ("ex2.f16x2", "ex2.approx.f16x2 $0, $1;", tl.float16, 2),
    ("tanh.bf16x2", "tanh.approx.bf16x2 $0, $1;", tl.bfloat16, 2),
]


@triton.jit
def k(X, Y, ITERS: tl.constexpr, BLOCK: tl.constexpr, ASM: tl.constexpr, DT: tl.constexpr, PACK: tl.constexpr):
    o = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    h = tl.load(X + o).to(DT)
    for i in range(ITERS):
        h = tl.inline_asm_elementwise(ASM, "=r,r", [h], dtype=h.dtype, is_pure=True, pack=PACK)
    tl.store(Y + o, h.to(tl.float32))


ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
ap.add_argument("--clock-ghz", type=float, default=1.98, help="SM clock for the per-clock rate (nvidia-smi clocks.sm)")
args = ap.parse_args()
BLOCK, ITERS = 4096, 512
n = BLOCK * 132 * 16
x = torch.rand(n, device="cuda") * -0.5
y = torch.empty_like(x)
sm = torch.cuda.get_device_properties(0).multi_processor_count
for name, asm, dt, pack in FORMS:
    f = lambda: k[(n // BLOCK,)](x, y, ITERS, BLOCK, asm, dt, pack, num_warps=8)
    f(); torch.cuda.synchronize()
    ms = do_bench(f, warmup=20, rep=100)
    clk = args.clock_ghz * 1e9
    rate = n * ITERS / (ms * 1e-3) / sm / clk
    print(f"{name:12s} {ms*1e3:8.1f} us  {rate:6.1f} values/clk/SM (at {clk/1e9:.3f} GHz)", flush=True)
