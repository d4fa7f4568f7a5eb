"""Cross-compile every kernel specialization the interpreter tests launch for sm_90 (no GPU):
forward, backward (preprocess, dK/dV, dQ; with captured-tensor gradients), decode (split + merge), and
the forward template as Inductor rendered it (SM90_INDUCTOR_DIR).

Run as a script in a process without TRITON_INTERPRET (test_sm90_compile.py does that, one kind
per run: SM90_ONLY=forward|backward|decode|inductor). Prints one line per specialization and exits non-zero
if any fails.
"""
import os
import sys
import time
from concurrent.futures import ProcessPoolExecutor

assert os.environ.get("TRITON_INTERPRET", "0") in ("", "0"), "run without TRITON_INTERPRET"
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import torch  # noqa: E402

from cases import SHAPES, VARIANTS, make_inputs, make_variant, run_walk_mask_mod  # noqa: E402
from inductor_flex import kernel as K  # noqa: E402
from inductor_flex import aot  # noqa: E402
from inductor_flex.lowering.configs import Config, backward_configs, forward_configs  # noqa: E402

K.SPECIALIZE_MIN_LEN = 1  # the GPU labels compile the layout-specialized kernels at these short lengths too


def specializations():
    """Yield (label, variant, shape_name, dtype, config) for each distinct launch."""
    for variant in VARIANTS:
        for shape_name, shape in SHAPES.items():
            for dtype in (torch.float32, torch.float16):
                # the interpreter tests' config
                yield variant, shape_name, dtype, "interp"
        # the GPU default config, in bf16, once per variant
        yield variant, "odd37_E40", torch.bfloat16, "gpu"
        # K/V through TMA descriptors
        yield variant, "odd37_E40", torch.bfloat16, "gpu-tma"
        # TMA and the warp-specialized kv loop (Hopper autotuning's extra candidate)
        yield variant, "odd37_E40", torch.bfloat16, "gpu-ws"
    # the default for 16-bit inputs on the GPU: tanh as inline tanh.approx.f32 (never interpreted)
    yield "softcap", "odd37_E40", torch.bfloat16, "gpu-fast_tanh"
    # the warp-specialized loop over a BlockMask of 128-blocks whose kv blocks are runs (RUNS)
    for variant in ("causal", "prefix_lm", "sliding_window", "softcap"):
        yield variant, "odd37_E40", torch.bfloat16, "gpu-ws128"
    # one loop over each row's partial and full blocks together (the plain loop's MASK_ON_FULL)
    for variant in UNION_VARIANTS:
        yield variant, UNION_SHAPE_NAME, torch.bfloat16, "gpu-union"


def compile_one(job):
    variant, shape_name, dtype, which = job
    torch.manual_seed(0)
    shape = SHAPES.get(shape_name, UNION_SHAPE)
    B, Hq, Hkv, Lq, Lkv, E, Ev = shape
    q, k, v = make_inputs(shape, dtype, "cpu")
    if which == "gpu-union":
        score_mod, block_mask = None, union_block_mask(variant, Lq, Lkv)
    else:
        score_mod, block_mask = make_variant(variant, Lq, Lkv, Hq, "cpu", block=128 if which == "gpu-ws128" else 32)
    if which == "gpu-ws128" and block_mask is None:  # a score_mod variant: under a causal mask
        block_mask = make_variant("causal", Lq, Lkv, Hq, "cpu", block=128)[1]
    # 16-bit inputs default to the hardware tanh; the other labels pin the exact formula
    # the GPU labels build the kernels specialized to the call's layout, the interpreter's the generic ones
    opts = {"SPECIALIZE_LAYOUT": which != "interp"}
    if not which.endswith("fast_tanh"):
        opts["FAST_TANH"] = False
    opts["USE_TMA"] = which.endswith("tma")
    if which == "gpu-ws128":
        opts["REFINE_BLOCK_MASK"] = False  # keep the 128-blocks the specialized tiles need
    ws = which.endswith(("ws", "ws128"))
    plan = K.ForwardPlan(q, k, v, score_mod, block_mask, None, opts)
    assert ("stride_qm: tl.constexpr" in plan.source) == opts["SPECIALIZE_LAYOUT"]
    if variant == "softcap":
        assert ("_tanh_approx(" in plan.source.split("# ---- hooks")[1]) == which.endswith("fast_tanh")
    bs = plan.block_mask.BLOCK_SIZE
    cfg = forward_configs(E, Ev, dtype, bs, q.device, interpret=(which == "interp"))[0]
    if ws:  # forward_configs adds it only on a Hopper device
        cfg = Config(min(128, bs[0]), min(128, bs[1]), 4, 2, True)
    out = torch.empty(B, Hq, Lq, Ev, dtype=dtype)
    lse = torch.empty(B, Hq, Lq)
    grid, args, consts = K.forward_launch(plan, q, k, v, out, lse, lse, cfg)
    # the specialized loop only where it builds (no BlockMask, no captured tensor); the other
    # variants compile the same tile config with the plain loop
    ws = ws and K.ws_applies(plan)
    assert consts["USE_TMA"] == (opts["USE_TMA"] or ws) and consts["WARP_SPECIALIZE"] == ws
    assert not which.endswith("ws128") or (ws and consts["RUNS"] and consts["MASK_ON_FULL"])
    assert which != "gpu-union" or (not ws and consts["RUNS"] and consts["MASK_ON_FULL"])
    module = K.load_module(plan.source, False)
    t = time.time()
    ok, msg = compile_launches(module, [("flex_fwd_kernel", args, consts, cfg.num_warps, cfg.num_stages)])
    return ok, f"{variant}-{shape_name}-{str(dtype)[6:]}-{which} {cfg} {time.time() - t:.1f}s {msg}"


# BlockMasks of 64-blocks whose rows are one run of partial and full blocks together, not one run
# per list (cases.RUN_WALK_VARIANTS): the kv side of both, the q side of the documents
UNION_VARIANTS = ["document", "full_blocks_around_a_partial_one"]
UNION_SHAPE_NAME, UNION_SHAPE = "union460_E64", (1, 4, 2, 460, 460, 64, 64)


def union_block_mask(variant, Lq, Lkv):
    from inductor_flex import create_block_mask

    return create_block_mask(run_walk_mask_mod(variant, max(Lq, Lkv)), None, None, Lq, Lkv, device="cpu",
                             BLOCK_SIZE=64)


def compile_launches(module, launches):
    """Compile each (kernel name, args, constexprs, warps, stages) for sm_90 -> (all ok, message)."""
    msgs, ok = [], True
    for name, args, consts, warps, stages in launches:
        try:
            c = aot.compile_launch(module, name, args, consts, warps, stages)
            ok = ok and "cubin" in c.asm and len(c.asm["cubin"]) > 0
            msgs.append(f"{name}({warps}w{stages}s) smem={c.metadata.shared}")
        except Exception as e:  # noqa: BLE001
            ok = False
            msgs.append(f"{name} {type(e).__name__}: {str(e)[:400]}")
    return ok, " ".join(msgs)


# ---- backward kernels (templates/flex_backward.py.jinja) ------------------------------------------
LEARNABLE_VARIANTS = ["relative_bias_table", "alibi_slopes", "two_reads_repeated", "temperature_softcap"]


def backward_specializations():
    for variant in VARIANTS + LEARNABLE_VARIANTS:
        yield "backward", variant, "gqa4x2_E64_Ev32", torch.float16, "interp"
        yield "backward", variant, "E128_Lq33_Lkv65", torch.bfloat16, "gpu"
    yield "backward", "noop", "odd37_E40", torch.float32, "gpu"
    for variant in ("noop", "causal", "softcap"):  # kernel_options FUSED_DQ: dQ atomics in the dK/dV kernel
        yield "backward", variant, "E128_Lq33_Lkv65", torch.bfloat16, "gpu_fused_dq"
    for variant in UNION_VARIANTS:  # dQ and dK/dV in one loop over each row's blocks (UNION)
        yield "backward", variant, UNION_SHAPE_NAME, torch.bfloat16, "gpu-union"


def compile_backward(job):
    from cases import LEARNABLE
    from inductor_flex.backward import BackwardCall, BackwardPlan

    _, variant, shape_name, dtype, which = job
    torch.manual_seed(0)
    B, Hq, Hkv, Lq, Lkv, E, Ev = SHAPES.get(shape_name, UNION_SHAPE)
    q, k, v = make_inputs((B, Hq, Hkv, Lq, Lkv, E, Ev), dtype, "cpu")
    caps = []
    if which == "gpu-union":
        score_mod, block_mask = None, union_block_mask(variant, Lq, Lkv)
    elif variant in LEARNABLE:
        factory, make = LEARNABLE[variant]
        caps = [c.requires_grad_() for c in make(Hq)]
        score_mod, block_mask = factory(*caps), None
    else:
        score_mod, block_mask = make_variant(variant, Lq, Lkv, Hq, "cpu")
    # the interpreter tests' labels pin the exact tanh; the GPU ones take the 16-bit default (hardware tanh)
    opts = {"FAST_TANH": False, "SPECIALIZE_LAYOUT": False} if which == "interp" else {"SPECIALIZE_LAYOUT": True}
    plan = K.ForwardPlan(q, k, v, score_mod, block_mask, None, opts)
    grad_caps = tuple(any(t is c for c in caps) for t in plan.score.tensors) if plan.has_score_mod else ()
    bplan = BackwardPlan(plan, score_mod, grad_caps, {})
    out = torch.empty(B, Hq, Lq, Ev, dtype=dtype)
    lse = torch.empty(B, Hq, Lq)
    fused = which == "gpu_fused_dq"
    call = BackwardCall(bplan, q, k, v, out, lse, torch.empty_like(out), torch.empty_like(lse), fused_dq=fused)
    bs = plan.block_mask.BLOCK_SIZE
    dkdv_cfg = backward_configs("dkdv", E, Ev, dtype, bs, interpret=(which == "interp"))[0]
    dq_cfg = backward_configs("dq", E, Ev, dtype, bs, interpret=(which == "interp"))[0]
    launches = [call.preprocess(), call.dkdv(dkdv_cfg)] + ([] if fused else [call.dq_launch(dq_cfg, any(grad_caps))])
    if which == "gpu-union":
        assert launches[2].constexprs["UNION"] and launches[1].constexprs["UNION"] == (variant == "document")
    t = time.time()
    ok, msg = compile_launches(K.load_module(bplan.source, False),
                               [(x.kernel, x.args, x.constexprs, x.num_warps, x.num_stages) for x in launches])
    return ok, (f"backward-{variant}-{shape_name}-{str(dtype)[6:]}-{which} dkdv={tuple(dkdv_cfg)} "
                f"dq={tuple(dq_cfg)} {time.time() - t:.1f}s {msg}")


# ---- decode kernels (templates/flex_decode.py.jinja): split + merge, GQA packing -------------------
# (B, Hq, Hkv, Lq, Lkv, E, Ev, split)
DECODE_SHAPES = {
    "gqa4_Lq1_S157": (2, 16, 4, 1, 157, 64, 128, 3),
    "gqa8_Lq16_S157": (2, 16, 2, 16, 157, 64, 128, 2),
    "gqa1_Lq3_E40_Ev24": (1, 8, 8, 3, 203, 40, 24, 1),
    "bench_S8192_D128": (8, 32, 8, 1, 8192, 128, 128, 4),
}
DECODE_VARIANTS = ["noop", "causal", "document", "alibi", "softcap", "relative_bias", "ops_soup", "empty_rows"]


def decode_specializations():
    for variant in DECODE_VARIANTS:
        for shape_name in DECODE_SHAPES:
            for dtype in (torch.float16, torch.bfloat16):
                yield "decode", variant, shape_name, dtype
    for variant in ("noop", "causal", "softcap"):  # K/V through TMA descriptors (kernel_options USE_TMA)
        for shape_name in ("gqa1_Lq3_E40_Ev24", "bench_S8192_D128"):
            yield "decode", variant + "+tma", shape_name, torch.bfloat16


def compile_decode(job):
    from inductor_flex import decode as D
    from inductor_flex.lowering.decode_configs import decode_configs

    _, name, shape_name, dtype = job
    variant, tma = name.split("+")[0], name.endswith("+tma")
    torch.manual_seed(0)
    B, Hq, Hkv, Lq, Lkv, E, Ev, split = DECODE_SHAPES[shape_name]
    q, k, v = make_inputs((B, Hq, Hkv, Lq, Lkv, E, Ev), dtype, "cpu")
    score_mod, block_mask = make_variant(variant, Lq, Lkv, Hq, "cpu", block=128)
    opts = {"BACKEND": "TRITON_DECODE", "USE_TMA": tma}
    plan = D.get_plan(q, k, v, score_mod, block_mask, opts)
    bm = block_mask if block_mask is not None else K._default_block_mask(Lq, Lkv, q.device)
    cfg = decode_configs(E, Ev, dtype, bm.BLOCK_SIZE[1], q.device, interpret=False)[0]
    module = K.load_module(plan.source, False)
    out, lse, mx, part = D._buffers(q, v, split)
    launches = []

    class Recorder:
        """Stands in for the module: records the (kernel, args, constexprs) of each launch."""

        def __getattr__(self, name):
            class Launch:
                def __getitem__(self, grid):
                    def call(*args, num_warps=4, num_stages=1, **consts):
                        launches.append((name, args, consts, num_warps, num_stages))
                    return call
            return Launch()

    D._launch(plan, Recorder(), q, k, v, bm, 1.0 / E ** 0.5, cfg, split, out, lse, mx, part)
    assert all(c["USE_TMA"] == tma for _, _, c, _, _ in launches)
    t = time.time()
    ok, msg = compile_launches(module, launches)
    return ok, f"decode-{name}-{shape_name}-{str(dtype)[6:]} {cfg} split={split} {time.time() - t:.1f}s {msg}"


# ---- forward kernels as Inductor rendered them (lowering/template.py) -----------------------------
def inductor_specializations():
    """One job per kernel source Inductor generated (files in SM90_INDUCTOR_DIR, written by
    tests/test_template_lowering.py)."""
    d = os.environ.get("SM90_INDUCTOR_DIR")
    for name in sorted(os.listdir(d)) if d else []:
        yield "inductor", os.path.join(d, name)


def compile_inductor(job):
    """Compile the template kernel with the signature and launch options Inductor gave it."""
    import triton
    from torch._inductor.runtime import triton_heuristics
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    path = job[1]
    seen = {}
    real = triton_heuristics.template

    def capture(*args, **kwargs):
        def deco(fn):
            seen.update(kwargs, fn=fn)
            return fn
        return deco

    triton_heuristics.template = capture
    try:
        K.load_module(open(path).read(), False)
    finally:
        triton_heuristics.template = real
    meta = seen["triton_meta"]
    t = time.time()
    try:
        src = ASTSource(fn=seen["fn"], signature=meta["signature"], constexprs=meta.get("constants", {}))
        c = triton.compile(src, target=GPUTarget("cuda", 90, 32),
                           options={"num_warps": seen["num_warps"], "num_stages": seen["num_stages"]})
        ok, msg = "cubin" in c.asm and len(c.asm["cubin"]) > 0, f"smem={c.metadata.shared}"
    except Exception as e:  # noqa: BLE001
        ok, msg = False, f"{type(e).__name__}: {str(e)[-500:]} {e.__cause__!r}"
    return ok, f"inductor-{os.path.basename(path)} ({seen['num_warps']}w{seen['num_stages']}s) {time.time() - t:.1f}s {msg}"


KINDS = {"forward": specializations, "backward": backward_specializations, "decode": decode_specializations,
         "inductor": inductor_specializations}


def compile_job(job):
    if job[0] == "inductor":
        return compile_inductor(job)
    if job[0] == "decode":
        return compile_decode(job)
    if job[0] == "backward":
        return compile_backward(job)
    return compile_one(job)


def main():
    only = os.environ.get("SM90_ONLY")
    if only is not None and only not in KINDS:
        sys.exit(f"SM90_ONLY must be one of {sorted(KINDS)}, got {only!r}")
    jobs = [j for kind, gen in KINDS.items() if only in (None, kind) for j in gen()]
    failures = 0
    with ProcessPoolExecutor(max_workers=int(os.environ.get("SM90_WORKERS", "2"))) as pool:
        for ok, line in pool.map(compile_job, jobs):
            print(("ok   " if ok else "FAIL ") + line, flush=True)
            failures += not ok
    print(f"{len(jobs) - failures}/{len(jobs)} specializations compiled for sm_90")
    sys.exit(1 if failures else 0)


if __name__ == "__main__":
    main()
