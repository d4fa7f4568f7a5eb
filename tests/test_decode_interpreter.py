"""The rendered decode kernel (split-KV + merge), run by Triton's interpreter on CPU tensors, vs the
float64 oracle."""
import contextlib

import pytest
import torch

from inductor_flex import AuxRequest, create_block_mask, flex_attention
from inductor_flex import decode as D
from inductor_flex.reference import math_attention
from inductor_flex.variants import generate_causal_mask, generate_sliding_window

from cases import make_inputs, make_variant
from conftest import assert_close_to_reference

DECODE = {"BACKEND": "TRITON_DECODE"}
VARIANTS = ["noop", "causal", "sliding_window", "document", "alibi", "softcap", "relative_bias",
            "head_scale", "random_blocks", "trig", "ops_soup", "empty_rows"]


def check(q, k, v, score_mod=None, block_mask=None, opts=DECODE, scale=None):
    dtype = q.dtype
    out, lse = flex_attention(q, k, v, score_mod=score_mod, block_mask=block_mask, scale=scale,
                              enable_gqa=q.shape[1] != k.shape[1], return_lse=True, kernel_options=opts)
    ref_out, ref_lse, _ = math_attention(q.double(), k.double(), v.double(), score_mod, block_mask, scale)
    low_out, low_lse, _ = math_attention(q, k, v, score_mod, block_mask, scale)
    assert out.dtype == dtype and out.shape == (*q.shape[:3], v.shape[-1])
    assert not torch.isnan(out).any() and not torch.isnan(lse).any()
    assert_close_to_reference(out, ref_out, low_out, dtype, "out")
    assert_close_to_reference(lse, ref_lse, low_lse, dtype, "lse")
    return out, lse


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("Lq", [1, 3, 16], ids=lambda n: f"Lq{n}")
@pytest.mark.parametrize("group", [1, 4, 8], ids=lambda g: f"gqa{g}")
def test_decode_matches_reference(variant, group, Lq):
    # odd S_kv; fp16 (the interpreter's bf16 dot is broken); BlockMasks broadcast over heads, so a
    # program packs the whole GQA group. Enough output elements (>= 1k) for a stable max-error ratio.
    Hkv, Lkv = 4, 157
    shape = (2, Hkv * group, Hkv, Lq, Lkv, 64, 128)
    q, k, v = make_inputs(shape, torch.float16, "cpu")
    score_mod, block_mask = make_variant(variant, Lq, Lkv, Hkv * group, "cpu")
    out, lse = check(q, k, v, score_mod, block_mask)
    if variant == "empty_rows":
        rows = min(Lq, 5)
        assert (out[:, :, :rows] == 0).all() and (lse[:, :, :rows] == float("-inf")).all()


@pytest.mark.parametrize("variant", ["noop", "causal", "alibi", "softcap", "empty_rows"])
@pytest.mark.parametrize("split", [1, 2, 5, 64], ids=lambda s: f"split{s}")
def test_decode_splits_fp32(variant, split):
    # every split count gives the same answer; 64 shares leave most of them empty
    shape = (1, 8, 2, 2, 203, 40, 24)  # non-power-of-two head dim, V dim != QK dim
    q, k, v = make_inputs(shape, torch.float32, "cpu")
    score_mod, block_mask = make_variant(variant, 2, 203, 8, "cpu")
    check(q, k, v, score_mod, block_mask, opts={**DECODE, "SPLIT_KV": split})


@pytest.mark.parametrize("variant", ["noop", "causal", "document", "softcap"])
@pytest.mark.parametrize("split", [1, 3], ids=lambda s: f"split{s}")
def test_decode_tma_descriptor_loads_match_reference(variant, split):
    # K/V tiles through tensor descriptors: odd S_kv and E=40 (rows and columns past the tensor come
    # back 0 from the copy engine, not from load masks), dense and BlockMask walks, merged shares
    shape = (2, 8, 2, 3, 203, 40, 24)
    q, k, v = make_inputs(shape, torch.float16, "cpu")
    score_mod, block_mask = make_variant(variant, 3, 203, 8, "cpu")
    with _recorded_launches() as launches:
        check(q, k, v, score_mod, block_mask, opts={**DECODE, "USE_TMA": True, "SPLIT_KV": split})
    assert launches and all(c["USE_TMA"] for c in launches)


def test_decode_tma_falls_back_for_strides_a_descriptor_cannot_take():
    # 82-byte K/V rows: the launch takes the pointer loads (a descriptor would fault), same answer
    shape = (1, 4, 2, 1, 67, 40, 40)
    q, k, v = make_inputs(shape, torch.float16, "cpu")
    k = torch.nn.functional.pad(k, (0, 1))[..., :40]
    v = torch.nn.functional.pad(v, (0, 1))[..., :40]
    with _recorded_launches() as launches:
        check(q, k, v, opts={**DECODE, "USE_TMA": True})
    assert launches and not any(c["USE_TMA"] for c in launches)


@contextlib.contextmanager
def _recorded_launches():
    # the constexprs of every decode launch
    seen, real = [], D.launch_kernel

    def record(fn, grid, args, constexprs, *rest):
        seen.append(dict(constexprs))
        return real(fn, grid, args, constexprs, *rest)

    D.launch_kernel = record
    try:
        yield seen
    finally:
        D.launch_kernel = real


def test_mod_reaching_a_changed_list_gets_a_new_plan():
    # the plan cache keys a list of constants by its contents: the print bakes them in
    q, k, v = make_inputs((1, 4, 2, 1, 67, 32, 32), torch.float16, "cpu")
    weights = [0.0, 0.0]

    def mod(score, b, h, q_idx, kv_idx):
        return score + weights[0] * (kv_idx < 20) + weights[1] * (kv_idx >= 40)

    first, _ = check(q, k, v, mod)
    weights[0], weights[1] = 4.0, -3.0
    second, _ = check(q, k, v, mod)
    assert (first - second).abs().max() > 1e-2


@pytest.mark.parametrize("form", ["bound_method", "callable_object"])
def test_method_mod_sees_a_rebound_attribute(form):
    # a module's self.score_mod is a new bound object at each access: one plan serves it, and the
    # attributes of self its code names are part of the plan key (a rebound bias reprints it); a
    # callable object's __call__ is such a method
    q, k, v = make_inputs((1, 4, 2, 1, 67, 32, 32), torch.float16, "cpu")

    class Bias(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.bias = torch.zeros(67)

        def score_mod(self, score, b, h, q_idx, kv_idx):
            return score + self.bias[kv_idx]

        def __call__(self, score, b, h, q_idx, kv_idx):
            return score + self.bias[kv_idx]

    m = Bias()

    def mod():
        return m.score_mod if form == "bound_method" else m

    first, _ = check(q, k, v, mod())
    plans = D.stats["plans"]
    check(q, k, v, mod())
    assert D.stats["plans"] == plans
    m.bias = torch.linspace(-4.0, 4.0, 67)
    second, _ = check(q, k, v, mod())
    assert (first - second).abs().max() > 1e-2


def test_module_called_as_a_mod_sees_a_changed_number():
    # Module.__call__ hands self to its hooks, so the plan key cannot see what forward reads: such
    # a mod is planned at every call
    q, k, v = make_inputs((1, 4, 2, 1, 67, 32, 32), torch.float16, "cpu")

    class Softcap(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.cap = 20.0

        def forward(self, score, b, h, q_idx, kv_idx):
            return self.cap * torch.tanh(score / self.cap)

    m = Softcap()
    first, _ = check(q, k, v, m)
    m.cap = 0.5
    second, _ = check(q, k, v, m)
    assert (first - second).abs().max() > 1e-2


def test_number_a_helper_reads_off_a_passed_object_gets_a_new_plan():
    # the mod hands a global object to a helper that reads cfg.scale: a name only the helper's code
    # holds, so the plan key takes the print cache's key, which covers it
    q, k, v = make_inputs((1, 4, 2, 1, 67, 32, 32), torch.float16, "cpu")
    first, _ = check(q, k, v, _scaled_by_cfg)
    _CFG.scale = 0.1
    try:
        second, _ = check(q, k, v, _scaled_by_cfg)
    finally:
        _CFG.scale = 2.0
    assert (first - second).abs().max() > 1e-2


class _Cfg:
    scale = 2.0


_CFG = _Cfg()


def _scale_with(cfg, score):
    return score * cfg.scale


def _scaled_by_cfg(score, b, h, q_idx, kv_idx):
    return _scale_with(_CFG, score)


def test_per_head_block_mask_is_not_packed():
    # a BlockMask that differs per query head: each program takes one head
    Hq, Hkv, Lq, Lkv = 8, 2, 2, 131

    def per_head(b, h, q_idx, kv_idx):
        return (kv_idx % (h + 2)) != 0

    bm = create_block_mask(per_head, None, Hq, Lq, Lkv, device="cpu", BLOCK_SIZE=32)
    q, k, v = make_inputs((2, Hq, Hkv, Lq, Lkv, 32, 32), torch.float16, "cpu")
    plan = D.get_plan(q, k, v, None, bm, DECODE)
    assert plan.heads == 1
    check(q, k, v, None, bm, opts={**DECODE, "SPLIT_KV": 3})


def test_gqa_group_is_packed_into_one_program():
    q, k, v = make_inputs((1, 16, 2, 4, 64, 32, 32), torch.float16, "cpu")
    plan = D.get_plan(q, k, v, None, None, DECODE)
    assert plan.heads == 8 and plan.block_m == 32 and plan.programs == 2


def test_offset_tensor_serves_every_position_with_one_plan():
    # the usual decode loop: one mask_mod over a captured offset, BlockMask sliced at the current q block
    B, Hq, Hkv, E, MAX = 2, 8, 2, 32, 300
    offset = torch.tensor(0)

    def causal_at_offset(b, h, q_idx, kv_idx):
        return q_idx + offset >= kv_idx

    def bias_at_offset(score, b, h, q_idx, kv_idx):
        return score - 0.02 * (q_idx + offset - kv_idx)

    full = create_block_mask(generate_causal_mask(), None, None, MAX, MAX, device="cpu", BLOCK_SIZE=32)
    k = torch.randn(B, Hkv, MAX, E, dtype=torch.float16)
    v = torch.randn(B, Hkv, MAX, E, dtype=torch.float16)
    before = None
    for pos in (0, 31, 32, 150, 299):
        offset.fill_(pos)
        bm = full[:, :, torch.tensor(pos // 32)]  # 0-d tensor index: no host sync, keeps the dim
        bm.mask_mod = causal_at_offset
        q = torch.randn(B, Hq, 1, E, dtype=torch.float16)
        out, _ = check(q, k, v, bias_at_offset, bm)
        # same as attending to the first pos + 1 keys with the bias written out
        ref, _, _ = math_attention(q.double(), k[:, :, :pos + 1].double(), v[:, :, :pos + 1].double(),
                                   lambda s, b, h, qi, kv: s - 0.02 * (pos - kv))
        assert (out.double() - ref).abs().max() < 5e-3
        if before is None:
            before = dict(D.stats)
    assert D.stats["renders"] == before["renders"] and D.stats["plans"] == before["plans"]
    assert D.stats["plan_hits"] >= before["plan_hits"] + 4


def test_block_mask_int_and_tensor_q_block_slices_agree():
    full = create_block_mask(generate_sliding_window(40), 2, 1, 256, 256, device="cpu", BLOCK_SIZE=32)
    a, b = full[:, :, 5], full[:, :, torch.tensor(5)]
    assert a.kv_num_blocks.shape == b.kv_num_blocks.shape == (2, 1, 1)
    assert torch.equal(a.to_dense(), b.to_dense()) and torch.equal(a.to_dense()[:, :, 0], full.to_dense()[:, :, 5])


def test_replaced_captured_tensor_is_seen_by_the_cached_plan():
    q, k, v = make_inputs((1, 4, 2, 1, 48, 16, 16), torch.float32, "cpu")

    class Holder:
        bias = torch.zeros(48)

    def mod(score, b, h, q_idx, kv_idx):
        return score + Holder.bias[kv_idx]

    check(q, k, v, mod)
    Holder.bias = torch.randn(48) * 3
    check(q, k, v, mod)

    scale = torch.ones(4)

    def closure_mod(score, b, h, q_idx, kv_idx):
        return score * scale[h]

    check(q, k, v, closure_mod)
    scale = torch.rand(4) + 0.5  # noqa: F841 - rebinding the closure cell
    check(q, k, v, closure_mod)


def test_triton_backend_short_query_takes_decode_path():
    q, k, v = make_inputs((1, 4, 1, 3, 70, 16, 16), torch.float32, "cpu")
    before = D.stats["plans"] + D.stats["plan_hits"]
    check(q, k, v, opts={"BACKEND": "TRITON"})
    assert D.stats["plans"] + D.stats["plan_hits"] == before + 1


def test_short_query_with_grad_uses_forward_kernel():
    q, k, v = make_inputs((1, 2, 2, 3, 40, 16, 16), torch.float32, "cpu", requires_grad=True)
    before = D.stats["plans"] + D.stats["plan_hits"]
    out = flex_attention(q, k, v, kernel_options={"BACKEND": "TRITON"})
    out.sum().backward()
    assert D.stats["plans"] + D.stats["plan_hits"] == before
    assert q.grad is not None and torch.isfinite(q.grad).all()


def test_decode_backend_with_grad_raises():
    q, k, v = make_inputs((1, 2, 2, 1, 40, 16, 16), torch.float32, "cpu", requires_grad=True)
    with pytest.raises(ValueError, match="TRITON_DECODE.*no backward"):
        flex_attention(q, k, v, kernel_options=DECODE)


def test_decode_backend_rejects_queries_spanning_q_blocks():
    q, k, v = make_inputs((1, 2, 2, 40, 40, 16, 16), torch.float32, "cpu")
    bm = create_block_mask(generate_causal_mask(), None, None, 40, 40, device="cpu", BLOCK_SIZE=32)
    with pytest.raises(ValueError, match="TRITON_DECODE.*q block"):
        flex_attention(q, k, v, block_mask=bm, kernel_options=DECODE)


def test_non_contiguous_query_and_scale():
    base = torch.randn(2, 4, 8, 32)  # (B, L, H, E) storage
    q = base.transpose(1, 2)
    k = torch.randn(2, 2, 97, 32).transpose(2, 3).contiguous().transpose(2, 3)
    v = torch.randn(2, 2, 97, 32)
    assert not q.is_contiguous() and not k.is_contiguous()
    check(q, k, v, scale=0.3, opts={**DECODE, "SPLIT_KV": 4})


def test_return_aux_max_scores():
    q, k, v = make_inputs((1, 4, 2, 8, 90, 16, 16), torch.float32, "cpu")
    _, bm = make_variant("empty_rows", 8, 90, 4, "cpu")  # rows 0..4 empty, 5..7 not
    out, aux = flex_attention(q, k, v, block_mask=bm, enable_gqa=True,
                              return_aux=AuxRequest(lse=True, max_scores=True),
                              kernel_options={**DECODE, "SPLIT_KV": 3})
    _, ref_lse, ref_max = math_attention(q.double(), k.double(), v.double(), None, bm)
    assert torch.equal(torch.isinf(aux.max_scores), torch.isinf(ref_max))
    finite = torch.isfinite(ref_max)
    assert (aux.max_scores.double() - ref_max)[finite].abs().max() < 1e-5
    assert (aux.lse.double() - ref_lse)[finite].abs().max() < 1e-5
