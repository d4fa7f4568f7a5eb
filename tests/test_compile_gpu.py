"""torch.compile on CUDA: flex_attention under Inductor (the fused forward and backward kernels as
graph ops, or the chunked decomposition compiled to Triton by Inductor), forward and backward, vs
the float64 reference. Run with ``-m gpu``."""
import re

import pytest
import torch
import torch._dynamo.testing

from inductor_flex import create_block_mask, flex_attention
from inductor_flex.reference import math_attention

from cases import SHAPES, make_inputs, make_variant
from conftest import HAS_CUDA, assert_close_to_reference, assert_grads_close, record_calls

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA GPU")]

VARIANTS = ["noop", "causal", "document", "alibi", "softcap", "relative_bias", "head_scale", "empty_rows"]


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("shape", ["odd37_E40", "gqa4x2_E64_Ev32", "Lq50_Lkv97"])
@pytest.mark.parametrize("variant", VARIANTS)
def test_inductor_cuda_forward_backward(variant, shape, dtype):
    dims = SHAPES[shape]
    B, Hq, Hkv, Lq, Lkv, E, Ev = dims
    q, k, v = make_inputs(dims, dtype, "cuda", requires_grad=True)
    score_mod, block_mask = make_variant(variant, Lq, Lkv, Hq, "cuda")

    def run(q, k, v):
        return flex_attention(q, k, v, score_mod=score_mod, block_mask=block_mask, enable_gqa=Hq != Hkv,
                              return_lse=True)

    torch._dynamo.reset()
    cnt = torch._dynamo.testing.CompileCounterWithBackend("inductor")
    out, lse = torch.compile(run, backend=cnt, fullgraph=True)(q, k, v)
    assert cnt.frame_count == 1
    _check_forward_backward(q, k, v, out, lse, score_mod, block_mask, dtype)


def _check_forward_backward(q, k, v, out, lse, score_mod, block_mask, dtype):
    """out, lse and the gradients of a compiled call vs the float64 math path, by conftest's criterion."""
    g = torch.randn_like(out)
    grads = torch.autograd.grad(out, (q, k, v), g)
    ref_out, ref_lse, _ = math_attention(q.detach().double(), k.detach().double(), v.detach().double(),
                                         score_mod, block_mask)
    low_out, low_lse, _ = math_attention(q.detach(), k.detach(), v.detach(), score_mod, block_mask)
    assert_close_to_reference(out, ref_out, low_out, dtype, "out")
    assert_close_to_reference(lse, ref_lse, low_lse, dtype, "lse")
    assert_grads_close(q, k, v, grads, g, score_mod, block_mask, dtype)


@pytest.mark.parametrize("options", [None, {"BACKEND": "MATH"}], ids=["template", "decomposition"])
def test_no_full_score_buffer_and_bounded_memory(options):
    from torch._inductor.utils import run_and_get_code

    B, H, S, E = 1, 8, 4096, 64
    bm = create_block_mask(lambda b, h, q, kv: q >= kv, None, None, S, S, device="cuda")
    q, k, v = make_inputs((B, H, H, S, S, E, E), torch.bfloat16, "cuda")
    torch._dynamo.reset()
    f = torch.compile(lambda q, k, v: flex_attention(q, k, v, block_mask=bm, kernel_options=options),
                      backend="inductor", fullgraph=True)
    out, code = run_and_get_code(f, q, k, v)  # compiles (and autotunes) outside the measurement
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    f(q, k, v)
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated() - base
    full = B * H * S * S
    sizes = [tuple(int(x) for x in s.split(",") if x.strip())
             for s in re.findall(r"empty_strided_cuda\(\(([\d, ]*)\)", "\n".join(code))]
    if options is None:  # the template kernel Inductor generated
        assert "_attn_fwd_inner" in "\n".join(code)
    assert sizes and max(torch.Size(s).numel() for s in sizes) < full
    assert peak < full * 2  # less than one bf16 S×S score matrix
    ref, _, _ = math_attention(q[:, :, :256].double(), k.double(), v.double(), None, bm[:, :, :2])
    low, _, _ = math_attention(q[:, :, :256], k, v, None, bm[:, :, :2])
    assert_close_to_reference(out[:, :, :256], ref, low, torch.bfloat16, "out")


def test_dynamic_lengths_do_not_recompile_on_cuda():
    torch._dynamo.reset()
    cnt = torch._dynamo.testing.CompileCounterWithBackend("inductor")

    def run(q, k, v, bm):
        return flex_attention(q, k, v, block_mask=bm)

    compiled = torch.compile(run, backend=cnt, fullgraph=True, dynamic=True)
    # block counts 3, 5, 7 never equal another dim (duck sizing would tie them and recompile)
    for S in (384, 640, 896):
        bm = create_block_mask(lambda b, h, q, kv: q >= kv, None, None, S, S, device="cuda")
        q, k, v = make_inputs((2, 4, 4, S, S, 64, 64), torch.float16, "cuda")
        out = compiled(q, k, v, bm)
        ref, _, _ = math_attention(q.double(), k.double(), v.double(), None, bm)
        low, _, _ = math_attention(q, k, v, None, bm)
        assert_close_to_reference(out, ref, low, torch.float16, "out")
    assert cnt.frame_count == 1


@pytest.mark.parametrize("variant", ["causal", "document", "relative_bias", "softcap"])
def test_aot_eager_cuda_runs_fused_kernel_fwd_bwd(variant, monkeypatch):
    from inductor_flex import kernel as K

    dims = SHAPES["gqa4x2_E64_Ev32"]
    B, Hq, Hkv, Lq, Lkv, E, Ev = dims
    q, k, v = make_inputs(dims, torch.bfloat16, "cuda", requires_grad=True)
    score_mod, block_mask = make_variant(variant, Lq, Lkv, Hq, "cuda")
    launched = record_calls(monkeypatch, K, "run_forward", lambda plan, *a, **kw: plan.source)
    torch._dynamo.reset()
    out = torch.compile(lambda q, k, v: flex_attention(q, k, v, score_mod=score_mod, block_mask=block_mask,
                                                       enable_gqa=True),
                        backend="aot_eager", fullgraph=True)(q, k, v)
    monkeypatch.undo()
    assert launched and "def flex_fwd_kernel" in launched[0]
    g = torch.randn_like(out)
    grads = torch.autograd.grad(out, (q, k, v), g)
    ref_out, _, _ = math_attention(q.detach().double(), k.detach().double(), v.detach().double(),
                                   score_mod, block_mask)
    low_out, _, _ = math_attention(q.detach(), k.detach(), v.detach(), score_mod, block_mask)
    assert_close_to_reference(out, ref_out, low_out, torch.bfloat16, "out")
    assert_grads_close(q, k, v, grads, g, score_mod, block_mask, torch.bfloat16)


@pytest.mark.parametrize("lowering", ["template", "custom_op"])
@pytest.mark.parametrize("variant", ["causal", "relative_bias", "document"])
def test_inductor_cuda_graph_calls_the_fused_kernel(variant, lowering, monkeypatch):
    from torch._inductor.utils import run_and_get_code

    from inductor_flex.lowering import template

    monkeypatch.setattr(template, "ENABLED", lowering == "template")
    torch._dynamo.reset()

    dims = SHAPES["gqa4x2_E64_Ev32"]
    B, Hq, Hkv, Lq, Lkv, E, Ev = dims
    q, k, v = make_inputs(dims, torch.bfloat16, "cuda")
    score_mod, block_mask = make_variant(variant, Lq, Lkv, Hq, "cuda")
    f = torch.compile(lambda q, k, v: flex_attention(q, k, v, score_mod=score_mod, block_mask=block_mask,
                                                     enable_gqa=True) * 2,
                      backend="inductor", fullgraph=True)
    out, code = run_and_get_code(f, q, k, v)
    text = "\n".join(code)
    if lowering == "template":  # Inductor's own kernel: our template with the mods inlined
        assert "_attn_fwd_inner" in text and "def score_mod(" in text and "inductor_flex.flex_forward" not in text
    else:
        assert "inductor_flex.flex_forward" in text and "def flex_fwd_kernel" in text
    ref, _, _ = math_attention(q.double(), k.double(), v.double(), score_mod, block_mask)
    low, _, _ = math_attention(q, k, v, score_mod, block_mask)
    assert_close_to_reference(out / 2, ref, low, torch.bfloat16, "out")


@pytest.mark.parametrize("variant", ["noop", "causal", "document", "softcap", "relative_bias", "learned_bias"])
def test_inductor_cuda_backward_runs_fused_kernels(variant, monkeypatch):
    """The compiled backward: the backward template's dK/dV and dQ kernels rendered by Inductor
    (lowering/backward.py), also with relative_bias's frozen table; with a table that requires grad
    (its gradient summed by atomics), one inductor_flex::flex_backward op running the eager kernels."""
    import inductor_flex.backward as backward_mod
    from torch._inductor.utils import run_and_get_code

    calls = record_calls(monkeypatch, backward_mod, "run_backward")
    dims = (2, 8, 2, 1000, 1000, 128, 128)
    B, Hq, Hkv, Lq, Lkv, E, Ev = dims
    q, k, v = make_inputs(dims, torch.bfloat16, "cuda", requires_grad=True)
    score_mod, block_mask = make_variant("relative_bias" if variant == "learned_bias" else variant, Lq, Lkv, Hq,
                                         "cuda", block=128)
    if variant == "learned_bias":
        table = torch.randn(Hq, 2 * Lq - 1, device="cuda", requires_grad=True)

        def score_mod(score, b, h, q_idx, kv_idx):
            return score + table[h, q_idx - kv_idx + Lq - 1]
    torch._dynamo.reset()
    f = torch.compile(lambda q, k, v: flex_attention(q, k, v, score_mod=score_mod, block_mask=block_mask,
                                                     enable_gqa=True), backend="inductor", fullgraph=True)
    g = torch.randn(B, Hq, Lq, Ev, device="cuda", dtype=torch.bfloat16)
    grads, code = run_and_get_code(lambda: torch.autograd.grad(f(q, k, v), (q, k, v), g))
    text = "\n".join(code)
    if variant == "learned_bias":
        assert len(calls) == 1 and "inductor_flex.flex_backward" in text
    else:
        assert not calls and "inductor_flex.flex_backward" not in text
        assert "_bwd_dkdv_inner" in text and "_bwd_dq_inner" in text
    assert_grads_close(q, k, v, grads, g, score_mod, block_mask, torch.bfloat16)


@pytest.mark.parametrize("variant", ["noop", "document", "softcap"])
def test_template_max_autotune(variant):
    """mode="max-autotune" benchmarks every config of lowering/configs.py through Inductor."""
    from torch._inductor.utils import run_and_get_code

    dims = (2, 4, 4, 1024, 1024, 64, 64)
    B, Hq, Hkv, Lq, Lkv, E, Ev = dims
    q, k, v = make_inputs(dims, torch.bfloat16, "cuda")
    score_mod, block_mask = make_variant(variant, Lq, Lkv, Hq, "cuda", block=128)
    torch._dynamo.reset()
    f = torch.compile(lambda q, k, v: flex_attention(q, k, v, score_mod=score_mod, block_mask=block_mask),
                      mode="max-autotune-no-cudagraphs", fullgraph=True)
    out, code = run_and_get_code(f, q, k, v)
    assert "_attn_fwd_inner" in "\n".join(code)
    ref, _, _ = math_attention(q.double(), k.double(), v.double(), score_mod, block_mask)
    low, _, _ = math_attention(q, k, v, score_mod, block_mask)
    assert_close_to_reference(out, ref, low, torch.bfloat16, "out")


def test_template_fuses_neighbours():
    """Pointwise work after the attention is fused into the template's store (one kernel)."""
    from torch._inductor.utils import run_and_get_code

    dims = SHAPES["Lq50_Lkv97"]
    q, k, v = make_inputs(dims, torch.float16, "cuda")
    torch._dynamo.reset()
    f = torch.compile(lambda q, k, v: torch.relu(flex_attention(q, k, v)) * 3, fullgraph=True)
    out, code = run_and_get_code(f, q, k, v)
    text = "\n".join(code)
    assert "_attn_fwd_inner" in text
    assert text.count("async_compile.triton(") == 1, "the epilogue was not fused into the template"
    ref, _, _ = math_attention(q.double(), k.double(), v.double())
    low, _, _ = math_attention(q, k, v)
    assert_close_to_reference(out, torch.relu(ref) * 3, torch.relu(low) * 3, torch.float16, "out")


@pytest.mark.parametrize("opts", [{}, {"FAST_TANH": False}], ids=["default", "exact"])
def test_compiled_softcap_tanh(opts):
    """bf16 softcap under torch.compile: the Inductor-rendered forward and backward use the hardware
    tanh by default where Inductor prints inline asm (compat.inductor_lowers_inline_asm), the exact form
    otherwise or with FAST_TANH=False; both meet the criterion."""
    from inductor_flex import compat
    from inductor_flex.variants import generate_causal_mask, generate_tanh_softcap
    from torch._inductor.utils import run_and_get_code

    dims = (2, 8, 2, 1000, 1000, 128, 128)
    q, k, v = make_inputs(dims, torch.bfloat16, "cuda", requires_grad=True)
    score_mod = generate_tanh_softcap(20.0)
    bm = create_block_mask(generate_causal_mask(), None, None, 1000, 1000, device="cuda")
    torch._dynamo.reset()
    f = torch.compile(lambda q, k, v: flex_attention(q, k, v, score_mod=score_mod, block_mask=bm, enable_gqa=True,
                                                     kernel_options=opts), fullgraph=True)
    g = torch.randn(2, 8, 1000, 128, device="cuda", dtype=torch.bfloat16)

    def step():
        out = f(q, k, v)
        return out, torch.autograd.grad(out, (q, k, v), g)

    (out, grads), code = run_and_get_code(step)
    # every kernel carries the eager printer's helpers; _tanh_approx's own asm is not a use
    text = re.sub(r"def _tanh_approx\(x\):.*?pack=1\)", "", "\n".join(code), flags=re.S)
    assert "_bwd_dkdv_inner" in text and "inductor_flex.flex_backward" not in text
    fast = opts.get("FAST_TANH", True) and compat.inductor_lowers_inline_asm()
    assert ("tanh.approx.f32" in text) == fast
    ref, _, _ = math_attention(q.detach().double(), k.detach().double(), v.detach().double(), score_mod, bm)
    low, _, _ = math_attention(q.detach(), k.detach(), v.detach(), score_mod, bm)
    assert_close_to_reference(out.detach(), ref, low, torch.bfloat16, "out")
    assert_grads_close(q, k, v, grads, g, score_mod, bm, torch.bfloat16)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("variant", ["document", "sliding_window"])
def test_inductor_walks_the_refined_block_mask(variant, dtype):
    # create_block_mask kept a 64 x 64 refinement: the compiled templates take it, forward and backward
    dims = (2, 8, 2, 1000, 1000, 128, 128)
    B, Hq, Hkv, Lq, Lkv, E, Ev = dims
    q, k, v = make_inputs(dims, dtype, "cuda", requires_grad=True)
    score_mod, block_mask = make_variant(variant, Lq, Lkv, Hq, "cuda", block=128)
    assert block_mask.refined is not None and block_mask.refined.BLOCK_SIZE == (64, 64)

    def run(q, k, v):
        return flex_attention(q, k, v, block_mask=block_mask, enable_gqa=True, return_lse=True)

    torch._dynamo.reset()
    out, lse = torch.compile(run, backend="inductor", fullgraph=True)(q, k, v)
    _check_forward_backward(q, k, v, out, lse, None, block_mask, dtype)


@pytest.mark.parametrize("variant,shape", [("causal", "odd37_E40"), ("empty_rows", "odd37_E40"),
                                           ("softcap", "gqa4x2_E64_Ev32"), ("document", "Lq50_Lkv97")],
                         ids=lambda x: str(x))
def test_inductor_cuda_lse_gradient(variant, shape):
    # a loss that reads the returned lse: the compiled dQ kernel folds dLSE into delta (HAS_GRAD_LSE)
    dtype = torch.bfloat16
    dims = SHAPES[shape]
    B, Hq, Hkv, Lq, Lkv, E, Ev = dims
    q, k, v = make_inputs(dims, dtype, "cuda")
    score_mod, block_mask = make_variant(variant, Lq, Lkv, Hq, "cuda")
    g_out = torch.randn(B, Hq, Lq, Ev, device="cuda")
    g_lse = torch.randn(B, Hq, Lq, device="cuda")

    def grads(fn, dt):
        leaves = [t.detach().to(dt).requires_grad_(True) for t in (q, k, v)]
        out, lse = fn(*leaves)
        loss = (out * g_out.to(out.dtype)).sum() + (torch.where(torch.isfinite(lse), lse, 0) * g_lse.to(lse.dtype)).sum()
        return torch.autograd.grad(loss, leaves)

    torch._dynamo.reset()
    compiled = torch.compile(lambda q, k, v: flex_attention(q, k, v, score_mod=score_mod, block_mask=block_mask,
                                                            enable_gqa=Hq != Hkv, return_lse=True),
                             backend="inductor", fullgraph=True)

    def math(q, k, v):
        return math_attention(q, k, v, score_mod, block_mask)[:2]

    got, ref, low = grads(compiled, dtype), grads(math, torch.float64), grads(math, dtype)
    for name, a, r, lo in zip(("dq", "dk", "dv"), got, ref, low):
        assert_close_to_reference(a, r, lo, dtype, name)


@pytest.mark.parametrize("variant", ["noop", "alibi"])
def test_inductor_warp_specialized_forward(variant):
    # the Inductor-rendered forward with the warp-specialized config (Q/K/V through TMA descriptors
    # of contiguous [B, H, L, D] inputs, GQA, an odd length); kernel_options keep only that config
    from torch._inductor.utils import run_and_get_code

    dims = (2, 8, 4, 1000, 1000, 128, 128)
    q, k, v = make_inputs(dims, torch.bfloat16, "cuda", requires_grad=True)
    score_mod, bm = make_variant(variant, dims[3], dims[4], dims[1], "cuda")
    assert bm is None  # no BlockMask: the specialized loop's condition
    fn = torch.compile(lambda q, k, v: flex_attention(q, k, v, score_mod=score_mod, enable_gqa=True, return_lse=True,
                                                      kernel_options={"WARP_SPECIALIZE": True}), fullgraph=True)
    g = torch.randn(*dims[:2], dims[3], dims[6], device="cuda", dtype=torch.bfloat16)

    def step():
        out, lse = fn(q, k, v)
        return out, lse, torch.autograd.grad(out, (q, k, v), g)

    (out, lse, grads), code = run_and_get_code(step)
    code = "\n".join(code)
    assert "'WARP_SPECIALIZE': True" in code and "'WARP_SPECIALIZE': False" not in code
    ref_out, ref_lse, _ = math_attention(q.double(), k.double(), v.double(), score_mod, None)
    low_out, low_lse, _ = math_attention(q, k, v, score_mod, None)
    assert_close_to_reference(out, ref_out, low_out, torch.bfloat16, "out")
    assert_close_to_reference(lse, ref_lse, low_lse, torch.bfloat16, "lse")
    assert_grads_close(q, k, v, grads, g, score_mod, None, torch.bfloat16)


@pytest.mark.parametrize("variant", ["causal", "prefix_lm", "causal_softcap", "sliding_window"])
def test_inductor_block_mask_runs(variant):
    # a BlockMask of 128-blocks whose lists are runs, passed as an argument: the compiled forward,
    # dQ and dK/dV walk the runs (RUNS) and the forward may take the warp-specialized config over
    # them (kernel_options keep only it here); a sliding window's lists are not runs, but each row's
    # blocks are one run together: the specialized forward walks that, dQ and dK/dV their lists.
    # Then a mask with a gap (no run) through the same function: it recompiles to the index walk
    from torch._inductor.utils import run_and_get_code

    from inductor_flex import create_block_mask
    from inductor_flex import variants as V

    dims = (2, 8, 4, 1000, 1000, 128, 128)
    q, k, v = make_inputs(dims, torch.bfloat16, "cuda", requires_grad=True)
    mask_mod = {"prefix_lm": V.generate_prefix_lm_mask(300),
                "sliding_window": V.generate_sliding_window(256)}.get(variant, V.generate_causal_mask())
    score_mod = V.generate_tanh_softcap(20.0) if variant == "causal_softcap" else None
    fn = torch.compile(lambda q, k, v, bm: flex_attention(q, k, v, score_mod=score_mod, block_mask=bm, enable_gqa=True,
                                                          kernel_options={"WARP_SPECIALIZE": True}), fullgraph=True)
    g = torch.randn(*dims[:2], dims[3], dims[6], device="cuda", dtype=torch.bfloat16)
    gap = create_block_mask(lambda b, h, q, kv: (kv < 200) | (kv >= 700), None, None, 1000, 1000, device="cuda")
    for bm, ws in ((create_block_mask(mask_mod, None, None, 1000, 1000, device="cuda"), True), (gap, False)):
        assert bm.BLOCK_SIZE == (128, 128) and bm.refined is None and bm._union_kv == ws
        runs_kv, runs_q = bool(bm._runs_kv), bool(bm._runs_q)

        def step():
            out = fn(q, k, v, bm)
            return out, torch.autograd.grad(out, (q, k, v), g)

        (out, grads), code = run_and_get_code(step)
        code = "\n".join(code)
        # forward (runs, or the specialized union walk), dQ (kv runs), dK/dV (q runs: the gap
        # mask's kv columns are all full or all partial, so its q side is a run)
        assert code.count("'RUNS': True") == int(runs_kv or ws) + int(runs_kv) + int(runs_q)
        assert ("'WARP_SPECIALIZE': True" in code) == ws
        ref_out, _, _ = math_attention(q.double(), k.double(), v.double(), score_mod, bm)
        low_out, _, _ = math_attention(q, k, v, score_mod, bm)
        assert_close_to_reference(out, ref_out, low_out, torch.bfloat16, "out")
        assert_grads_close(q, k, v, grads, g, score_mod, bm, torch.bfloat16)


@pytest.mark.parametrize("variant", ["causal", "document", "softcap", "relative_bias_table"])
def test_reduce_overhead_training_steps(variant):
    """mode="reduce-overhead" (CUDA graphs, the way to run steps too short for the host's launch
    work): the fused forward and backward are captured, nothing makes Inductor skip the graphs, and
    replays with new inputs (and, for a learnable table, its gradient) match the reference."""
    from torch._dynamo.utils import counters

    from cases import LEARNABLE, LEARNABLE_LEN

    dims = (2, 4, 2, LEARNABLE_LEN, LEARNABLE_LEN, 64, 48)  # GQA, odd length, V dim != QK dim
    B, Hq, Hkv, Lq, Lkv, E, Ev = dims
    dtype = torch.bfloat16
    caps = []
    if variant in LEARNABLE:
        factory, make = LEARNABLE[variant]
        caps = [c.cuda().requires_grad_() for c in make(Hq)]
        score_mod, block_mask = factory(*caps), None
    else:
        score_mod, block_mask = make_variant(variant, Lq, Lkv, Hq, "cuda")
    q, k, v = make_inputs(dims, dtype, "cuda", requires_grad=True)
    torch._dynamo.reset()
    counters.clear()
    step = torch.compile(lambda q, k, v: flex_attention(q, k, v, score_mod=score_mod, block_mask=block_mask,
                                                        enable_gqa=True),
                         mode="reduce-overhead", fullgraph=True)
    for i in range(4):  # warm-up, recording, then replays
        torch.compiler.cudagraph_mark_step_begin()
        with torch.no_grad():
            for t in (q, k, v):
                t.copy_(torch.randn_like(t))
        out = step(q, k, v)
        g = torch.randn_like(out)
        grads = torch.autograd.grad(out, (q, k, v, *caps), g)
        out = out.clone()  # (the graph's output buffer is reused by the next replay)
        assert_grads_close(q, k, v, grads[:3], g, score_mod, block_mask, dtype)
        ref_out, _, _ = math_attention(q.detach().double(), k.detach().double(), v.detach().double(), score_mod, block_mask)
        low_out, _, _ = math_attention(q.detach(), k.detach(), v.detach(), score_mod, block_mask)
        assert_close_to_reference(out, ref_out, low_out, dtype, f"out (step {i})")
        if caps:
            leaves = [c.detach().double().requires_grad_() for c in caps]
            ref_fn = LEARNABLE[variant][0](*leaves)
            ref = math_attention(q.detach().double(), k.detach().double(), v.detach().double(), ref_fn, None)[0]
            ref_grad = torch.autograd.grad(ref, leaves, g.double())[0]
            low_leaves = [c.detach().requires_grad_() for c in caps]
            low = math_attention(q.detach(), k.detach(), v.detach(), LEARNABLE[variant][0](*low_leaves), None)[0]
            low_grad = torch.autograd.grad(low, low_leaves, g)[0]
            assert_close_to_reference(grads[3], ref_grad, low_grad, dtype, "table grad")
    assert not counters["inductor"]["cudagraph_skips"], dict(counters["inductor"])
    # q, k, v are the graphs' non-static inputs: counted when a forward or backward graph is recorded
    assert counters["inductor"]["cudagraph_recorded_non_static_inputs"] > 0, dict(counters["inductor"])
