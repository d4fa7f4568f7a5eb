"""Which backward should a compiled forward+backward run: the Inductor-rendered backward template
(lowering/backward.py, the default) or the custom op's kernels (lowering/kernel_op.flex_backward,
the eager path's printed backward)? One A/B per case, on CUDA, alternated in one process.

Eager softcap measured 424.5 TFLOP/s forward+backward and compiled 408.5 with the same Gluon
forward (S=4096, D=128; results/h200_2026-11-29_gluon_score_s4096.md): the backward differs.

    python benchmarks/compiled_bwd_route_ab.py --cases softcap,alibi,noop --out F.json
"""
import argparse
import json
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cases", default="softcap,alibi,noop")
    ap.add_argument("--S", type=int, default=4096)
    ap.add_argument("--B", type=int, default=4)
    ap.add_argument("--D", type=int, default=128)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--out", default="")
    args = ap.parse_args()

    from triton.testing import do_bench

    import inductor_flex as ifx
    from inductor_flex import variants as V
    from inductor_flex.lowering import backward as BWD

    mods = {"noop": None, "softcap": V.generate_tanh_softcap(30.0), "alibi": V.generate_alibi_bias(16)}
    H, S, B, D = 16, args.S, args.B, args.D
    rows = []
    for case in args.cases.split(","):
        sm = mods[case]
        g = torch.Generator(device="cuda").manual_seed(0)
        q, k, v = (torch.randn(B, H, S, D, device="cuda", dtype=torch.bfloat16, generator=g).requires_grad_()
                   for _ in range(3))
        do = torch.randn(B, H, S, D, device="cuda", dtype=torch.bfloat16, generator=g)

        # two functions (two code objects): each is compiled once, with the backward route set then
        def f_template(q, k, v):
            return ifx.flex_attention(q, k, v, score_mod=sm)

        def f_op(q, k, v):
            return ifx.flex_attention(q, k, v, score_mod=sm)

        torch._dynamo.reset()
        steps = {}
        for name, fn, enabled in (("template_bwd", f_template, True), ("op_bwd", f_op, False)):
            BWD.ENABLED = enabled
            compiled = torch.compile(fn, fullgraph=True)

            def step(compiled=compiled):
                out = compiled(q, k, v)
                torch.autograd.grad(out, (q, k, v), do)

            step()
            torch.cuda.synchronize()
            steps[name] = step
        BWD.ENABLED = True
        best = {n: float("inf") for n in steps}
        for _ in range(args.rounds):
            for n, st in steps.items():
                best[n] = min(best[n], do_bench(st, warmup=25, rep=100))
        flops = 3.5 * 4.0 * B * H * S * S * D
        row = {"case": case, "S": S, "B": B, "D": D,
               **{f"{n}_fb_tflops": flops / (ms * 1e-3) / 1e12 for n, ms in best.items()}}
        row["op/template"] = row["op_bwd_fb_tflops"] / row["template_bwd_fb_tflops"]
        print(json.dumps(row), flush=True)
        rows.append(row)
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"gpu": torch.cuda.get_device_name(), "torch": torch.__version__, "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
