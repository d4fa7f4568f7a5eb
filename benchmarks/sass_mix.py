"""Instruction mix of the eager kernels' sm_90 SASS, with no GPU: what each score costs in issue slots.

Cross-compiles the forward, dK/dV and dQ kernels of one case for Hopper (``inductor_flex.aot``, so it
runs on a CPU machine without TRITON_INTERPRET), disassembles the cubin with the nvdisasm that
ships with Triton, and counts the floating-point, MUFU (exp2, tanh, rcp) and wgmma instructions.
Counts are static (a loop body counts once): compare variants of one kernel and config, e.g. a
printer or template change, before spending device time on it.

    python benchmarks/sass_mix.py --case softcap
    python benchmarks/sass_mix.py --case alibi --fwd 128,64,8,3 --bwd 64,64,4,2 --dump /tmp/sass

Caveat: Triton specializes pointer alignment and integer divisibility at launch; the cross-compile
declares none, so address arithmetic and load widths may differ from the GPU's build.
"""
from __future__ import annotations

import argparse
import collections
import os
import re
import subprocess
import sys
import tempfile

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import torch  # noqa: E402

CASES = ("noop", "causal", "alibi", "softcap", "sliding_window")
_OP = re.compile(r"\s(MUFU\.\w+|FMUL|FFMA|FADD|FMNMX|FSEL|FSETP\S*|HGMMA\S*|F2FP\S*)\b")


def _mods(case: str, L: int, H: int):
    from inductor_flex import create_block_mask
    from inductor_flex.variants import (generate_alibi_bias, generate_causal_mask, generate_sliding_window,
                                        generate_tanh_softcap)

    def bm(mask_mod):
        return create_block_mask(mask_mod, None, None, L, L, device="cpu")

    return {
        "noop": lambda: (None, None),
        "causal": lambda: (None, bm(generate_causal_mask())),
        "alibi": lambda: (generate_alibi_bias(H), None),
        "softcap": lambda: (generate_tanh_softcap(30.0), None),
        "sliding_window": lambda: (None, bm(generate_sliding_window(256))),
    }[case]()


def _sass(compiled):
    """(SASS text, resource usage line) of a compiled kernel's cubin."""
    import triton

    tools = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin")
    with tempfile.NamedTemporaryFile(suffix=".cubin", delete=False) as f:
        f.write(compiled.asm["cubin"])
    try:
        sass = subprocess.run([os.path.join(tools, "nvdisasm"), "-c", f.name], capture_output=True, text=True,
                              check=True).stdout
        res = subprocess.run([os.path.join(tools, "cuobjdump"), "-res-usage", f.name], capture_output=True,
                             text=True).stdout
    finally:
        os.unlink(f.name)
    usage = re.search(r"REG:(\d+) STACK:(\d+)", res)
    return sass, (f"regs={usage.group(1)} stack={usage.group(2)}" if usage else "regs=?")


def mix(sass: str) -> dict:
    ops = collections.Counter()
    for line in sass.splitlines():
        m = _OP.search(line)
        if m:
            op = m.group(1)
            ops[op if op.startswith("MUFU") else op.split(".")[0]] += 1
    return dict(sorted(ops.items()))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--case", choices=CASES, default="softcap")
    p.add_argument("--D", type=int, default=128)
    p.add_argument("--dtype", choices=("bf16", "fp16"), default="bf16")
    p.add_argument("--fwd", default="128,64,8,3", help="forward BLOCK_M,BLOCK_N,warps,stages")
    p.add_argument("--bwd", default="64,64,4,2", help="dK/dV and dQ BLOCK_M,BLOCK_N,warps,stages")
    p.add_argument("--fast-tanh", choices=("default", "on", "off"), default="default")
    p.add_argument("--dump", help="folder for the SASS of each kernel")
    args = p.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        p.error("run without TRITON_INTERPRET (the kernels are compiled, not interpreted)")

    from inductor_flex import aot
    from inductor_flex import kernel as K
    from inductor_flex.backward import BackwardCall, BackwardPlan
    from inductor_flex.lowering.configs import Config

    dtype = torch.bfloat16 if args.dtype == "bf16" else torch.float16
    B, H, L, D = 1, 4, 1024, args.D
    q, k, v = (torch.randn(B, H, L, D, dtype=dtype) for _ in range(3))
    score_mod, block_mask = _mods(args.case, L, H)
    opts = {} if args.fast_tanh == "default" else {"FAST_TANH": args.fast_tanh == "on"}
    fcfg = Config(*(int(x) for x in args.fwd.split(",")))
    bcfg = Config(*(int(x) for x in args.bwd.split(",")))

    plan = K.ForwardPlan(q, k, v, score_mod, block_mask, None, opts)
    out, lse = torch.empty_like(q), torch.empty(B, H, L)
    _, fargs, fconsts = K.forward_launch(plan, q, k, v, out, lse, lse, fcfg)
    launches = [("flex_fwd_kernel", K.load_module(plan.source, False), fargs, fconsts, fcfg)]
    bplan = BackwardPlan(plan, score_mod, (), opts)
    call = BackwardCall(bplan, q, k, v, out, lse, torch.empty_like(out), None)
    bmod = K.load_module(bplan.source, False)
    for launch in (call.dkdv(bcfg), call.dq_launch(bcfg, False)):
        launches.append((launch.kernel, bmod, launch.args, launch.constexprs, bcfg))

    print(f"{args.case} D={D} {args.dtype} fast_tanh={args.fast_tanh}: static sm_90 SASS instruction counts")
    for name, module, a, consts, cfg in launches:
        compiled = aot.compile_launch(module, name, a, consts, cfg.num_warps, cfg.num_stages)
        sass, usage = _sass(compiled)
        if args.dump:
            os.makedirs(args.dump, exist_ok=True)
            with open(os.path.join(args.dump, f"{args.case}_{name}.sass"), "w") as f:
                f.write(sass)
        counts = " ".join(f"{k}={n}" for k, n in mix(sass).items())
        print(f"  {name:16s} {tuple(cfg)}  {usage} smem={compiled.metadata.shared}  {counts}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
