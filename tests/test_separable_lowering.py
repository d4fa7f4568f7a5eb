"""Separable score_mods under torch.compile (lowering/separable.py): the FX split of a score_mod
graph into coefficient, key bias and row bias, and the Inductor-rendered forward, dQ and dK/dV
templates taking that form (Inductor's Triton CPU backend, kernels run by Triton's interpreter, fp16)
against the float64 math path."""
import pytest
import torch

from inductor_flex import create_block_mask, flex_attention
from inductor_flex.joint_graph import prescale
from inductor_flex.lowering import separable
from inductor_flex.variants import generate_causal_mask

from cases import SHAPES, _empty_rows, make_inputs
from conftest import (assert_close_to_reference, assert_grads_close, check_dynamic_lengths, compile_counter,
                      reference64, reference_same_dtype)
from test_joint_graph import _mod_graph
from test_separable import NOT_SEPARABLE, SEPARABLE


@pytest.mark.parametrize("name", list(SEPARABLE) + list(NOT_SEPARABLE))
def test_split_finds_the_parts(name):
    mod = SEPARABLE.get(name) or NOT_SEPARABLE[name]
    gm, _ = prescale(_mod_graph(mod), 0.125)
    parts = separable.split(gm)
    assert (parts is not None) == (name in SEPARABLE)
    if parts is None:
        return
    gen = torch.Generator().manual_seed(0)
    score = torch.randn(6, 9, generator=gen) * 4
    b, h = torch.tensor(1, dtype=torch.int32), torch.tensor(3, dtype=torch.int32)
    q = torch.arange(6, dtype=torch.int32)[:, None] * 7 + 2
    kv = torch.arange(9, dtype=torch.int32)[None, :] * 5 + 1
    coef, key, row = (p(b, h, q, kv) for p in parts)
    # each part reads only what its hook is given: coefficient neither index, key bias not q, row bias not kv
    assert coef.numel() == 1 and (key.dim() < 2 or key.shape[0] == 1) and (row.dim() < 2 or row.shape[-1] == 1)
    torch.testing.assert_close(coef * score + key + row, gm(score, b, h, q, kv), rtol=1e-6, atol=1e-5)


def _compiled_step(mod, bm, dtype, shape, opts=None):
    from torch._inductor.utils import run_and_get_code

    B, Hq, Hkv, Lq, Lkv, E, Ev = SHAPES[shape]
    q, k, v = make_inputs(SHAPES[shape], dtype, "cpu", requires_grad=True)
    cnt = compile_counter("inductor")
    fn = torch.compile(lambda q, k, v: flex_attention(q, k, v, score_mod=mod, block_mask=bm, enable_gqa=Hq != Hkv,
                                                      return_lse=True, kernel_options=opts),
                       backend=cnt, fullgraph=True)
    g = torch.randn(B, Hq, Lq, Ev, dtype=dtype)

    def step():
        out, lse = fn(q, k, v)
        return (out, lse), torch.autograd.grad(out, (q, k, v), g)

    ((out, lse), grads), code = run_and_get_code(step)
    assert cnt.frame_count == 1
    return (q, k, v), out, lse, grads, g, "\n".join(code)


def _block_mask(mask, shape):
    _, _, _, Lq, Lkv, _, _ = SHAPES[shape]
    if mask == "none":
        return None
    fn = generate_causal_mask() if mask == "causal" else _empty_rows
    return create_block_mask(fn, None, None, Lq, Lkv, device="cpu", BLOCK_SIZE=32)


# mods without captured float tensors (those with one keep the custom op in the backward)
CASES = [("alibi", "odd37_E40", "none"), ("divided", "gqa4x2_E64_Ev32", "causal"),
         ("alibi", "E128_Lq33_Lkv65", "empty_rows")]


@pytest.mark.parametrize("name,shape,mask", CASES, ids=["-".join(c) for c in CASES])
def test_compiled_forward_and_backward_take_the_separable_form(interpreted_inductor, name, shape, mask):
    mod, bm = SEPARABLE[name], _block_mask(mask, shape)
    (q, k, v), out, lse, grads, g, code = _compiled_step(mod, bm, torch.float16, shape)
    # forward, dQ and dK/dV: each kernel has the hooks and runs with SEPARABLE on
    assert code.count("def score_mod_coef(") == 3 and code.count("def score_mod_row_bias(") == 3
    assert code.count("'SEPARABLE': True") == 3 and "'SEPARABLE': False" not in code
    ref_out, ref_lse, _ = reference64(q, k, v, mod, bm)
    low_out, low_lse, _ = reference_same_dtype(q, k, v, mod, bm)
    assert_close_to_reference(out, ref_out, low_out, torch.float16, "out")
    assert_close_to_reference(lse, ref_lse, low_lse, torch.float16, "lse")
    assert_grads_close(q, k, v, grads, g, mod, bm, torch.float16)
    if mask == "empty_rows":
        assert (out[:, :, :5] == 0).all() and (lse[:, :, :5] == float("-inf")).all()


@pytest.mark.parametrize("name", ["key_bias", "tempered", "head_scale"])
def test_compiled_forward_with_captured_tensors_takes_the_separable_form(interpreted_inductor, name):
    mod, shape = SEPARABLE[name], "gqa4x2_E64_Ev32"
    (q, k, v), out, lse, grads, g, code = _compiled_step(mod, None, torch.float16, shape)
    assert "def score_mod_coef(" in code and "'SEPARABLE': True" in code
    ref_out, ref_lse, _ = reference64(q, k, v, mod, None)
    low_out, low_lse, _ = reference_same_dtype(q, k, v, mod, None)
    assert_close_to_reference(out, ref_out, low_out, torch.float16, "out")
    assert_close_to_reference(lse, ref_lse, low_lse, torch.float16, "lse")
    assert_grads_close(q, k, v, grads, g, mod, None, torch.float16)


@pytest.mark.parametrize("name,dtype,opts,taken", [
    ("softcap", torch.float16, None, False),
    ("alibi", torch.float32, None, False),  # float32: off by default (kernel.use_separable)
    ("alibi", torch.float32, {"SEPARABLE_SCORE_MOD": True}, True),
    ("alibi", torch.float16, {"SEPARABLE_SCORE_MOD": False}, False),
], ids=["softcap-fp16", "alibi-fp32", "alibi-fp32-on", "alibi-fp16-off"])
def test_when_the_compiled_kernels_take_the_separable_form(interpreted_inductor, name, dtype, opts, taken):
    mod = SEPARABLE.get(name) or NOT_SEPARABLE[name]
    shape = "odd37_E40"
    (q, k, v), out, lse, grads, g, code = _compiled_step(mod, None, dtype, shape, opts)
    assert ("def score_mod_coef(" in code) == taken
    assert ("'SEPARABLE': True" in code) == taken
    ref_out, _, _ = reference64(q, k, v, mod, None)
    low_out, _, _ = reference_same_dtype(q, k, v, mod, None)
    assert_close_to_reference(out, ref_out, low_out, dtype, "out")
    assert_grads_close(q, k, v, grads, g, mod, None, dtype)


# ---- property: any random program's split, where one is found, is the program ------------------
from hypothesis import HealthCheck, given, settings, strategies as st  # noqa: E402

from test_printer_properties import _SETTINGS, _floats, _ints, score_mod_of, TABLE  # noqa: E402


def _one_axis_ints(index):
    # (no "const" leaf: the programs build it from q_idx)
    return st.recursive(
        st.one_of(st.just(index), st.just("h")),
        lambda sub: st.one_of(st.tuples(st.sampled_from(["add", "sub", "min", "max"]), sub, sub),
                              st.tuples(st.sampled_from(["floordiv", "mod", "mul"]), sub, st.integers(1, 7)),
                              st.tuples(st.just("abs"), sub)),
        max_leaves=4)


# separable by construction: sums and constant multiples of the score and of values of one index
_linear = st.recursive(
    st.one_of(st.just("score"),
              *(st.tuples(st.sampled_from(["float", "table"]), _one_axis_ints(i)) for i in ("q_idx", "kv_idx"))),
    lambda sub: st.one_of(
        st.tuples(st.sampled_from(["fadd", "fsub"]), sub, sub),
        st.tuples(st.just("fmul"), sub, st.floats(-2.0, 2.0, allow_nan=False).map(lambda c: round(c, 3))),
    ),
    max_leaves=6,
)


def _check_split(tree, must_split):
    table = torch.randn(TABLE)
    gm, _ = prescale(_mod_graph(score_mod_of(tree, table)), 0.3)
    parts = separable.split(gm)
    if must_split:
        assert parts is not None, tree
    if parts is None:
        return
    gen = torch.Generator().manual_seed(1)
    score = torch.randn(7, 11, generator=gen) * 3
    b, h = torch.tensor(1, dtype=torch.int32), torch.tensor(1, dtype=torch.int32)
    q = torch.randint(0, 40, (7, 1), generator=gen, dtype=torch.int32)
    kv = torch.randint(0, 40, (1, 11), generator=gen, dtype=torch.int32)
    coef, key, row = (p(b, h, q, kv) for p in parts)
    assert coef.numel() == 1
    torch.testing.assert_close(coef * score + key + row, gm(score, b, h, q, kv), rtol=1e-5, atol=1e-4)


@settings(max_examples=60, **_SETTINGS)
@given(tree=_floats)
def test_random_programs_split_only_into_what_they_are(tree):
    _check_split(tree, must_split=False)


@settings(max_examples=40, **_SETTINGS)
@given(tree=_linear)
def test_random_linear_programs_are_split(tree):
    _check_split(tree, must_split=True)


@settings(max_examples=4, deadline=None, derandomize=True,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
@given(tree=_linear)
def test_random_linear_programs_compiled(interpreted_inductor, tree):
    # separable by construction, through Inductor's templates (fp16 takes the split): forward and
    # gradients against float64
    table = torch.randn(TABLE)
    mod = score_mod_of(tree, table)
    (q, k, v), out, lse, grads, g, code = _compiled_step(mod, None, torch.float16, "odd37_E40")
    assert "'SEPARABLE': True" in code and code.count("def score_mod_coef(") >= 1
    ref_out, ref_lse, _ = reference64(q, k, v, mod, None)
    low_out, low_lse, _ = reference_same_dtype(q, k, v, mod, None)
    assert_close_to_reference(out, ref_out, low_out, torch.float16, "out")
    assert_close_to_reference(lse, ref_lse, low_lse, torch.float16, "lse")
    assert_grads_close(q, k, v, grads, g, mod, None, torch.float16)


def test_compiled_separable_under_dynamic_shapes(interpreted_inductor):
    # symbolic lengths: the three hooks take their sizes from the kernel's arguments; no recompile
    # (a mod that closes over no int: under dynamic=True Dynamo makes such an int symbolic, and a
    # symbolic operand keeps a call off the template, test_compile_inductor.py)
    mod = SEPARABLE["divided"]
    check_dynamic_lengths(lambda q, k, v: flex_attention(q, k, v, score_mod=mod, return_lse=True), mod,
                          lambda L: (1, 4, 4, L, L, 64, 64), torch.float16, "def score_mod_coef(")
