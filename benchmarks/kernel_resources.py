"""Registers, spills and shared memory of every kernel one eager and one compiled fwd+bwd step built
(CUDA only): where eager and compiled kernels of one config differ in speed, whether they differ in
what ptxas gave them.

Runs a bench_attention.py case eager (autotuned) and under torch.compile, then lists the eager
kernels inductor_flex launched (launch.py's cache) and the template kernels Inductor loaded, each
with its tile config, n_regs, n_spills and shared bytes. --dump writes Inductor's output code.

    python benchmarks/kernel_resources.py --case document --S 1024 --B 16 --dump /tmp/code
"""
import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_attention import add_case_arguments, probe_setup  # noqa: E402


def _row(tag, name, cfg, k):
    smem = getattr(k, "shared", None)
    if smem is None:
        smem = getattr(getattr(k, "metadata", None), "shared", "?")
    return (f"{tag:9s} {name:34s} {cfg:28s} regs {getattr(k, 'n_regs', '?'):>4} spills "
            f"{getattr(k, 'n_spills', '?'):>4} smem {smem:>7}")


def main():
    ap = argparse.ArgumentParser()
    add_case_arguments(ap, "document", 1024, 16)
    ap.add_argument("--dump", default=None)
    args = ap.parse_args()

    from torch._inductor.utils import run_and_get_code

    from inductor_flex import create_block_mask, flex_attention
    from inductor_flex import launch as L

    dev = torch.device("cuda")
    case, q, k, v, dout = probe_setup(args, dev)
    bm = (create_block_mask(case.mask_mod, None, None, args.S, args.S, device=dev)
          if case.mask_mod is not None else None)

    def step(fn):
        fn(q, k, v, score_mod=case.score_mod, block_mask=bm).backward(dout)
        torch.cuda.synchronize()

    step(flex_attention)
    for fn, table in list(L._cache.values()):
        for key, kern in table.items():
            if kern is None:
                continue
            consts = dict(key[4])
            cfg = f"{consts.get('BLOCK_M')}x{consts.get('BLOCK_N')} w{key[5]} s{key[6]}"
            print(_row("eager", getattr(fn, "__name__", str(fn)), cfg, kern.compiled), flush=True)

    compiled = torch.compile(flex_attention, fullgraph=True)
    _, code = run_and_get_code(step, compiled)
    if args.dump:
        os.makedirs(args.dump, exist_ok=True)
        for i, c in enumerate(code):
            with open(os.path.join(args.dump, f"output_code_{i}.py"), "w") as f:
                f.write(c)
    from torch._inductor.codecache import PyCodeCache

    for mod in list(PyCodeCache.modules):
        for name, obj in vars(mod).items():
            for launcher in getattr(obj, "launchers", None) or []:
                cfg = getattr(launcher, "config", None)
                kw = getattr(cfg, "kwargs", {}) if cfg is not None else {}
                desc = (f"{kw.get('BLOCK_M', '?')}x{kw.get('BLOCK_N', '?')} w{getattr(cfg, 'num_warps', '?')} "
                        f"s{getattr(cfg, 'num_stages', '?')}")
                print(_row("compiled", name, desc, launcher), flush=True)


if __name__ == "__main__":
    main()
