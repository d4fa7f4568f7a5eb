"""What the printed mask_mod's guards cost per kernel (CUDA only): the benchmark's document case
(S=1024, B=16, H=16, D=128, bf16, 8 causal docs) with the eager kernels' printed mask_mod as printed,
and rewritten in the eager source as Inductor lowers the same mod:

  printed    loads of captured tensors masked to their size, negative indices wrapped (tl.where)
  inductor   indices taken modulo the lengths (the template's own guard for tile rows and columns
             past the end), unmasked loads, no wrap: what the compiled kernels run
  no_wrap    the printed loads' masks kept, the negative-index wraps dropped

Each forward, dQ and dK/dV launch is timed with do_bench (median) for the given tile configs, the
variants alternating for --rounds rounds. Timing only: the outputs are not checked.

    python benchmarks/mask_print_probe.py --rounds 2
"""
import argparse
import os
import re
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_attention import add_case_arguments, probe_setup  # noqa: E402

_WRAP = re.compile(r"(t\d+) = tl\.where\((t\d+) < 0, \2 \+ (\w+), \2\)")
_LOAD = re.compile(r"tl\.load\(([^,]+), mask=[^\n]*?, other=0\)")


def rewrite(source: str, form: str, L: int) -> str:
    head, sep, rest = source.partition("def mask_mod(")
    body, sep2, tail = rest.partition("\n\n\n")
    if form == "printed":
        return source
    body = _WRAP.sub(r"\1 = \2", body)  # both forms drop the wrap
    if form == "inductor":
        body = _LOAD.sub(r"tl.load(\1)", body)
        body = body.replace("# document_causal", f"q_idx = q_idx % {L}\n    kv_idx = kv_idx % {L}")
    return head + sep + body + sep2 + tail


def main():
    ap = argparse.ArgumentParser()
    add_case_arguments(ap, "document", 1024, 16)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--show", action="store_true", help="print the rewritten mask_mods")
    args = ap.parse_args()

    from triton.testing import do_bench

    from inductor_flex import create_block_mask
    from inductor_flex import kernel as K
    from inductor_flex.backward import BackwardCall, BackwardPlan
    from inductor_flex.lowering.configs import Config

    S, B, H, D = args.S, args.B, args.H, args.D
    dev = torch.device("cuda")
    case, q, k, v, dout = probe_setup(args, dev)
    q, k, v = q.detach(), k.detach(), v.detach()
    bm = create_block_mask(case.mask_mod, None, None, S, S, device=dev)
    out = torch.randn_like(q)
    lse = torch.randn(B, H, S, device=dev)
    plan = K.ForwardPlan(q, k, v, None, bm, None, {})
    bplan = BackwardPlan(plan, None, (), {})
    call = BackwardCall(bplan, q, k, v, out, lse, dout, torch.zeros_like(lse))
    launches = []
    for cfg in (Config(64, 64, 4, 3), Config(64, 32, 4, 3)):
        grid, fargs, consts = K.forward_launch(plan, q, k, v, out, lse, torch.empty_like(lse), cfg)
        launches.append(("fwd", cfg, plan.source, "flex_fwd_kernel", grid, fargs, consts))
    for kind, cfg in (("dq", Config(64, 32, 4, 2)), ("dkdv", Config(64, 64, 4, 2))):
        x = call.dq_launch(cfg, False) if kind == "dq" else call.dkdv(cfg)
        launches.append((kind, cfg, bplan.source, x.kernel, x.grid, x.args, x.constexprs))
    forms = ("printed", "inductor", "no_wrap")
    timed = {}
    for kind, cfg, source, name, grid, fargs, consts in launches:
        for form in forms:
            src = rewrite(source, form, S)
            if args.show and kind in ("fwd", "dq") and cfg.BLOCK_N == 32:
                print(f"---- {kind} {form}\n" + "def mask_mod(" + src.partition("def mask_mod(")[2].partition("\n\n\n")[0])
            fn = getattr(K.load_module(src, False), name)

            def run(fn=fn, grid=grid, fargs=fargs, consts=consts, cfg=cfg):
                fn[grid](*fargs, **consts, num_warps=cfg.num_warps, num_stages=cfg.num_stages)

            run()
            timed[(kind, tuple(cfg)[:4], form)] = run
    torch.cuda.synchronize()
    print(f"{args.case} S={S} B={B} H={H} D={D} bf16: kernel us (do_bench median)")
    for r in range(args.rounds):
        for kind, cfg, *_ in launches:
            row = []
            for form in forms:
                ms = do_bench(timed[(kind, tuple(cfg)[:4], form)], warmup=25, rep=200, return_mode="median")
                row.append(f"{form} {ms * 1e3:7.1f}")
            print(f"round {r} {kind:5s} {'x'.join(map(str, tuple(cfg)[:4])):10s} " + "  ".join(row), flush=True)


if __name__ == "__main__":
    main()
