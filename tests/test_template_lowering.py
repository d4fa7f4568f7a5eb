"""The forward template lowered by Inductor (lowering/template.py), on CPU.

Inductor renders templates/flex_forward.py.jinja with the mods lowered into its hooks; here the
graph's Triton kernels come from Inductor's Triton CPU backend and run in Triton's interpreter
(the `interpreted_inductor` fixture swaps Inductor's kernel loader for one that does that), so CI
checks the numerics of the very source Inductor generates. The GPU suite runs the same on CUDA."""
import pytest
import torch

from inductor_flex import flex_attention
from inductor_flex.lowering import template

from cases import SHAPES, make_inputs, make_variant, run_walk_mask_mod
from inductor_interpreter import InterpretedKernel
from conftest import (assert_close_to_reference, assert_grads_close, check_dynamic_lengths, compile_counter, reference64,
                      reference_same_dtype)


def _compiled(score_mod, block_mask, gqa, **kw):
    def run(q, k, v):
        return flex_attention(q, k, v, score_mod=score_mod, block_mask=block_mask, enable_gqa=gqa,
                              return_lse=True, **kw)

    cnt = compile_counter("inductor")
    return torch.compile(run, backend=cnt, fullgraph=True), cnt


CASES = [(v, "odd37_E40", torch.float32) for v in (
    "noop", "causal", "sliding_window", "document", "alibi", "softcap", "relative_bias", "head_scale",
    "random_blocks", "ops_soup", "empty_rows")] + [
    ("causal", "Lq50_Lkv97", torch.float32), ("relative_bias", "gqa4x2_E64_Ev32", torch.float32),
    ("noop", "Lq50_Lkv97", torch.float16), ("document", "gqa4x2_E64_Ev32", torch.float16),
    ("alibi", "E128_Lq33_Lkv65", torch.float16),
]


@pytest.mark.parametrize("variant,shape,dtype", CASES,
                         ids=[f"{v}-{s}-{str(d)[6:]}" for v, s, d in CASES])
def test_inductor_renders_the_template(interpreted_inductor, variant, shape, dtype):
    from torch._inductor.utils import run_and_get_code

    dims = SHAPES[shape]
    B, Hq, Hkv, Lq, Lkv, E, Ev = dims
    q, k, v = make_inputs(dims, dtype, "cpu")
    score_mod, block_mask = make_variant(variant, Lq, Lkv, Hq, "cpu")
    fn, cnt = _compiled(score_mod, block_mask, Hq != Hkv)
    (out, lse), code = run_and_get_code(fn, q, k, v)
    code = "\n".join(code)
    assert cnt.frame_count == 1
    # Inductor's template kernel, not the custom op and not the decomposition
    assert "_attn_fwd_inner" in code and "def score_mod(" in code
    assert "inductor_flex.flex_forward" not in code
    if variant == "softcap":
        # tanh reaches the kernel as exp2, not as libdevice's slow tanh or accurate exp
        assert "exp2(" in code and "libdevice.tanh" not in code and "libdevice.exp(" not in code
    ref_out, ref_lse, _ = reference64(q, k, v, score_mod, block_mask)
    low_out, low_lse, _ = reference_same_dtype(q, k, v, score_mod, block_mask)
    assert_close_to_reference(out, ref_out, low_out, dtype, "out")
    assert_close_to_reference(lse, ref_lse, low_lse, dtype, "lse")


def test_fast_tanh_prints_the_hardware_tanh(interpreted_inductor, monkeypatch):
    """FAST_TANH (the GPU's 16-bit default) under Inductor: tanh in the forward and backward templates
    becomes inductor_flex::tanh_approx, printed as tl.inline_asm_elementwise('tanh.approx.f32 ...')
    where Inductor prints inline asm. Forced on here on CPU; the interpreter runs it as tanh."""
    from inductor_flex import compat
    from inductor_flex.lowering import backward as lowering_backward
    from torch._inductor.utils import run_and_get_code

    if not compat.inductor_lowers_inline_asm():
        pytest.fail("torch 2.13 (CI) prints inline asm; this check covers it")
    for mod in (template, lowering_backward):
        monkeypatch.setattr(mod, "use_fast_tanh", lambda opts, dtype, on_gpu: True)
    dims = SHAPES["odd37_E40"]
    q, k, v = make_inputs(dims, torch.float32, "cpu", requires_grad=True)
    score_mod, block_mask = make_variant("softcap", dims[3], dims[4], dims[1], "cpu")
    fn, cnt = _compiled(score_mod, block_mask, False)
    g = torch.randn(*dims[:2], dims[3], dims[6])

    def step():
        out, _ = fn(q, k, v)
        return out, torch.autograd.grad(out, (q, k, v), g)

    (out, grads), code = run_and_get_code(step)
    code = "\n".join(code)
    assert code.count("tl.inline_asm_elementwise('tanh.approx.f32") >= 3  # forward, dK/dV, dQ
    assert "libdevice.tanh" not in code
    ref_out, _, _ = reference64(q.detach(), k.detach(), v.detach(), score_mod, block_mask)
    low_out, _, _ = reference_same_dtype(q.detach(), k.detach(), v.detach(), score_mod, block_mask)
    assert_close_to_reference(out.detach(), ref_out, low_out, torch.float32, "out")
    assert_grads_close(q, k, v, grads, g, score_mod, block_mask, torch.float32)


def test_captured_tensors_are_kernel_arguments(interpreted_inductor):
    """New values of a captured table reuse the compiled kernel (no recompile) and are read."""
    dims = SHAPES["odd37_E40"]
    q, k, v = make_inputs(dims, torch.float32, "cpu")
    table = torch.randn(2, 80)

    def run(q, k, v, table):
        def bias(score, b, h, q_idx, kv_idx):
            return score + table[h, kv_idx - q_idx + 40]
        return flex_attention(q, k, v, score_mod=bias)

    cnt = compile_counter("inductor")
    fn = torch.compile(run, backend=cnt, fullgraph=True)
    for _ in range(2):
        table = torch.randn(2, 80)
        out = fn(q, k, v, table)

        def bias(score, b, h, q_idx, kv_idx):
            return score + table[h, kv_idx - q_idx + 40]
        ref, _, _ = reference64(q, k, v, bias)
        low, _, _ = reference_same_dtype(q, k, v, bias)
        assert_close_to_reference(out, ref, low, torch.float32)
    assert cnt.frame_count == 1


def test_backward_after_template_forward(interpreted_inductor):
    """Training through the template's out and lse: the fused backward kernels (the custom op;
    BACKEND "TRITON" asks for them on CPU) read the template's outputs."""
    dims = SHAPES["Lq50_Lkv97"]
    B, Hq, Hkv, Lq, Lkv, E, Ev = dims
    q, k, v = make_inputs(dims, torch.float32, "cpu", requires_grad=True)
    score_mod, block_mask = make_variant("alibi", Lq, Lkv, Hq, "cpu")
    fn, cnt = _compiled(score_mod, block_mask, False, kernel_options={"BACKEND": "TRITON"})
    out, lse = fn(q, k, v)
    g = torch.randn_like(out)
    grads = torch.autograd.grad(out, (q, k, v), g)
    assert_grads_close(q, k, v, grads, g, score_mod, block_mask, torch.float32)


@pytest.mark.skipif(torch.cuda.is_available(), reason="the GPU suite compiles these for real")
def test_inductor_sources_compile_for_sm90(interpreted_inductor, tmp_path, monkeypatch):
    """The kernels Inductor renders from the template (dense, sparse with captured tensors, tanh)
    compile to sm_90 cubin with the signature and launch options Inductor chose."""
    import os
    import subprocess
    import sys

    from inductor_flex.lowering import backward as backward_template
    from inductor_flex.lowering.configs import backward_configs

    InterpretedKernel.sources.clear()
    for variant, shape, dtype in [("noop", "Lq50_Lkv97", torch.float16), ("document", "gqa4x2_E64_Ev32", torch.float16),
                                  ("softcap", "E128_Lq33_Lkv65", torch.bfloat16), ("relative_bias", "odd37_E40",
                                                                                   torch.float32)]:
        dims = SHAPES[shape]
        q, k, v = make_inputs(dims, dtype, "cpu")
        score_mod, block_mask = make_variant(variant, dims[3], dims[4], dims[1], "cpu", block=128)
        # the H100's default tile config (the interpreter's 16x16 would be picked on CPU otherwise)
        fn, _ = _compiled(score_mod, block_mask, dims[1] != dims[2],
                          kernel_options=dict(BLOCK_M=128, BLOCK_N=64, num_warps=8, num_stages=3))
        fn(q, k, v)  # (bf16 runs garbage through the interpreter's dot; only the source matters here)
    # the warp-specialized forward config (TMA descriptors, specialized kv loop), bf16 and fp16
    with monkeypatch.context() as m:
        _ws_on_cpu(m)
        for variant, shape, dtype in [("noop", "gqa4x2_E64_Ev32", torch.float16),
                                      ("alibi", "E128_Lq33_Lkv65", torch.bfloat16),
                                      ("causal", "E128_Lq33_Lkv65", torch.bfloat16)]:  # BlockMask runs
            dims = SHAPES[shape]
            q, k, v = make_inputs(dims, dtype, "cpu")
            score_mod, block_mask = make_variant(variant, dims[3], dims[4], dims[1], "cpu", block=128)
            fn, _ = _compiled(score_mod, block_mask, dims[1] != dims[2], kernel_options=WS_PIN)
            fn(q, k, v)
    # the backward templates (dK/dV, dQ), with the H100's first backward candidates
    monkeypatch.setattr(backward_template, "backward_configs", lambda *a: backward_configs(*a[:5], False)[:1])
    for variant, shape, dtype in [("noop", "Lq50_Lkv97", torch.float16), ("document", "gqa4x2_E64_Ev32", torch.float16),
                                  ("softcap", "E128_Lq33_Lkv65", torch.float16)]:
        dims = SHAPES[shape]
        q, k, v = make_inputs(dims, dtype, "cpu", requires_grad=True)
        score_mod, block_mask = make_variant(variant, dims[3], dims[4], dims[1], "cpu", block=128)
        fn, _ = _compiled(score_mod, block_mask, dims[1] != dims[2])
        fn(q, k, v)[0].sum().backward()
    sources = sorted(set(InterpretedKernel.sources))
    ws = [s for s in sources if "WARP_SPECIALIZE : tl.constexpr = True" in s]
    assert {"HAS_SCORE_MOD : tl.constexpr = True" in s for s in ws} == {True, False}  # ALiBi and noop
    assert any("RUNS : tl.constexpr = True" in s and "MASK_ON_FULL : tl.constexpr = True" in s for s in ws)  # causal
    assert sum("_bwd_dkdv_inner" in s for s in sources) >= 3 and sum("_bwd_dq_inner" in s for s in sources) >= 3
    assert len(sources) >= 10
    for i, src in enumerate(sources):
        (tmp_path / f"kernel_{i}.py").write_text(src)
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.update(SM90_ONLY="inductor", SM90_INDUCTOR_DIR=str(tmp_path))
    script = os.path.join(os.path.dirname(__file__), "sm90_matrix.py")
    res = subprocess.run([sys.executable, script], env=env, capture_output=True, text=True, timeout=1200)
    print(res.stdout[-3000:])
    assert res.returncode == 0, res.stdout[-4000:] + res.stderr[-4000:]
    assert f"{len(sources)}/{len(sources)} specializations compiled for sm_90" in res.stdout


def _block_sets(num, idx):
    """{(row, kv block)} that a BlockMask's num/index tensors list, for batch 0, head 0."""
    return {(r, int(idx[0, 0, r, j])) for r in range(num.shape[-1]) for j in range(int(num[0, 0, r]))}


@pytest.mark.parametrize("has_full", [True, False], ids=["with_full_blocks", "partial_only"])
def test_autotune_stand_in_block_mask_is_causal(monkeypatch, has_full):
    """Inductor benchmarks the template configs on stand-in BlockMask tensors: they list the blocks
    of a causal mask (diagonal partial, the rest full), shaped like the real ones."""
    from inductor_flex import create_block_mask
    from inductor_flex import compat

    monkeypatch.setattr(compat, "size_hint", int)
    real = create_block_mask(lambda b, h, q, k: q >= k, None, None, 640, 640, device="cpu")
    nq, nk = real.kv_indices.shape[-2:]

    gen = template._stand_in_block_mask(has_full, nq, nk)
    full_idx_shape = real.full_kv_indices if has_full else real.full_kv_indices[..., :1]
    made = [gen[5 + i](_Sized(t)) for i, t in enumerate(
        (real.kv_num_blocks, real.kv_indices, real.full_kv_num_blocks, full_idx_shape))]
    for m, t in zip(made, (real.kv_num_blocks, real.kv_indices, real.full_kv_num_blocks, full_idx_shape)):
        assert m.shape == t.shape and m.dtype == torch.int32
    partial, full = _block_sets(made[0], made[1]), _block_sets(made[2], made[3])
    want_partial = _block_sets(real.kv_num_blocks, real.kv_indices)
    want_full = _block_sets(real.full_kv_num_blocks, real.full_kv_indices)
    if has_full:
        assert partial == want_partial and full == want_full
    else:
        assert partial == want_partial | want_full and not full


@pytest.mark.parametrize("known", [True, False], ids=["recorded", "unknown"])
def test_config_benchmarks_use_the_real_block_mask(interpreted_inductor, monkeypatch, known):
    """When the BlockMask's tensors are inputs of the compiled frame, Inductor's config benchmarks
    run on copies of them (lowering/tuning_masks.py); when Dynamo cannot see their values, on the
    causal stand-in."""
    from inductor_flex import compat, create_block_mask
    from inductor_flex.variants import generate_causal_mask, generate_doc_mask_mod

    seen = {}
    real_select = compat.select_template

    def spy(name, choices, inputs, layout, gen):
        seen["made"] = [gen[5 + i](inputs[5 + i]) for i in range(4)]
        return real_select(name, choices, inputs, layout, gen)

    monkeypatch.setattr(compat, "select_template", spy)
    torch._dynamo.reset()  # the lambda below is one code object for both cases
    if not known:
        monkeypatch.setattr(compat, "dynamo_input_value", lambda vt: None)
    dims = SHAPES["odd37_E40"]
    B, Hq, Hkv, Lq, Lkv, E, Ev = dims
    q, k, v = make_inputs(dims, torch.float32, "cpu")
    ids = torch.tensor([0] * 5 + [1] * 20 + [2] * 12, dtype=torch.int32)
    bm = create_block_mask(generate_doc_mask_mod(generate_causal_mask(), ids), None, None, Lq, Lkv, device="cpu",
                           BLOCK_SIZE=16)
    out = torch.compile(lambda q, k, v, bm: flex_attention(q, k, v, block_mask=bm), fullgraph=True)(q, k, v, bm)
    real = [bm.kv_num_blocks, bm.kv_indices, bm.full_kv_num_blocks, bm.full_kv_indices]
    nq, nk = bm.kv_indices.shape[-2:]
    stand_in = template._stand_in_block_mask(True, nq, nk)
    monkeypatch.setattr(compat, "size_hint", int)  # outside a graph lowering
    want = real if known else [stand_in[5 + i](_Sized(t)) for i, t in enumerate(real)]
    for made, w in zip(seen["made"], want):
        assert torch.equal(made, w.to(torch.int32))
    ref, _, _ = reference64(q, k, v, None, bm)
    low, _, _ = reference_same_dtype(q, k, v, None, bm)
    assert_close_to_reference(out, ref, low, torch.float32)


class _Sized:
    def __init__(self, t):
        self.t = t

    def get_size(self):
        return list(self.t.shape)

    def get_device(self):
        return torch.device("cpu")


@pytest.mark.parametrize("scale", [-0.5, 0.0], ids=["negative", "zero"])
def test_template_any_scale(interpreted_inductor, scale):
    """Scales the forward template cannot fold into its exp2 argument take the score_mod path under
    Inductor too; the backward templates mask after scaling, so any scale works there."""
    dims = SHAPES["Lq50_Lkv97"]
    B, Hq, Hkv, Lq, Lkv, E, Ev = dims
    q, k, v = make_inputs(dims, torch.float32, "cpu", requires_grad=True)
    score_mod, block_mask = make_variant("causal", Lq, Lkv, Hq, "cpu")
    fn, cnt = _compiled(score_mod, block_mask, False, scale=scale)
    out, lse = fn(q, k, v)
    g = torch.randn_like(out)
    grads = torch.autograd.grad(out, (q, k, v), g)
    q, k, v = q.detach(), k.detach(), v.detach()
    ref_out, ref_lse, _ = reference64(q, k, v, score_mod, block_mask, scale)
    low_out, low_lse, _ = reference_same_dtype(q, k, v, score_mod, block_mask, scale)
    assert_close_to_reference(out.detach(), ref_out, low_out, torch.float32, "out")
    assert_close_to_reference(lse.detach(), ref_lse, low_lse, torch.float32, "lse")

    def math_grads(dtype):
        leaves = [t.to(dtype).requires_grad_() for t in (q, k, v)]
        o, _, _ = reference_same_dtype(*leaves, score_mod, block_mask, scale)
        return torch.autograd.grad(o, leaves, g.to(dtype))

    for name, a, r, lo in zip(("dq", "dk", "dv"), grads, math_grads(torch.float64), math_grads(torch.float32)):
        assert_close_to_reference(a, r, lo, torch.float32, name)


@pytest.mark.parametrize("pays", [False, True], ids=["small-one_choice", "large-all_choices"])
def test_small_problems_take_one_config(interpreted_inductor, monkeypatch, pays):
    """As in the eager path, a problem below configs.AUTOTUNE_MIN_PAIRS gives Inductor one forward
    choice (nothing to benchmark); above it, every candidate."""
    from inductor_flex import compat
    from inductor_flex.lowering import configs
    from inductor_flex.lowering.configs import Config

    cands = [Config(16, 16, 1, 1), Config(16, 16, 2, 1), Config(32, 16, 1, 1)]
    monkeypatch.setattr(template, "forward_configs", lambda *a, **kw: list(cands))
    if pays:
        monkeypatch.setattr(configs, "AUTOTUNE_MIN_PAIRS", 1)
    counts = []
    real_select = compat.select_template

    def spy(name, choices, inputs, layout, gen):
        counts.append((name, len(choices)))
        return real_select(name, choices[:1], inputs, layout, gen)  # (no benchmarks on CPU)

    monkeypatch.setattr(compat, "select_template", spy)
    torch._dynamo.reset()
    dims = SHAPES["odd37_E40"]
    q, k, v = make_inputs(dims, torch.float32, "cpu")
    out = torch.compile(lambda q, k, v: flex_attention(q, k, v), fullgraph=True)(q, k, v)
    assert counts == [("inductor_flex_forward", 3 if pays else 1)]
    ref, _, _ = reference64(q, k, v, None, None)
    low, _, _ = reference_same_dtype(q, k, v, None, None)
    assert_close_to_reference(out, ref, low, torch.float32)


def _ws_on_cpu(monkeypatch):
    # the warp-specialized config's rule as it is, with "a Hopper GPU" granted (CPU here: the
    # interpreter runs the specialized source unspecialized)
    from inductor_flex.lowering import configs

    monkeypatch.setattr(configs, "warp_specialize_supported", lambda device: True)


WS_PIN = dict(BLOCK_M=128, BLOCK_N=128, num_warps=4, num_stages=2, WARP_SPECIALIZE=True)


@pytest.mark.parametrize("variant,shape", [("noop", "E128_Lq33_Lkv65"), ("alibi", "gqa4x2_E64_Ev32")])
def test_warp_specialized_config_renders(interpreted_inductor, monkeypatch, variant, shape):
    """The Inductor forward with the warp-specialized config: Q, K, V through TMA descriptors of
    the [B·H·L, D] row matrices (lengths past a head's end read 0), the kv loop specialized; the
    separable form is off there (Triton 3.6 does not build it)."""
    from torch._inductor.utils import run_and_get_code

    _ws_on_cpu(monkeypatch)
    dims = SHAPES[shape]
    q, k, v = make_inputs(dims, torch.float16, "cpu")
    score_mod, block_mask = make_variant(variant, dims[3], dims[4], dims[1], "cpu")
    fn, _ = _compiled(score_mod, block_mask, dims[1] != dims[2], kernel_options=WS_PIN)
    (out, lse), code = run_and_get_code(fn, q, k, v)
    code = "\n".join(code)
    assert "'WARP_SPECIALIZE': True" in code and "'USE_TMA': True" in code and "'SEPARABLE': True" not in code
    ref_out, ref_lse, _ = reference64(q, k, v, score_mod, block_mask)
    low_out, low_lse, _ = reference_same_dtype(q, k, v, score_mod, block_mask)
    assert_close_to_reference(out, ref_out, low_out, torch.float16, "out")
    assert_close_to_reference(lse, ref_lse, low_lse, torch.float16, "lse")
    if dims[1] == 1:
        return
    # a transposed view ([B, L, H, D] memory) is no row matrix: the same config runs the plain loop
    fn, _ = _compiled(score_mod, block_mask, dims[1] != dims[2], kernel_options=WS_PIN)
    qt = q.transpose(1, 2).contiguous().transpose(1, 2)
    (out_t, _), code = run_and_get_code(fn, qt, k, v)
    code = "\n".join(code)
    assert "'WARP_SPECIALIZE': False" in code and "'WARP_SPECIALIZE': True" not in code
    assert_close_to_reference(out_t, ref_out, low_out, torch.float16, "out (transposed q)")


def test_warp_specialized_config_under_dynamic_shapes(interpreted_inductor, monkeypatch):
    """Symbolic lengths: the row-matrix test reads the static layout (strides as expressions of the
    lengths) without adding guards, and a second length reuses the graph."""
    _ws_on_cpu(monkeypatch)
    check_dynamic_lengths(lambda q, k, v: flex_attention(q, k, v, return_lse=True, kernel_options=WS_PIN), None,
                          lambda L: (1, 2, 2, L, L, 64, 64), torch.float16, "'WARP_SPECIALIZE': True")


def test_pinned_config_from_a_closure_under_dynamic_shapes(interpreted_inductor):
    """kernel_options held in a closure (not a module constant): under dynamic=True Dynamo hands
    their ints to the lowering as symbols, and int() on them failed ("Cannot convert symbols to
    int"); the pinned config is now read with a guard on its value."""
    opts = dict(BLOCK_M=32, BLOCK_N=32, num_warps=4, num_stages=2)
    check_dynamic_lengths(lambda q, k, v: flex_attention(q, k, v, return_lse=True, kernel_options=opts), None,
                          lambda L: (1, 2, 2, L, L, 64, 64), torch.float16, "'BLOCK_M': 32")


def test_compiled_kernels_walk_block_mask_runs_and_recompile_for_other_masks(interpreted_inductor):
    """Under torch.compile the kernels learn at trace time whether the BlockMask's lists are runs
    (create_block_mask read it; attention.traced_block_mask_facts) and walk them so (RUNS) in the
    forward, dQ and dK/dV; a mask whose lists are not runs, passed to the same compiled function,
    recompiles to the index walk (Dynamo guards the facts). Forward and gradients vs float64."""
    from torch._inductor.utils import run_and_get_code

    from inductor_flex import BlockMask, create_block_mask
    from inductor_flex import variants as V

    L = 150
    q, k, v = make_inputs((1, 2, 2, L, L, 32, 32), torch.float16, "cpu", requires_grad=True)
    g = torch.randn(1, 2, L, 32, dtype=torch.float16)
    cnt = compile_counter("inductor")

    @torch.compile(backend=cnt, fullgraph=True)
    def attend(q, k, v, block_mask):
        return flex_attention(q, k, v, block_mask=block_mask)

    def step(block_mask):
        out = attend(q, k, v, block_mask)
        return out, torch.autograd.grad(out, (q, k, v), g)

    causal = create_block_mask(V.generate_causal_mask(), None, None, L, L, device="cpu", BLOCK_SIZE=32)
    window = create_block_mask(V.generate_sliding_window(70), None, None, L, L, device="cpu", BLOCK_SIZE=32)
    # the window's lists (not runs) under the causal mask_mod, built by hand: the same mods and
    # shapes as the first call, so only the facts the graph guards on tell them apart
    by_hand = BlockMask.from_kv_blocks(window.kv_num_blocks, window.kv_indices, window.full_kv_num_blocks,
                                       window.full_kv_indices, BLOCK_SIZE=32, mask_mod=causal.mask_mod)
    assert (causal._runs_kv, causal._runs_q, window._runs_kv, window._runs_q) == (True, True, False, False)
    assert by_hand._runs_kv is None  # not read: the trace takes it as not runs
    for bm, runs in ((causal, True), (by_hand, False)):
        (out, grads), code = run_and_get_code(step, bm)
        code = "\n".join(code)
        assert code.count("'RUNS': True") == (3 if runs else 0)  # forward, dQ, dK/dV
        assert code.count("'RUNS': False") == (0 if runs else 3)
        ref_out, _, _ = reference64(q, k, v, None, bm)
        low_out, _, _ = reference_same_dtype(q, k, v, None, bm)
        assert_close_to_reference(out, ref_out, low_out, torch.float16, "out")
        assert_grads_close(q, k, v, grads, g, None, bm, torch.float16)
    assert cnt.frame_count == 2  # the second mask recompiled (on the runs facts alone)


@pytest.mark.parametrize("variant", ["causal", "sliding_window"])
def test_warp_specialized_config_renders_for_a_block_mask_of_runs(interpreted_inductor, monkeypatch, variant):
    """A BlockMask of 128-blocks whose rows are one run of partial and full blocks together, full
    blocks from its mask_mod (causal; a sliding window, whose partial blocks sit at both ends), takes
    the warp-specialized forward under torch.compile too: one loop from the run's first block,
    mask_mod on every tile (MASK_ON_FULL). Output and lse vs float64 (the interpreter runs it
    unspecialized)."""
    from torch._inductor.utils import run_and_get_code

    from inductor_flex import create_block_mask
    from inductor_flex import variants as V

    _ws_on_cpu(monkeypatch)
    L = 600
    q, k, v = make_inputs((1, 2, 2, L, L, 64, 64), torch.float16, "cpu")
    mask_mod = V.generate_sliding_window(300) if variant == "sliding_window" else V.generate_causal_mask()
    bm = create_block_mask(mask_mod, None, None, L, L, device="cpu", BLOCK_SIZE=128)
    assert bm._union_kv and bm._runs_kv == (variant == "causal")
    fn, _ = _compiled(None, bm, False, kernel_options=dict(WS_PIN, REFINE_BLOCK_MASK=False))
    (out, lse), code = run_and_get_code(fn, q, k, v)
    code = "\n".join(code)
    for flag in ("WARP_SPECIALIZE", "USE_TMA", "RUNS", "MASK_ON_FULL"):
        assert f"'{flag}': True" in code, flag
    ref_out, ref_lse, _ = reference64(q, k, v, None, bm)
    low_out, low_lse, _ = reference_same_dtype(q, k, v, None, bm)
    assert_close_to_reference(out, ref_out, low_out, torch.float16, "out")
    assert_close_to_reference(lse, ref_lse, low_lse, torch.float16, "lse")


@pytest.mark.parametrize("lengths", [(150, 230), (230, 230)], ids=["Lq150_Lkv230", "Lq230_Lkv230"])
def test_compiled_kernels_walk_document_rows_in_one_loop(interpreted_inductor, lengths):
    """Packed causal documents under torch.compile: each row's partial blocks sit at both ends of
    its full ones, so the lists are no runs apart but one together (create_block_mask read both
    sides; attention.traced_block_mask_facts). The Inductor-rendered forward walks that run in one
    loop (RUNS with MASK_ON_FULL, unspecialized), dQ too (UNION), and dK/dV where the query side is
    one run only together (Lq past the second document's end). Forward and gradients vs float64."""
    from torch._inductor.utils import run_and_get_code

    from inductor_flex import create_block_mask

    Lq, Lkv = lengths
    q, k, v = make_inputs((1, 2, 2, Lq, Lkv, 32, 32), torch.float16, "cpu", requires_grad=True)
    g = torch.randn(1, 2, Lq, 32, dtype=torch.float16)
    bm = create_block_mask(run_walk_mask_mod("document", max(Lq, Lkv)), None, None, Lq, Lkv, device="cpu",
                           BLOCK_SIZE=32)
    q_union = not bm._runs_q
    assert bm._union_kv and bm._union_q and not bm._runs_kv and q_union == (Lq > 200)
    fn = torch.compile(lambda q, k, v: flex_attention(q, k, v, block_mask=bm), fullgraph=True)

    def step():
        out = fn(q, k, v)
        return out, torch.autograd.grad(out, (q, k, v), g)

    (out, grads), code = run_and_get_code(step)
    code = "\n".join(code)
    assert "'MASK_ON_FULL': True" in code and "'WARP_SPECIALIZE': False" in code
    assert code.count("'UNION': True") == 1 + int(q_union)  # dQ, and dK/dV where its side is a union
    ref_out, _, _ = reference64(q, k, v, None, bm)
    low_out, _, _ = reference_same_dtype(q, k, v, None, bm)
    assert_close_to_reference(out, ref_out, low_out, torch.float16, "out")
    assert_grads_close(q, k, v, grads, g, None, bm, torch.float16)
