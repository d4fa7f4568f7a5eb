"""The backward template lowered by Inductor (lowering/backward.py): the dK/dV and dQ kernels
rendered from templates/flex_backward.py.jinja with the score_mod, mask_mod and joint graph lowered
into their hooks, delta = rowsum(dO * O) - dLSE computed by the dQ kernel. As in test_template_lowering.py, Inductor's
Triton CPU backend generates the graph's kernels and Triton's interpreter runs them, so CI checks
the numerics of the very source Inductor generates; the GPU suite runs the same on CUDA."""
import pytest
import torch

from inductor_flex import flex_attention
from inductor_flex.lowering import backward as backward_template

from cases import SHAPES, make_inputs, make_variant
from conftest import assert_close_to_reference, assert_grads_close, compile_counter
from test_template_lowering import _Sized

CASES = [(v, "odd37_E40", torch.float32) for v in (
    "noop", "causal", "sliding_window", "document", "softcap", "random_blocks", "ops_soup", "relative_bias",
    "head_scale",
    "empty_rows")] + [
    ("causal", "Lq50_Lkv97", torch.float32), ("document", "gqa4x2_E64_Ev32", torch.float16),
    ("noop", "Lq50_Lkv97", torch.float16), ("softcap", "E128_Lq33_Lkv65", torch.float16),
    ("noop", "gqa4x2_E64_Ev32", torch.float16), ("causal", "gqa4x2_E64_Ev32", torch.float32),
]


def _fwd_bwd(variant, shape, dtype, **kw):
    from torch._inductor.utils import run_and_get_code

    dims = SHAPES[shape]
    B, Hq, Hkv, Lq, Lkv, E, Ev = dims
    q, k, v = make_inputs(dims, dtype, "cpu", requires_grad=True)
    score_mod, block_mask = make_variant(variant, Lq, Lkv, Hq, "cpu")
    cnt = compile_counter("inductor")

    def run(q, k, v):
        return flex_attention(q, k, v, score_mod=score_mod, block_mask=block_mask, enable_gqa=Hq != Hkv, **kw)

    fn = torch.compile(run, backend=cnt, fullgraph=True)
    g = torch.randn(B, Hq, Lq, Ev, dtype=dtype)

    def step():
        return torch.autograd.grad(fn(q, k, v), (q, k, v), g)

    grads, code = run_and_get_code(step)
    assert cnt.frame_count == 1
    return (q, k, v), grads, g, score_mod, block_mask, "\n".join(code)


@pytest.mark.parametrize("variant,shape,dtype", CASES, ids=[f"{v}-{s}-{str(d)[6:]}" for v, s, d in CASES])
def test_inductor_renders_the_backward_template(interpreted_inductor, variant, shape, dtype):
    (q, k, v), grads, g, score_mod, block_mask, code = _fwd_bwd(variant, shape, dtype)
    # both backward kernels are Inductor's template kernels, not the custom op nor the decomposition
    assert "_bwd_dkdv_inner" in code and "_bwd_dq_inner" in code
    assert "inductor_flex.flex_backward" not in code
    if variant in ("softcap", "ops_soup", "relative_bias", "head_scale"):
        assert "def score_mod_bwd(" in code and "return grad_score" not in code
    assert_grads_close(q, k, v, grads, g, score_mod, block_mask, dtype)
    if variant == "empty_rows":
        assert (grads[0][:, :, :5] == 0).all()


@pytest.mark.parametrize("variant,shape", [("causal", "odd37_E40"), ("empty_rows", "odd37_E40"),
                                           ("softcap", "gqa4x2_E64_Ev32")], ids=lambda x: str(x))
def test_lse_gradient_reaches_the_template(interpreted_inductor, variant, shape):
    """A loss that reads the returned lse: the dQ kernel folds dLSE into delta (HAS_GRAD_LSE), and
    dQ, dK, dV match the float64 math path (rows that attend to nothing have lse -inf and are left
    out of the loss, as their lse has no gradient)."""
    from torch._inductor.utils import run_and_get_code

    from inductor_flex.reference import math_attention

    dims = SHAPES[shape]
    B, Hq, Hkv, Lq, Lkv, E, Ev = dims
    q, k, v = make_inputs(dims, torch.float32, "cpu")
    score_mod, block_mask = make_variant(variant, Lq, Lkv, Hq, "cpu")
    g_out = torch.randn(B, Hq, Lq, Ev)
    g_lse = torch.randn(B, Hq, Lq)

    def loss(out, lse):
        return (out * g_out.to(out.dtype)).sum() + (torch.where(torch.isfinite(lse), lse, 0) * g_lse.to(lse.dtype)).sum()

    def grads(fn, dtype):
        leaves = [t.detach().to(dtype).requires_grad_(True) for t in (q, k, v)]
        return torch.autograd.grad(loss(*fn(*leaves)), leaves)

    compiled = torch.compile(lambda q, k, v: flex_attention(q, k, v, score_mod=score_mod, block_mask=block_mask,
                                                            enable_gqa=Hq != Hkv, return_lse=True), fullgraph=True)
    got, code = run_and_get_code(lambda: grads(compiled, torch.float32))
    code = "\n".join(code)
    assert "_bwd_dq_inner" in code and "GRAD_LSE" in code
    assert "inductor_flex.flex_backward" not in code

    def math(q, k, v):
        return math_attention(q, k, v, score_mod, block_mask)[:2]

    ref, low = grads(math, torch.float64), grads(math, torch.float32)
    for name, a, r, lo in zip(("dq", "dk", "dv"), got, ref, low):
        assert_close_to_reference(a, r, lo, torch.float32, name)


def test_learned_captured_tensors_keep_the_custom_op(interpreted_inductor):
    """A score_mod reading a tensor that requires grad has that gradient to sum (atomics in the
    custom op's dQ kernel): the backward stays the custom op, and all gradients are right. (A
    frozen table, as in the relative_bias case above, takes the template.)"""
    from torch._inductor.utils import run_and_get_code

    from cases import LEARNABLE_LEN as L, rel_bias
    from inductor_flex.reference import math_attention

    dims = (1, 2, 2, L, L, 32, 32)
    q, k, v = make_inputs(dims, torch.float32, "cpu")
    table = torch.randn(2, 2 * L - 1)
    g = torch.randn(1, 2, L, 32)

    def grads(fn, dtype):
        leaves = [t.detach().to(dtype).requires_grad_(True) for t in (q, k, v, table)]
        out = fn(*leaves)
        return torch.autograd.grad(out, leaves, g.to(dtype))

    compiled = torch.compile(lambda q, k, v, t: flex_attention(q, k, v, score_mod=rel_bias(t),
                                                               kernel_options={"BACKEND": "TRITON"}), fullgraph=True)
    got, code = run_and_get_code(lambda: grads(compiled, torch.float32))
    assert "inductor_flex.flex_backward" in "\n".join(code)
    ref = grads(lambda q, k, v, t: math_attention(q, k, v, rel_bias(t))[0], torch.float64)
    low = grads(lambda q, k, v, t: math_attention(q, k, v, rel_bias(t))[0], torch.float32)
    for name, a, r, lo in zip(("dq", "dk", "dv", "d table"), got, ref, low):
        assert_close_to_reference(a, r, lo, torch.float32, name)


def test_disabled_backward_template_keeps_the_custom_op(interpreted_inductor, monkeypatch):
    monkeypatch.setattr(backward_template, "ENABLED", False)
    (q, k, v), grads, g, score_mod, block_mask, code = _fwd_bwd("causal", "odd37_E40", torch.float32,
                                                                kernel_options={"BACKEND": "TRITON"})
    assert "inductor_flex.flex_backward" in code and "_bwd_dkdv_inner" in code
    assert_grads_close(q, k, v, grads, g, score_mod, block_mask, torch.float32)


def test_stand_in_q_side_is_the_transpose_of_the_kv_side(monkeypatch):
    """The dK/dV kernel's config benchmarks walk the q-side lists of the causal stand-in: the
    same blocks as the kv side's, listed per kv block."""
    from inductor_flex import compat
    from inductor_flex.lowering import template

    monkeypatch.setattr(compat, "size_hint", int)
    nq, nk = 5, 7
    for has_full in (True, False):
        kv = template._stand_in_block_mask(has_full, nq, nk, offset=0)
        qs = template._stand_in_block_mask(has_full, nq, nk, side="q", offset=0)
        w = nk if has_full else 1
        kv_sizes = ([1, 1, nq], [1, 1, nq, nk], [1, 1, nq], [1, 1, nq, w])
        q_sizes = ([1, 1, nk], [1, 1, nk, nq], [1, 1, nk], [1, 1, nk, nq if has_full else 1])
        kv_t = [kv[i](_Sized(torch.empty(s))) for i, s in enumerate(kv_sizes)]
        q_t = [qs[i](_Sized(torch.empty(s))) for i, s in enumerate(q_sizes)]

        def pairs(num, idx, flip=False):
            got = {(r, int(idx[0, 0, r, j])) for r in range(num.shape[-1]) for j in range(int(num[0, 0, r]))}
            return {(b, a) for a, b in got} if flip else got

        assert pairs(*kv_t[:2]) == pairs(*q_t[:2], flip=True)
        assert pairs(*kv_t[2:]) == pairs(*q_t[2:], flip=True)
        assert len(pairs(*kv_t[:2])) + len(pairs(*kv_t[2:])) == sum(min(nk, r * nk // nq + 1) for r in range(nq))


@pytest.mark.parametrize("known", [True, False], ids=["recorded", "unknown"])
def test_backward_config_benchmarks_use_the_real_block_mask(interpreted_inductor, monkeypatch, known):
    """The dK/dV kernel's config benchmarks walk the real q-side lists and the dQ kernel's the real
    kv-side lists when Dynamo saw the BlockMask's tensors (lowering/tuning_masks.py), else the
    causal stand-in and its transpose."""
    from inductor_flex import compat, create_block_mask
    from inductor_flex.lowering import template
    from inductor_flex.variants import generate_causal_mask, generate_doc_mask_mod

    seen = {}
    real_select = compat.select_template

    def spy(name, choices, inputs, layout, gen):
        # where the BlockMask inputs start: after (q, k, v, dO, lse, delta, dv) / (q, k, v, dO, lse, delta, out)
        first = {"inductor_flex_backward_dkdv": 7, "inductor_flex_backward_dq": 7}.get(name)
        if first is not None:
            seen[name] = [gen[first + i](inputs[first + i]) for i in range(4)]
        return real_select(name, choices, inputs, layout, gen)

    monkeypatch.setattr(compat, "select_template", spy)
    torch._dynamo.reset()
    if not known:
        monkeypatch.setattr(compat, "dynamo_input_value", lambda vt: None)
    dims = SHAPES["odd37_E40"]
    B, Hq, Hkv, Lq, Lkv, E, Ev = dims
    q, k, v = make_inputs(dims, torch.float32, "cpu", requires_grad=True)
    ids = torch.tensor([0] * 5 + [1] * 20 + [2] * 12, dtype=torch.int32)
    bm = create_block_mask(generate_doc_mask_mod(generate_causal_mask(), ids), None, None, Lq, Lkv, device="cpu",
                           BLOCK_SIZE=16)
    fn = torch.compile(lambda q, k, v, bm: flex_attention(q, k, v, block_mask=bm), fullgraph=True)
    g = torch.randn(B, Hq, Lq, Ev)
    grads = torch.autograd.grad(fn(q, k, v, bm), (q, k, v), g)
    monkeypatch.setattr(compat, "size_hint", int)  # outside a graph lowering

    nq, nk = bm.kv_indices.shape[-2:]
    sides = {"inductor_flex_backward_dkdv": ("q", [bm.q_num_blocks, bm.q_indices, bm.full_q_num_blocks,
                                                   bm.full_q_indices]),
             "inductor_flex_backward_dq": ("kv", [bm.kv_num_blocks, bm.kv_indices, bm.full_kv_num_blocks,
                                                  bm.full_kv_indices])}
    assert set(seen) == set(sides)
    for name, (side, real) in sides.items():
        stand_in = template._stand_in_block_mask(True, nq, nk, side=side, offset=0)
        want = real if known else [stand_in[i](_Sized(t)) for i, t in enumerate(real)]
        for made, w in zip(seen[name], want):
            assert torch.equal(made, w.to(torch.int32)), name
    assert_grads_close(q, k, v, grads, g, None, bm, torch.float32)


@pytest.mark.parametrize("pays", [False, True], ids=["small-one_choice", "large-all_choices"])
def test_small_problems_take_one_backward_config(interpreted_inductor, monkeypatch, pays):
    """The dK/dV and dQ kernels follow the forward's rule (configs.autotune_pays)."""
    from inductor_flex import compat
    from inductor_flex.lowering import configs
    from inductor_flex.lowering.configs import Config

    cands = [Config(16, 16, 1, 1), Config(16, 16, 2, 1)]
    monkeypatch.setattr(backward_template, "backward_configs", lambda *a, **kw: list(cands))
    if pays:
        monkeypatch.setattr(configs, "AUTOTUNE_MIN_PAIRS", 1)
    counts = {}
    real_select = compat.select_template

    def spy(name, choices, inputs, layout, gen):
        counts[name] = len(choices)
        return real_select(name, choices[:1], inputs, layout, gen)  # (no benchmarks on CPU)

    monkeypatch.setattr(compat, "select_template", spy)
    torch._dynamo.reset()
    dims = SHAPES["odd37_E40"]
    B, Hq, Hkv, Lq, Lkv, E, Ev = dims
    q, k, v = make_inputs(dims, torch.float32, "cpu", requires_grad=True)
    fn = torch.compile(lambda q, k, v: flex_attention(q, k, v), fullgraph=True)
    g = torch.randn(B, Hq, Lq, Ev)
    grads = torch.autograd.grad(fn(q, k, v), (q, k, v), g)
    n = 2 if pays else 1
    assert {k: c for k, c in counts.items() if "backward" in k} == {
        "inductor_flex_backward_dkdv": n, "inductor_flex_backward_dq": n}
    assert_grads_close(q, k, v, grads, g, None, None, torch.float32)
