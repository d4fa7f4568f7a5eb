"""The backward kernels (delta, dK/dV, dQ and the score_mod's joint graph), run by Triton's
interpreter on CPU tensors, vs gradients of the float64 math path."""
import pytest
import torch

from inductor_flex import flex_attention
from inductor_flex.reference import math_attention

from cases import (
    LEARNABLE, LEARNABLE_LEN as L, RUN_WALK_VARIANTS, SHAPES, VARIANTS, make_inputs, make_variant, packed_documents,
    run_walk_mask_mod, two_reads_repeated,
)
from conftest import assert_close_to_reference

TRITON = {"BACKEND": "TRITON"}
MATH_REFERENCE = object()  # grads_of: the math path, the reference side of a comparison


def _loss(out, lse, g_out, g_lse):
    # lse enters the loss too, so the dLSE path of the kernels is exercised; empty rows (-inf) are left out
    return (out.double() * g_out).sum() + (torch.where(torch.isfinite(lse), lse, 0).double() * g_lse).sum()


def grads_of(q, k, v, score_mod, block_mask, captured, kernel_options, g_out, g_lse, dtype=None, gqa=False):
    """(dq, dk, dv, *d captured) of _loss through flex_attention with ``kernel_options``, or through
    the math path when kernel_options is MATH_REFERENCE, with inputs cast to ``dtype``."""
    leaves = [t.detach().to(dtype or t.dtype).requires_grad_() for t in (q, k, v)]
    cap = [c.detach().to(dtype or c.dtype).requires_grad_() for c in captured]
    mod = score_mod(*cap) if callable(score_mod) and captured else score_mod
    if kernel_options is MATH_REFERENCE:
        out, lse, _ = math_attention(*leaves, mod, block_mask)
    else:
        out, lse = flex_attention(*leaves, score_mod=mod, block_mask=block_mask, enable_gqa=gqa, return_lse=True,
                                  kernel_options=kernel_options)
    wrt = leaves + cap
    return torch.autograd.grad(_loss(out, lse, g_out, g_lse), wrt, allow_unused=True), out


def check_backward(shape, dtype, score_mod, block_mask, captured=(), kernel_options=TRITON, device="cpu", draws=1):
    """Gradients of the kernels vs the float64 math path, by the criterion of conftest. With
    ``draws`` > 1, each gradient's elements from that many random inputs are pooled before the
    criterion is applied (a 1- to 4-element captured gradient gives too few errors to compare)."""
    assert kernel_options is not MATH_REFERENCE, "check_backward tests the kernels"
    B, Hq, Hkv, Lq, Lkv, E, Ev = shape
    captured = [c.to(device) for c in captured]
    runs = []
    for _ in range(draws):
        q, k, v = make_inputs(shape, dtype, device)
        g_out = torch.randn(B, Hq, Lq, Ev, dtype=torch.float64, device=device)
        g_lse = torch.randn(B, Hq, Lq, dtype=torch.float64, device=device)
        got, out = grads_of(q, k, v, score_mod, block_mask, captured, kernel_options, g_out, g_lse, gqa=Hq != Hkv)
        ref, _ = grads_of(q, k, v, score_mod, block_mask, captured, MATH_REFERENCE, g_out, g_lse, dtype=torch.float64)
        low, _ = grads_of(q, k, v, score_mod, block_mask, captured, MATH_REFERENCE, g_out, g_lse)
        runs.append((got, ref, low))
    names = ["dq", "dk", "dv"] + [f"d captured[{i}]" for i in range(len(captured))]
    for got, _, _ in runs:
        for name, a in zip(names, got):
            assert a is not None, f"{name} missing"
    got, ref, low = runs[0] if draws == 1 else (
        [torch.cat([r[side][j].flatten() for r in runs]) for j in range(len(names))] for side in range(3))
    for name, a, r, lo in zip(names, got, ref, low):
        assert a.shape == r.shape and a.dtype == lo.dtype, name
        assert not torch.isnan(a).any(), f"{name} has NaN"
        assert_close_to_reference(a, r, lo, dtype, name)
    return got


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
@pytest.mark.parametrize("shape", list(SHAPES.values()), ids=list(SHAPES))
@pytest.mark.parametrize("variant", VARIANTS)
def test_backward_matches_reference(variant, shape, dtype):
    B, Hq, Hkv, Lq, Lkv, E, Ev = shape
    score_mod, block_mask = make_variant(variant, Lq, Lkv, Hq, "cpu")
    got = check_backward(shape, dtype, score_mod, block_mask)
    if variant == "empty_rows":
        # rows that attend to nothing get zero gradient, never NaN
        assert (got[0][:, :, :5] == 0).all()


# ---- learnable captured tensors: their gradients are accumulated inside the dQ kernel ------------
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
@pytest.mark.parametrize("masked", [False, True], ids=["dense", "causal"])
@pytest.mark.parametrize("name", list(LEARNABLE))
def test_captured_tensor_gradients(name, masked, dtype):
    from inductor_flex import create_block_mask
    from inductor_flex.variants import generate_causal_mask

    shape = (2, 4, 2, L, L, 32, 24)
    factory, make = LEARNABLE[name]
    captured = make(4)
    bm = create_block_mask(generate_causal_mask(), None, None, L, L, device="cpu", BLOCK_SIZE=32) if masked else None
    check_backward(shape, dtype, factory, bm, captured)


def test_deterministic_option_gives_same_captured_grads_bitwise():
    shape = (1, 4, 4, 40, 40, 32, 32)
    table = [torch.randn(7)]
    opts = {"BACKEND": "TRITON", "DETERMINISTIC": True}
    torch.manual_seed(1)
    a = check_backward(shape, torch.float32, two_reads_repeated, None, table, opts)
    torch.manual_seed(1)
    b = check_backward(shape, torch.float32, two_reads_repeated, None, table, opts)
    for x, y in zip(a, b):
        assert torch.equal(x, y)


def test_only_requested_gradients_are_returned():
    q, k, v = make_inputs((1, 2, 2, 33, 33, 16, 16), torch.float32, "cpu")
    k.requires_grad_(True)
    table = torch.randn(2, 2 * 33 - 1, requires_grad=True)
    out = flex_attention(q, k, v, score_mod=rel_bias_33(table), kernel_options=TRITON)
    out.sum().backward()
    assert q.grad is None and v.grad is None and k.grad is not None and table.grad is not None


def rel_bias_33(table):
    def mod(score, b, h, q_idx, kv_idx):
        return score + table[h, q_idx - kv_idx + 32]
    return mod


class _RelBiasModule:
    """A relative bias and a window written as methods reading their object's attributes."""

    def __init__(self, table, window=11):
        self.table, self.window = table, window

    def score_mod(self, score, b, h, q_idx, kv_idx):
        return score + self.table[h, q_idx - kv_idx + 32]

    def mask_mod(self, b, h, q_idx, kv_idx):
        return (q_idx - kv_idx).abs() < self.window


def test_bound_method_mods_backward():
    # the score_mod's joint graph is traced through the bound method too, and the gradient of the
    # table it reads through self arrives
    from inductor_flex import create_block_mask

    window = _RelBiasModule(None)
    bm = create_block_mask(window.mask_mod, None, None, 33, 33, device="cpu", BLOCK_SIZE=16)
    check_backward((1, 2, 2, 33, 33, 16, 16), torch.float32, lambda t: _RelBiasModule(t).score_mod, bm,
                   [torch.randn(2, 2 * 33 - 1)])


def test_backward_non_contiguous_inputs_and_grad():
    # (B, L, H, E) storage viewed as (B, H, L, E), and a non-contiguous upstream gradient
    base = [torch.randn(1, 37, 2, d, requires_grad=True) for d in (24, 24, 40)]
    q, k, v = (t.transpose(1, 2) for t in base)
    out = flex_attention(q, k, v, kernel_options=TRITON)
    g = torch.randn(1, 37, 2, 40).transpose(1, 2)
    out.backward(g)
    ref = [t.detach().double().requires_grad_() for t in base]
    r_out, _, _ = math_attention(*(t.transpose(1, 2) for t in ref))
    r_out.backward(g.double())
    for a, r in zip(base, ref):
        assert (a.grad.double() - r.grad).abs().max() < 1e-5


def test_grad_of_lse_only():
    q, k, v = make_inputs((1, 2, 2, 40, 29, 32, 16), torch.float32, "cpu", requires_grad=True)
    _, lse = flex_attention(q, k, v, return_lse=True, kernel_options=TRITON)
    lse.sum().backward()
    ref = [t.detach().double().requires_grad_() for t in (q, k, v)]
    _, r_lse, _ = math_attention(*ref)
    r_lse.sum().backward()
    for a, r in zip((q, k), ref):
        assert (a.grad.double() - r.grad).abs().max() < 1e-5
    assert ref[2].grad is None and (v.grad == 0).all()  # lse does not depend on v


def test_per_batch_and_head_block_mask():
    # a BlockMask built per (b, h): the dK/dV kernel reads its q-side lists per query head
    from inductor_flex import create_block_mask

    def per_head_window(b, h, q_idx, kv_idx):
        return (q_idx - kv_idx).abs() <= 8 * (h + 1) + 5 * b

    shape = (2, 4, 2, 70, 70, 32, 32)
    bm = create_block_mask(per_head_window, 2, 4, 70, 70, device="cpu", BLOCK_SIZE=32)
    check_backward(shape, torch.float32, None, bm)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
@pytest.mark.parametrize("shape", ["odd37_E40", "gqa4x2_E64_Ev32", "Lq50_Lkv97"])
@pytest.mark.parametrize("variant", ["noop", "causal", "document", "alibi", "softcap", "random_blocks", "empty_rows"])
def test_fused_dq_matches_reference(variant, shape, dtype):
    # kernel_options FUSED_DQ: dQ accumulated inside the dK/dV kernel with float32 atomics
    dims = SHAPES[shape]
    B, Hq, Hkv, Lq, Lkv, E, Ev = dims
    score_mod, block_mask = make_variant(variant, Lq, Lkv, Hq, "cpu")
    check_backward(dims, dtype, score_mod, block_mask, kernel_options={"BACKEND": "TRITON", "FUSED_DQ": True})


def test_fused_dq_refuses_captured_gradients_and_determinism():
    q, k, v = make_inputs((1, 2, 2, 33, 33, 16, 16), torch.float32, "cpu", requires_grad=True)
    table = torch.randn(2, 65, requires_grad=True)
    out = flex_attention(q, k, v, score_mod=rel_bias_33(table), kernel_options={"BACKEND": "TRITON", "FUSED_DQ": True})
    with pytest.raises(ValueError, match="FUSED_DQ"):
        out.sum().backward()
    out = flex_attention(q, k, v, kernel_options={"BACKEND": "TRITON", "FUSED_DQ": True, "DETERMINISTIC": True})
    with pytest.raises(ValueError, match="FUSED_DQ"):
        out.sum().backward()


def test_learned_captured_tensor_backward_reads_float32_out():
    """With a learnable captured tensor in half precision, the forward keeps O in float32 for the
    backward's delta (a captured gradient sums dS over whole rows, so O's rounding would not cancel);
    the caller still gets O in the input dtype, equal to the rounded float32 O. The float32 O is
    float32-accurate: P·V takes P's 16-bit head and its residue (a float32 O accumulated from a
    rounded P errs about as much as the rounded O, and did not fix the bf16 slopes' gradient)."""
    factory, make = LEARNABLE["alibi_slopes"]
    q, k, v = make_inputs((1, 2, 2, 40, 40, 32, 32), torch.float16, "cpu", requires_grad=True)
    slopes = make(2)[0].requires_grad_()
    out = flex_attention(q, k, v, score_mod=factory(slopes), kernel_options=TRITON)
    assert out.dtype == torch.float16
    saved_out = out.grad_fn.saved_tensors[3]
    assert saved_out.dtype == torch.float32 and torch.equal(saved_out.to(torch.float16), out)
    exact = math_attention(q.double(), k.double(), v.double(), factory(slopes.double()), None)[0]
    saved_err = (saved_out.double() - exact).abs().mean().item()
    rounded_err = (out.double() - exact).abs().mean().item()
    assert saved_err < 0.05 * rounded_err, (saved_err, rounded_err)
    with torch.no_grad():
        frozen = flex_attention(q, k, v, score_mod=factory(slopes.detach()), kernel_options=TRITON)
    assert rounded_err <= 1.01 * (frozen.double() - exact).abs().mean().item()


@pytest.mark.parametrize("scale", [-0.5, 0.0, 0.3], ids=["negative", "zero", "positive"])
@pytest.mark.parametrize("variant", ["noop", "causal", "empty_rows", "softcap"])
def test_backward_any_scale(variant, scale):
    # the kernels mask exp2's argument after scaling, so a zero or negative scale keeps masked
    # scores at probability 0 (a mask applied before multiplying by a scale <= 0 would not)
    shape = SHAPES["Lq50_Lkv97"]
    B, Hq, Hkv, Lq, Lkv, E, Ev = shape
    q, k, v = make_inputs(shape, torch.float32, "cpu")
    score_mod, block_mask = make_variant(variant, Lq, Lkv, Hq, "cpu")
    g_out = torch.randn(B, Hq, Lq, Ev, dtype=torch.float64)
    g_lse = torch.randn(B, Hq, Lq, dtype=torch.float64)

    def grads(dtype, **kw):
        leaves = [t.detach().to(dtype).requires_grad_() for t in (q, k, v)]
        if kw:
            out, lse = flex_attention(*leaves, score_mod=score_mod, block_mask=block_mask, scale=scale,
                                      return_lse=True, **kw)
        else:
            out, lse, _ = math_attention(*leaves, score_mod, block_mask, scale)
        return torch.autograd.grad(_loss(out, lse, g_out, g_lse), leaves)

    got = grads(torch.float32, kernel_options=TRITON)
    ref, low = grads(torch.float64), grads(torch.float32)
    for name, a, r, lo in zip(("dq", "dk", "dv"), got, ref, low):
        assert_close_to_reference(a, r, lo, torch.float32, name)


@pytest.mark.parametrize("shape", [(2, 4, 2, 300, 300, 40, 24), (1, 2, 2, 330, 200, 32, 32)],
                         ids=["gqa_300_e40_ev24", "330x200"])
def test_backward_with_refined_block_mask(shape):
    from inductor_flex import create_block_mask
    from inductor_flex.kernel import cached_plan
    from inductor_flex.validation import validate_kernel_options

    B, Hq, Hkv, Lq, Lkv, E, Ev = shape
    _, document_causal = packed_documents(max(Lq, Lkv), (23, 60, 61, 150, 290))
    bm = create_block_mask(document_causal, None, None, Lq, Lkv, device="cpu", BLOCK_SIZE=128)
    q = torch.empty(B, Hq, Lq, E)
    kv = torch.empty(B, Hkv, Lkv, E)
    assert cached_plan(q, kv, kv.new_empty(B, Hkv, Lkv, Ev), None, bm, None,
                       validate_kernel_options(TRITON)).block_mask.BLOCK_SIZE == (64, 64)
    check_backward(shape, torch.float32, None, bm)


def test_backward_plan_is_built_once_per_forward_plan(monkeypatch):
    """A training loop's backward reuses its rendered plan: one BackwardPlan over several steps (and
    a second one only for another set of captured-tensor gradients), with unchanged gradients."""
    import inductor_flex.backward as BW

    built = []
    real = BW.BackwardPlan

    class Counting(real):
        def __init__(self, *a, **kw):
            built.append(a[2])  # grad_caps
            super().__init__(*a, **kw)

    monkeypatch.setattr(BW, "BackwardPlan", Counting)
    dims = SHAPES["odd37_E40"]
    B, Hq, Hkv, Lq, Lkv, E, Ev = dims
    score_mod, block_mask = make_variant("causal", Lq, Lkv, Hq, "cpu")
    q, k, v = make_inputs(dims, torch.float32, "cpu", requires_grad=True)
    g = torch.randn(B, Hq, Lq, Ev)
    slopes = torch.rand(Hq, requires_grad=True)

    def grads(mod, wrt):
        out = flex_attention(q, k, v, score_mod=mod, block_mask=block_mask, kernel_options=TRITON)
        return torch.autograd.grad(out, wrt, g)

    first = grads(None, (q, k, v))
    for _ in range(2):
        again = grads(None, (q, k, v))
    assert len(built) == 1
    assert all(torch.equal(a, b) for a, b in zip(first, again))

    table = {"slopes": slopes.detach()}

    def alibi(score, b, h, q_idx, kv_idx):
        return score + table["slopes"][h] * (kv_idx - q_idx)

    grads(alibi, (q, k, v))
    grads(alibi, (q, k, v))
    table["slopes"] = slopes  # now learned: the slopes' gradient takes another backward plan
    grads(alibi, (q, k, v, slopes))
    grads(alibi, (q, k, v, slopes))
    assert built[1:] == [(False,), (True,)]


@pytest.mark.parametrize("kv_runs", [True, False], ids=["runs", "index_lists"])
@pytest.mark.parametrize("lengths", [(150, 230), (230, 150)], ids=["Lq150_Lkv230", "Lq230_Lkv150"])
@pytest.mark.parametrize("variant", RUN_WALK_VARIANTS)
def test_block_mask_runs_walk_backward(variant, lengths, kv_runs):
    """dK/dV walk a kv block's query blocks, dQ a query block's kv blocks, from the runs' first blocks
    when each list is one run (template RUNS, per side), or in one loop over both lists where they
    are one run together (UNION: a wide window, documents; mask_mod on the tiles outside the row's
    full run, on every tile where the full blocks are no run); KV_RUNS=False walks the index lists.
    All against the float64 reference, and the kernels took the path they should."""
    from inductor_flex import create_block_mask
    from inductor_flex import kernel as K
    from inductor_flex.block_mask import block_runs, union_run
    from inductor_flex.validation import validate_kernel_options

    Lq, Lkv = lengths
    shape = (1, 4, 2, Lq, Lkv, 40, 24)
    mask_mod = run_walk_mask_mod(variant, max(Lq, Lkv))
    block_mask = create_block_mask(mask_mod, None, None, Lq, Lkv, device="cpu", BLOCK_SIZE=32)
    opts = {**TRITON, "KV_RUNS": kv_runs}
    check_backward(shape, torch.float16, None, block_mask, kernel_options=opts)
    plan = K.cached_plan(*make_inputs(shape, torch.float16, "cpu"), None, block_mask, None,
                         validate_kernel_options(dict(opts)))
    for side in ("q", "kv"):
        assert K.plan_runs(plan, side) == (kv_runs and block_runs(block_mask, side))
        assert union_run(block_mask, side)
        assert K.plan_union_walk(plan, side) == (kv_runs and not block_runs(block_mask, side))
    if RUN_WALK_VARIANTS.index(variant) < 3:  # one run per list on both sides
        assert block_runs(block_mask, "kv") and block_runs(block_mask, "q")
    else:  # the union walk on the kv side (dQ), and on the q side (dK/dV) but where a kv block's
        # query blocks are all partial (keys 70-79) or all in one document's diagonal (Lq < 200)
        q_runs = variant == "full_blocks_around_a_partial_one" or (variant == "document" and Lq < 200)
        assert not block_runs(block_mask, "kv") and block_runs(block_mask, "q") == q_runs
