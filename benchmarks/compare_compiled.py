"""Why is the compiled forward slower or faster than the eager one? One case at a time, on CUDA.

For each case this times (triton do_bench, median of the runs, forward only):
  eager                  flex_attention without torch.compile (our printer fills the template)
  compiled               torch.compile(fullgraph=True): Inductor renders the same template
  compiled_pinned        compiled with kernel_options pinning the config the eager autotuner chose
  eager_pinned           eager with kernel_options pinning the config Inductor chose (when it differs)
and writes, under --out, each path's Triton source plus a JSON with the configs,
registers and spills of every kernel compiled, so the two kernels can be diffed.

    python benchmarks/compare_compiled.py --cases causal,softcap --out /tmp/cmp
"""
import argparse
import gc
import json
import os
import re
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))


def _live(cls):
    """Every live object of ``cls`` (dead weak proxies skipped)."""
    out = []
    for o in gc.get_objects():
        try:
            if isinstance(o, cls):
                out.append(o)
        except ReferenceError:
            continue
    return out


def _compiled_kernels():
    from triton.compiler.compiler import CompiledKernel

    return _live(CompiledKernel)


def _autotuners():
    from torch._inductor.runtime.triton_heuristics import CachingAutotuner

    return _live(CachingAutotuner)


def _describe(k) -> dict:
    md = k.metadata
    get = (lambda n: getattr(md, n, None)) if not isinstance(md, dict) else md.get
    return {"name": k.name, "n_regs": k.n_regs, "n_spills": k.n_spills, "num_warps": get("num_warps"),
            "num_stages": get("num_stages"), "shared": get("shared")}


def _new_kernels(before, prefix):
    seen = {id(k) for k in before}
    return [k for k in _compiled_kernels() if id(k) not in seen and k.name.startswith(prefix)]


def _bench(fn):
    from triton.testing import do_bench

    return float(do_bench(fn, warmup=25, rep=200, return_mode="median"))


def run_case(name, S, B, H, D, out_dir):
    import inductor_flex as ifx
    from inductor_flex import kernel as K
    from bench_attention import build_case

    dev = torch.device("cuda")
    args = argparse.Namespace(softcap=30.0, window=1024, num_docs=8, doc_seed=0, prefix=1024)
    case = build_case(name, S, H, dev, args)
    q, k, v = (torch.randn(B, H, S, D, device=dev, dtype=torch.bfloat16) for _ in range(3))
    bm = ifx.create_block_mask(case.mask_mod, None, None, S, S, device=dev) if case.mask_mod else None
    res = {"case": name, "S": S, "B": B, "H": H, "D": D}
    flops = 4 * B * H * S * S * D * (case.analytic_pairs / (S * S))

    def eager():
        return ifx.flex_attention(q, k, v, score_mod=case.score_mod, block_mask=bm)

    K._autotuned.clear()
    before = _compiled_kernels()
    eager()
    torch.cuda.synchronize()
    res["eager_ms"] = _bench(eager)
    picks = list(K._autotuned.values())
    res["eager_config"] = picks[-1]._asdict() if picks else None
    res["eager_kernels"] = [_describe(x) for x in _new_kernels(before, "flex_fwd")]
    with open(os.path.join(out_dir, f"{name}_eager.py"), "w") as f:
        f.write(ifx.kernel_source(q, k, v, case.score_mod, bm))

    def compiled_fn(opts):
        kw = {"kernel_options": opts} if opts else {}

        def f(q, k, v):
            return ifx.flex_attention(q, k, v, score_mod=case.score_mod, block_mask=bm, **kw)
        torch._dynamo.reset()
        return torch.compile(f, fullgraph=True, dynamic=False)

    from torch._inductor.utils import run_and_get_code

    for label, opts in (("compiled", None), ("compiled_pinned", res["eager_config"])):
        if label == "compiled_pinned" and opts is None:
            continue
        fn = compiled_fn(dict(opts) if opts else None)
        before = {id(a) for a in _autotuners()}
        _, code = run_and_get_code(fn, q, k, v)
        code = "\n".join(code)
        with open(os.path.join(out_dir, f"{name}_{label}.py"), "w") as f:
            f.write(code)
        torch.cuda.synchronize()
        res[f"{label}_ms"] = _bench(lambda: fn(q, k, v))
        m = re.search(r"num_stages=(\d+),\s*num_warps=(\d+),.*?'BLOCK_M': (\d+), 'BLOCK_N': (\d+)", code, re.S)
        res[f"{label}_config"] = ({"BLOCK_M": int(m.group(3)), "BLOCK_N": int(m.group(4)),
                                   "num_warps": int(m.group(2)), "num_stages": int(m.group(1))} if m else None)
        # Inductor compiles in worker processes: its launchers, not CompiledKernels, hold the stats
        res[f"{label}_kernels"] = [
            {"name": a.fn.__name__, "n_regs": getattr(ln, "n_regs", None), "n_spills": getattr(ln, "n_spills", None),
             "shared": getattr(ln, "shared", None), "config": str(ln.config)}
            for a in _autotuners() if id(a) not in before and a.fn.__name__.startswith("triton_tem")
            for ln in a.launchers]
    cc = res.get("compiled_config")
    if cc and cc != res["eager_config"]:  # the compiled pick, run eagerly
        res["eager_pinned_config"] = cc
        res["eager_pinned_ms"] = _bench(lambda: ifx.flex_attention(q, k, v, score_mod=case.score_mod, block_mask=bm,
                                                                   kernel_options=dict(cc)))
    for key in [k for k in res if k.endswith("_ms")]:
        res[key.replace("_ms", "_tflops")] = flops / (res[key] * 1e-3) / 1e12
    return res


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--cases", default="causal,softcap,noop")
    p.add_argument("--S", type=int, default=4096)
    p.add_argument("--B", type=int, default=4)
    p.add_argument("--H", type=int, default=16)
    p.add_argument("--D", type=int, default=128)
    p.add_argument("--out", default="benchmarks/results/compare_compiled")
    a = p.parse_args()
    os.makedirs(a.out, exist_ok=True)
    results = []
    for name in a.cases.split(","):
        r = run_case(name, a.S, a.B, a.H, a.D, a.out)
        results.append(r)
        cells = "  ".join(f"{lbl} {r[lbl + '_tflops']:.1f}" for lbl in ("eager", "compiled", "compiled_pinned", "eager_pinned")
                          if lbl + "_tflops" in r)
        print(f"{name:10s} S={a.S} B={a.B}: TFLOP/s {cells}", flush=True)
        print(f"  eager config {r['eager_config']}  compiled config {r.get('compiled_config')}", flush=True)
        for lbl in ("eager", "compiled", "compiled_pinned"):
            for kd in r.get(lbl + "_kernels", []):
                print(f"  {lbl:16s} {kd}", flush=True)
    with open(os.path.join(a.out, "compare_compiled.json"), "w") as f:
        json.dump(results, f, indent=1, default=str)


if __name__ == "__main__":
    main()
