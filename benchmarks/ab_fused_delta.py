#!/usr/bin/env python
"""A/B in one process, eager: the dQ kernel computing delta itself (the default since 2026-11-27)
against the former order (flex_bwd_preprocess, dK/dV, then dQ reading delta). Both run the same
tuned configs; prints GPU kernel time per fwd+bwd step (torch.profiler), wall time, and the largest
gradient difference between the two (expected 0).

    python benchmarks/ab_fused_delta.py      # writes $OUT/delta_ab.json (or /tmp)
"""
import json, os, sys, time
import torch
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import bench_attention as BA
import profile_kernels as PK
import inductor_flex.backward as BW
from inductor_flex.kernel import load_module

new_run = BW.run_backward

def old_run(bplan, query, key, value, out, lse, grad_out, grad_lse, captured_needs):
    plan = bplan.fwd
    module = load_module(bplan.source, plan.interpret)
    call = BW.BackwardCall(bplan, query, key, value, out, lse, grad_out, grad_lse)
    BW._run(module, call.preprocess())
    dkdv_c, dq_c = call.configs()
    dkdv_cfg = BW._tune(bplan, "dkdv", dkdv_c, lambda c: BW._run(module, call.dkdv(c)), query, key, value)
    dq_cfg = BW._tune(bplan, "dq", dq_c, None, query, key, value)  # tuned by the "new" run, which goes first
    BW._run(module, call.dkdv(dkdv_cfg))
    l = call.dq_launch(dq_cfg, False)
    BW._run(module, l._replace(constexprs=dict(l.constexprs, FUSE_DELTA=False)))
    return call.dq, call.dk, call.dv, [None] * len(plan.score.tensors)

dev, dt = torch.device("cuda"), torch.bfloat16
bench_args = BA.parse_args([])
rows = []
for name, S, B in [("noop", 4096, 4), ("causal", 4096, 4), ("alibi", 4096, 4), ("softcap", 4096, 4),
                   ("document", 4096, 4), ("document", 1024, 16), ("causal", 1024, 16)]:
    H, D = 16, 128
    case = BA.build_case(name, S, H, dev, bench_args)
    g = torch.Generator(device=dev).manual_seed(0)
    q, k, v, dout = (torch.randn((B, H, S, D), device=dev, dtype=dt, generator=g) for _ in range(4))
    for t in (q, k, v):
        t.requires_grad_(True)
    fn, why = BA.make_peer("ours", case, S, dev, bench_args)
    grads = {}
    for rep in range(2):
        for variant, runner in (("new", new_run), ("old", old_run)):
            BW.run_backward = runner
            def step():
                out = fn(q, k, v)
                out.backward(dout)
                r = (q.grad, k.grad, v.grad)
                for t in (q, k, v):
                    t.grad = None
                return r
            for _ in range(3):
                gr = step()
            grads[variant] = gr
            torch.cuda.synchronize()
            times = PK.kernel_times(step, 10)
            tot = sum(us for us, c in times.values())
            t0 = time.perf_counter()
            for _ in range(10):
                step()
            torch.cuda.synchronize()
            wall = (time.perf_counter() - t0) / 10 * 1e6
            ks = {n[:24]: round(us, 1) for n, (us, c) in times.items() if us > 20}
            rows.append(dict(case=name, S=S, B=B, variant=variant, rep=rep, kernels_us=tot, wall_us=wall, ks=ks))
            print(f"{name:9s} S={S:5d} {variant} rep{rep}: kernels {tot:8.1f} us wall {wall:8.1f} us {ks}", flush=True)
    diff = max((a.float() - b.float()).abs().max().item() for a, b in zip(grads["new"], grads["old"]))
    print(f"  max |grad new - old| = {diff:.3e}", flush=True)
BW.run_backward = new_run
json.dump(rows, open(os.path.join(os.environ.get("OUT", "/tmp"), "delta_ab.json"), "w"), indent=1)
