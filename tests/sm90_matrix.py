"""Cross-compile every forward specialization the interpreter tests launch for sm_90 (no GPU).

Run as a script in a process without TRITON_INTERPRET (test_sm90_compile.py does that). Prints one
line per specialization and exits non-zero if any fails.
"""
import os
import sys
import time
from concurrent.futures import ProcessPoolExecutor

assert os.environ.get("TRITON_INTERPRET", "0") in ("", "0"), "run without TRITON_INTERPRET"
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import torch  # noqa: E402

from cases import SHAPES, VARIANTS, make_inputs, make_variant  # noqa: E402
from inductor_flex import kernel as K  # noqa: E402
from inductor_flex import aot  # noqa: E402
from inductor_flex.lowering.configs import forward_configs  # noqa: E402


def specializations():
    """Yield (label, variant, shape_name, dtype, config) for each distinct launch."""
    for variant in VARIANTS:
        for shape_name, shape in SHAPES.items():
            for dtype in (torch.float32, torch.float16):
                # the interpreter tests' config
                yield variant, shape_name, dtype, "interp"
        # the GPU default config, in bf16, once per variant
        yield variant, "odd37_E40", torch.bfloat16, "gpu"


def compile_one(job):
    variant, shape_name, dtype, which = job
    torch.manual_seed(0)
    shape = SHAPES[shape_name]
    B, Hq, Hkv, Lq, Lkv, E, Ev = shape
    q, k, v = make_inputs(shape, dtype, "cpu")
    score_mod, block_mask = make_variant(variant, Lq, Lkv, Hq, "cpu")
    plan = K.ForwardPlan(q, k, v, score_mod, block_mask, None, {})
    bs = plan.block_mask.BLOCK_SIZE
    cfg = forward_configs(E, Ev, dtype, bs, q.device, interpret=(which == "interp"))[0]
    out = torch.empty(B, Hq, Lq, Ev, dtype=dtype)
    lse = torch.empty(B, Hq, Lq)
    grid, args, consts = K.forward_launch(plan, q, k, v, out, lse, lse, cfg)
    module = K.load_module(plan.source, False)
    t = time.time()
    try:
        c = aot.compile_launch(module, "flex_fwd_kernel", args, consts, cfg.num_warps, cfg.num_stages)
        ok = "cubin" in c.asm and len(c.asm["cubin"]) > 0
        msg = f"smem={c.metadata.shared}"
    except Exception as e:  # noqa: BLE001
        ok, msg = False, f"{type(e).__name__}: {str(e)[:400]}"
    return ok, f"{variant}-{shape_name}-{str(dtype)[6:]}-{which} {cfg} {time.time() - t:.1f}s {msg}"


def main():
    jobs = list(specializations())
    failures = 0
    with ProcessPoolExecutor(max_workers=int(os.environ.get("SM90_WORKERS", "2"))) as pool:
        for ok, line in pool.map(compile_one, jobs):
            print(("ok   " if ok else "FAIL ") + line, flush=True)
            failures += not ok
    print(f"{len(jobs) - failures}/{len(jobs)} specializations compiled for sm_90")
    sys.exit(1 if failures else 0)


if __name__ == "__main__":
    main()
