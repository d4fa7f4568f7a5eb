"""Separable score_mods (a * score + key bias + row bias): the printer finds them, and the kernels
(forward, dK/dV, dQ; Triton's interpreter on CPU tensors, fp16) take them as one FMA per score with
the row bias folded into the row's lse, matching the float64 math path."""
import pytest
import torch

from inductor_flex import create_block_mask, flex_attention
from inductor_flex import kernel as K
from inductor_flex.printer import print_mod
from inductor_flex.reference import math_attention
from inductor_flex.variants import generate_alibi_bias, generate_causal_mask, generate_tanh_softcap

from cases import SHAPES, _empty_rows, alibi_param, head_scale, make_inputs
from conftest import assert_close_to_reference
from test_backward_interpreter import check_backward

TRITON = {"BACKEND": "TRITON"}
_GEN = torch.Generator().manual_seed(1234)  # module-level tensors: the same in every process
KEY_TABLE = torch.randn(128, generator=_GEN)
TEMPS = torch.rand(4, generator=_GEN) + 0.5


def key_bias(score, b, h, q_idx, kv_idx):
    return score + KEY_TABLE[kv_idx]


def tempered(score, b, h, q_idx, kv_idx):
    # a per-head coefficient read from a tensor, a query term and a scaled key term
    return score * TEMPS[h] - 0.5 * q_idx + KEY_TABLE[kv_idx] * 2


def divided(score, b, h, q_idx, kv_idx):
    return (score + kv_idx) / 2.0 - q_idx * 0.25


def product(score, b, h, q_idx, kv_idx):
    return score + (q_idx * kv_idx) * 1e-3


def truncated(score, b, h, q_idx, kv_idx):
    # a cast to an integer type is not linear: (score * 2 + kv) truncated is not separable
    return (score * 2 + kv_idx).to(torch.int32).to(torch.float32) - q_idx


SEPARABLE = {"alibi": generate_alibi_bias(4), "key_bias": key_bias, "tempered": tempered, "divided": divided,
             "alibi_param": alibi_param(torch.rand(4, generator=_GEN) * 0.2),
             "head_scale": head_scale(torch.rand(4, generator=_GEN) + 0.5)}
NOT_SEPARABLE = {"softcap": generate_tanh_softcap(20.0), "product": product, "truncated": truncated}


@pytest.mark.parametrize("name", list(SEPARABLE) + list(NOT_SEPARABLE))
def test_printer_finds_separable_mods(name):
    mod = SEPARABLE.get(name) or NOT_SEPARABLE[name]
    p = print_mod(mod, "score_mod", torch.device("cpu"))
    assert p.separable == (name in SEPARABLE)
    if p.separable:
        parts = p.source.split("def score_mod_parts(")[1].split("def score_mod_row(")
        assert "q_idx" not in parts[0] and "score" not in parts[0].replace("score_mod", "")
        assert "kv_idx" not in parts[1] and "score" not in parts[1].replace("score_mod", "")
    else:
        assert "def score_mod_parts(" not in p.source


def _launch_flag(q, k, v, mod, bm, opts):
    plan = K.cached_plan(q, k, v, mod, bm, None, {"BACKEND": "TRITON", **opts})
    out = torch.empty(*q.shape[:3], v.shape[-1], dtype=q.dtype)
    lse = torch.empty(q.shape[:3])
    return K.forward_launch(plan, q, k, v, out, lse, lse, plan.candidates[0])[2]["SEPARABLE"]


@pytest.mark.parametrize("mask", ["none", "causal", "empty_rows"])
@pytest.mark.parametrize("shape", list(SHAPES.values()), ids=list(SHAPES))
@pytest.mark.parametrize("name", list(SEPARABLE))
def test_separable_forward_fp16(name, shape, mask):
    B, Hq, Hkv, Lq, Lkv, E, Ev = shape
    mod = SEPARABLE[name]
    q, k, v = make_inputs(shape, torch.float16, "cpu")
    bm = None if mask == "none" else create_block_mask(
        generate_causal_mask() if mask == "causal" else _empty_rows, None, None, Lq, Lkv, device="cpu", BLOCK_SIZE=32)
    assert _launch_flag(q, k, v, mod, bm, {})
    out, lse = flex_attention(q, k, v, score_mod=mod, block_mask=bm, enable_gqa=Hq != Hkv, return_lse=True,
                              kernel_options=TRITON)
    ref_out, ref_lse, _ = math_attention(q.double(), k.double(), v.double(), mod, bm)
    low_out, low_lse, _ = math_attention(q, k, v, mod, bm)
    assert not torch.isnan(out).any() and not torch.isnan(lse).any()
    assert_close_to_reference(out, ref_out, low_out, torch.float16, "out")
    assert_close_to_reference(lse, ref_lse, low_lse, torch.float16, "lse")
    if mask == "empty_rows":
        assert (out[:, :, :5] == 0).all() and (lse[:, :, :5] == float("-inf")).all()
    # the same call with the mod evaluated per score gives the same answer
    plain = flex_attention(q, k, v, score_mod=mod, block_mask=bm, enable_gqa=Hq != Hkv,
                           kernel_options={**TRITON, "SEPARABLE_SCORE_MOD": False})
    assert (plain.float() - out.float()).abs().max() < 2e-2


def test_separable_max_scores_include_the_row_bias():
    from inductor_flex import AuxRequest

    q, k, v = make_inputs((1, 2, 2, 37, 53, 32, 32), torch.float16, "cpu")
    _, aux = flex_attention(q, k, v, score_mod=tempered, return_aux=AuxRequest(lse=True, max_scores=True),
                            kernel_options=TRITON)
    _, ref_lse, ref_max = math_attention(q.double(), k.double(), v.double(), tempered)
    assert (aux.max_scores.double() - ref_max).abs().max() < 2e-2
    assert (aux.lse.double() - ref_lse).abs().max() < 2e-2


def test_float32_keeps_the_per_score_mod_unless_asked():
    q, k, v = make_inputs((1, 2, 2, 32, 32, 32, 32), torch.float32, "cpu")
    assert not _launch_flag(q, k, v, key_bias, None, {})
    assert _launch_flag(q, k, v, key_bias, None, {"SEPARABLE_SCORE_MOD": True})
    q16, k16, v16 = (t.half() for t in (q, k, v))
    assert not _launch_flag(q16, k16, v16, key_bias, None, {"SEPARABLE_SCORE_MOD": False})
    assert not _launch_flag(q16, k16, v16, generate_tanh_softcap(20.0), None, {})


@pytest.mark.parametrize("mask", ["none", "causal"])
@pytest.mark.parametrize("shape", ["odd37_E40", "Lq50_Lkv97", "gqa4x2_E64_Ev32"])
@pytest.mark.parametrize("name", ["alibi", "tempered", "divided"])
def test_separable_backward_fp16(name, shape, mask):
    B, Hq, Hkv, Lq, Lkv, E, Ev = SHAPES[shape]
    bm = None if mask == "none" else create_block_mask(generate_causal_mask(), None, None, Lq, Lkv, device="cpu",
                                                       BLOCK_SIZE=32)
    # two draws pooled: one draw's mean error against the fp16 reference's swings by +-15% with the
    # data, the per-score path's alike (measured: the two paths' ratios agree to 0.01 over 8 seeds)
    check_backward(SHAPES[shape], torch.float16, SEPARABLE[name], bm, draws=2)


@pytest.mark.parametrize("factory,make", [(alibi_param, lambda: [torch.rand(2) * 0.2]),
                                          (head_scale, lambda: [torch.rand(2) + 0.5])],
                         ids=["alibi_slopes", "head_scale"])
def test_separable_backward_learned_tensors_fp16(factory, make):
    # the captured tensors' gradients still come from the joint graph (score_mod_bwd), with draws pooled
    check_backward(SHAPES["odd37_E40"], torch.float16, factory, None, captured=make(), draws=3)


def test_compiled_kernel_op_takes_the_separable_form(monkeypatch):
    # under torch.compile with Inductor, a score_mod reading a floating-point tensor runs as the
    # inductor_flex custom ops; they launch the printed templates, separable form included
    from conftest import record_calls

    flags = record_calls(monkeypatch, K, "forward_launch", lambda plan, *a, **k: plan)
    scales = torch.rand(2, generator=_GEN) + 0.5
    mod = head_scale(scales)

    def attn(q, k, v):
        return flex_attention(q, k, v, score_mod=mod, kernel_options=TRITON)

    torch._dynamo.reset()
    compiled = torch.compile(attn, backend="inductor", fullgraph=True)
    q, k, v = make_inputs((1, 2, 2, 64, 64, 32, 32), torch.float16, "cpu", requires_grad=True)
    out = compiled(q, k, v)
    assert flags and all(K.use_separable(p.score, p.opts, torch.float16) for p in flags)
    ref, _, _ = math_attention(q.double(), k.double(), v.double(), mod)
    low, _, _ = math_attention(q, k, v, mod)
    assert_close_to_reference(out, ref, low, torch.float16, "out")
    g = torch.randn_like(out)
    got = torch.autograd.grad(out, (q, k, v), g)
    r = [t.detach().double().requires_grad_() for t in (q, k, v)]
    want = torch.autograd.grad(math_attention(*r, mod)[0], r, g.double())
    lo = [t.detach().requires_grad_() for t in (q, k, v)]
    low_g = torch.autograd.grad(math_attention(*lo, mod)[0], lo, g)
    for name, a, w, l in zip(("dq", "dk", "dv"), got, want, low_g):
        assert_close_to_reference(a, w, l, torch.float16, name)
