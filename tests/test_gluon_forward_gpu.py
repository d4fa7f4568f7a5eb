"""GPU suite (Hopper): the hand-scheduled Gluon forward (templates/flex_forward_gluon.py) against the
float64 reference, forward and backward, and the calls that must stay on the Jinja template."""
import pytest
import torch

from inductor_flex import AuxRequest, create_block_mask, flex_attention
from inductor_flex import gluon_forward as G
from inductor_flex import kernel as K
from inductor_flex.reference import math_attention
from inductor_flex.validation import validate_kernel_options
from inductor_flex.variants import generate_alibi_bias, generate_causal_mask, generate_head_scale, generate_tanh_softcap

from cases import make_inputs
from conftest import assert_close_to_reference
from test_backward_interpreter import TRITON, check_backward

pytestmark = pytest.mark.gpu

# (B, Hq, Hkv, L, L, D, D): one kv tile, several, GQA, odd batch/head counts
SHAPES = {
    "B3_H2_L128": (3, 2, 2, 128, 128, 128, 128),
    "B2_H4_L384": (2, 4, 4, 384, 384, 128, 128),
    "gqa8x2_L1024": (1, 8, 2, 1024, 1024, 128, 128),
    "B2_H3_L640_D64": (2, 3, 3, 640, 640, 64, 64),
    "gqa4x1_L256_D64": (2, 4, 1, 256, 256, 64, 64),
}


ON = {"GLUON": True}  # at any length it serves (by default from gluon_forward.MIN_LEN on)


def _needs_gluon():
    if not G.available(torch.device("cuda")):
        pytest.skip("needs a Hopper GPU and a Triton with Gluon's warp specialization")


def _plan(q, k, v, block_mask, opts=None, score_mod=None):
    return K.cached_plan(q, k, v, score_mod, block_mask, None, validate_kernel_options(opts))


def _early_rows_empty(score, b, h, q_idx, kv_idx):
    # rows 0-4 all -inf by the score_mod: 0 output and -inf lse, never NaN
    return torch.where(q_idx < 5, float("-inf"), score)


def _ops(score, b, h, q_idx, kv_idx):
    return score * 0.75 + (q_idx - kv_idx) * 0.01 + torch.abs(torch.sin(h * 0.5 + b))


# name: (score_mod factory (of Hq), dtype, kernel_options beyond GLUON)
SCORE_MODS = {
    "softcap30_bf16": (lambda H: generate_tanh_softcap(30.0), torch.bfloat16, {}),
    "softcap2_bf16": (lambda H: generate_tanh_softcap(2.0), torch.bfloat16, {}),
    "softcap2_exact_tanh_fp16": (lambda H: generate_tanh_softcap(2.0), torch.float16, {"FAST_TANH": False}),
    "alibi_bf16": (generate_alibi_bias, torch.bfloat16, {}),
    "alibi_fp16": (generate_alibi_bias, torch.float16, {}),
    "ops_bf16": (lambda H: _ops, torch.bfloat16, {}),
    "early_rows_empty_bf16": (lambda H: _early_rows_empty, torch.bfloat16, {}),
}


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("shape", list(SHAPES.values()), ids=list(SHAPES))
@pytest.mark.parametrize("mode", ["dense", "causal"])
def test_gluon_forward_matches_reference(mode, shape, dtype):
    _needs_gluon()
    B, Hq, Hkv, L, _, D, _ = shape
    q, k, v = make_inputs(shape, dtype, "cuda")
    bm = create_block_mask(generate_causal_mask(), None, None, L, L, device="cuda") if mode == "causal" else None
    out, aux = flex_attention(q, k, v, block_mask=bm, enable_gqa=Hq != Hkv,
                              return_aux=AuxRequest(lse=True, max_scores=True), kernel_options=ON)
    plan = _plan(q, k, v, bm, ON)
    assert plan.gluon == mode and plan.config == "gluon"
    ref_out, ref_lse, ref_max = math_attention(q.double(), k.double(), v.double(), None, bm)
    low_out, low_lse, low_max = math_attention(q, k, v, None, bm)
    assert_close_to_reference(out, ref_out, low_out, dtype, "out")
    assert_close_to_reference(aux.lse, ref_lse, low_lse, dtype, "lse")
    assert_close_to_reference(aux.max_scores, ref_max, low_max, dtype, "max_scores")
    # the template on the same call: the same answer within the same criterion
    tmpl = flex_attention(q, k, v, block_mask=bm, enable_gqa=Hq != Hkv, kernel_options={"GLUON": False})
    assert _plan(q, k, v, bm, {"GLUON": False}).gluon is None
    assert_close_to_reference(tmpl, ref_out, low_out, dtype, "template out")


@pytest.mark.parametrize("shape", ["B2_H4_L384", "gqa8x2_L1024", "B2_H3_L640_D64"])
@pytest.mark.parametrize("mode", ["dense", "causal"])
def test_gluon_forward_backward(mode, shape):
    """The backward runs from the Gluon forward's O and lse (with an lse gradient too)."""
    _needs_gluon()
    B, Hq, Hkv, L, _, D, _ = SHAPES[shape]
    bm = create_block_mask(generate_causal_mask(), None, None, L, L, device="cuda") if mode == "causal" else None
    opts = dict(TRITON, **ON)
    check_backward(SHAPES[shape], torch.bfloat16, None, bm, kernel_options=opts, device="cuda")
    # the forward check_backward ran was the Gluon kernel
    q, k, v = make_inputs(SHAPES[shape], torch.bfloat16, "cuda", requires_grad=True)
    flex_attention(q, k, v, block_mask=bm, enable_gqa=Hq != Hkv, kernel_options=opts)
    assert _plan(q, k, v, bm, opts).config == "gluon"


@pytest.mark.parametrize("shape", ["B2_H4_L384", "gqa8x2_L1024", "B2_H3_L640_D64"])
@pytest.mark.parametrize("mod", list(SCORE_MODS))
@pytest.mark.parametrize("mode", ["dense", "causal"])
def test_gluon_forward_score_mod_matches_reference(mode, mod, shape):
    """score_mods printed into the kernel's hook: out, lse and max_scores against float64."""
    _needs_gluon()
    make, dtype, extra = SCORE_MODS[mod]
    B, Hq, Hkv, L, _, D, _ = SHAPES[shape]
    score_mod = make(Hq)
    opts = dict(ON, **extra)
    q, k, v = make_inputs(SHAPES[shape], dtype, "cuda")
    bm = create_block_mask(generate_causal_mask(), None, None, L, L, device="cuda") if mode == "causal" else None
    out, aux = flex_attention(q, k, v, score_mod=score_mod, block_mask=bm, enable_gqa=Hq != Hkv,
                              return_aux=AuxRequest(lse=True, max_scores=True), kernel_options=opts)
    plan = _plan(q, k, v, bm, opts, score_mod)
    assert plan.gluon == mode and plan.config == "gluon" and plan.gluon_source is not None
    ref_out, ref_lse, ref_max = math_attention(q.double(), k.double(), v.double(), score_mod, bm)
    low_out, low_lse, low_max = math_attention(q, k, v, score_mod, bm)
    assert not torch.isnan(out).any()
    assert_close_to_reference(out, ref_out, low_out, dtype, "out")
    assert_close_to_reference(aux.lse, ref_lse, low_lse, dtype, "lse")
    assert_close_to_reference(aux.max_scores, ref_max, low_max, dtype, "max_scores")
    if mod.startswith("early_rows_empty"):
        assert (out[:, :, :5] == 0).all() and (aux.lse[:, :, :5] == float("-inf")).all()


@pytest.mark.parametrize("mod", ["softcap30_bf16", "alibi_bf16"])
@pytest.mark.parametrize("mode", ["dense", "causal"])
def test_gluon_forward_score_mod_backward(mode, mod):
    """The template's backward from the hooked Gluon forward's O and lse."""
    _needs_gluon()
    make, dtype, extra = SCORE_MODS[mod]
    shape = SHAPES["gqa8x2_L1024"]
    B, Hq, Hkv, L, _, D, _ = shape
    bm = create_block_mask(generate_causal_mask(), None, None, L, L, device="cuda") if mode == "causal" else None
    opts = dict(TRITON, **ON, **extra)
    score_mod = make(Hq)
    check_backward(shape, dtype, score_mod, bm, kernel_options=opts, device="cuda")
    q, k, v = make_inputs(shape, dtype, "cuda", requires_grad=True)
    flex_attention(q, k, v, score_mod=score_mod, block_mask=bm, enable_gqa=True, kernel_options=opts)
    assert _plan(q, k, v, bm, opts, score_mod).config == "gluon"


@pytest.mark.parametrize("D, L, default", [(128, 1024, True), (128, 512, False), (64, 4096, True), (64, 1024, False)])
def test_gluon_forward_default_lengths(D, L, default):
    """Without kernel_options the kernel runs from gluon_forward.MIN_LEN on."""
    _needs_gluon()
    q, k, v = make_inputs((1, 2, 2, L, L, D, D), torch.bfloat16, "cuda")
    flex_attention(q, k, v)
    plan = _plan(q, k, v, None)
    assert (plan.gluon == "dense") == default and (plan.config == "gluon") == default


@pytest.mark.parametrize("L, default", [(4096, True), (1024, False)])
def test_gluon_forward_default_lengths_with_score_mod(L, default):
    """With a score_mod the kernel runs from gluon_forward.MIN_LEN_SCORE on."""
    _needs_gluon()
    q, k, v = make_inputs((1, 2, 2, L, L, 128, 128), torch.bfloat16, "cuda")
    softcap = generate_tanh_softcap(30.0)
    flex_attention(q, k, v, score_mod=softcap)
    plan = _plan(q, k, v, None, None, softcap)
    assert (plan.gluon == "dense") == default and (plan.config == "gluon") == default


def _strict_causal_for_odd_batches(b, h, q_idx, kv_idx):
    # causal's block structure, but batch 1's diagonal excluded: not the kernel's causal mode
    return (q_idx >= kv_idx) & ((b == 0) | (q_idx != kv_idx))


@pytest.mark.parametrize("case", ["score_mod", "length_1000", "transposed_layout", "batch_dependent_mask",
                                  "gluon_false", "pinned_config", "lq_ne_lkv"])
def test_gluon_forward_falls_back(case):
    """Calls the kernel does not serve run the template, with the right answer (GLUON=True asked)."""
    _needs_gluon()
    dtype = torch.bfloat16
    shape = (2, 4, 4, 1000 if case == "length_1000" else 384, 384, 128, 128)
    B, Hq, Hkv, Lq, Lkv, D, _ = shape
    q, k, v = make_inputs(shape, dtype, "cuda")
    score_mod, bm, opts = None, None, dict(ON)
    if case == "score_mod":  # a captured tensor (gluon_forward.CAPTURED_OK)
        score_mod = generate_head_scale(torch.rand(Hq, device="cuda") + 0.5)
    elif case == "length_1000":
        k, v = make_inputs((B, Hq, Hkv, 1000, 1000, D, D), dtype, "cuda")[1:]
    elif case == "transposed_layout":
        q, k, v = (t.transpose(1, 2).contiguous().transpose(1, 2) for t in (q, k, v))
    elif case == "batch_dependent_mask":
        bm = create_block_mask(_strict_causal_for_odd_batches, B, None, Lq, Lkv, device="cuda")
    elif case == "gluon_false":
        opts = {"GLUON": False}
    elif case == "pinned_config":
        opts.update(BLOCK_M=64, BLOCK_N=64, num_warps=4, num_stages=2)
    elif case == "lq_ne_lkv":
        q = q[:, :, :256].contiguous()
        bm = None
    out = flex_attention(q, k, v, score_mod=score_mod, block_mask=bm, kernel_options=opts)
    plan = K.cached_plan(q, k, v, score_mod, bm, None, validate_kernel_options(opts))
    if case == "transposed_layout":
        assert plan.gluon == "dense" and plan.config != "gluon"  # the plan applies, the layout does not
    else:
        assert plan.gluon is None and plan.config != "gluon"
    ref_out, _, _ = math_attention(q.double(), k.double(), v.double(), score_mod, bm)
    low_out, _, _ = math_attention(q, k, v, score_mod, bm)
    assert_close_to_reference(out, ref_out, low_out, dtype, "out")



@pytest.mark.parametrize("D, L, mod", [(128, 1024, None), (64, 4096, None), (128, 4096, "softcap30_bf16")])
def test_gluon_forward_under_compile(D, L, mod, monkeypatch):
    """A dense call under torch.compile traces to the inductor_flex::flex_forward op, which runs the
    Gluon kernel (with a score_mod: the hook printed from the op's rendered source); forward and
    backward (the Inductor-rendered backward template) against float64."""
    from conftest import assert_grads_close, record_calls

    _needs_gluon()
    calls = record_calls(monkeypatch, G, "launch", lambda *a, **kw: (a[7], a[8] is not None))  # causal, hooked
    shape = (1, 4, 2, L, L, D, D)
    q, k, v = make_inputs(shape, torch.bfloat16, "cuda", requires_grad=True)
    score_mod = SCORE_MODS[mod][0](4) if mod else None
    torch._dynamo.reset()
    fn = torch.compile(lambda q, k, v: flex_attention(q, k, v, score_mod=score_mod, enable_gqa=True, return_lse=True),
                       fullgraph=True)
    out, lse = fn(q, k, v)
    assert calls == [(False, mod is not None)]  # one launch, dense
    g = torch.randn_like(out)
    grads = torch.autograd.grad(out, (q, k, v), g)
    qd, kd, vd = (t.detach() for t in (q, k, v))
    ref_out, ref_lse, _ = math_attention(qd.double(), kd.double(), vd.double(), score_mod, None)
    low_out, low_lse, _ = math_attention(qd, kd, vd, score_mod, None)
    assert_close_to_reference(out, ref_out, low_out, torch.bfloat16, "out")
    assert_close_to_reference(lse, ref_lse, low_lse, torch.bfloat16, "lse")
    assert_grads_close(q, k, v, grads, g, score_mod, None, torch.bfloat16)
