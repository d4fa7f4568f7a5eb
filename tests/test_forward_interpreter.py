"""The rendered forward kernel, run by Triton's interpreter on CPU tensors, vs the float64 oracle."""
import contextlib

import pytest
import torch

from inductor_flex import flex_attention
from inductor_flex.reference import math_attention

from cases import RUN_WALK_VARIANTS, SHAPES, VARIANTS, make_inputs, make_variant, packed_documents, run_walk_mask_mod
from conftest import assert_close_to_reference

TRITON = {"BACKEND": "TRITON"}


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
@pytest.mark.parametrize("shape", list(SHAPES.values()), ids=list(SHAPES))
@pytest.mark.parametrize("variant", VARIANTS)
def test_forward_matches_reference(variant, shape, dtype):
    B, Hq, Hkv, Lq, Lkv, E, Ev = shape
    q, k, v = make_inputs(shape, dtype, "cpu")
    score_mod, block_mask = make_variant(variant, Lq, Lkv, Hq, "cpu")
    out, lse = flex_attention(q, k, v, score_mod=score_mod, block_mask=block_mask, enable_gqa=Hq != Hkv,
                              return_lse=True, kernel_options=TRITON)
    ref_out, ref_lse, _ = math_attention(q.double(), k.double(), v.double(), score_mod, block_mask)
    low_out, low_lse, _ = math_attention(q, k, v, score_mod, block_mask)
    assert out.dtype == dtype and out.shape == (B, Hq, Lq, Ev)
    assert not torch.isnan(out).any() and not torch.isnan(lse).any()
    assert_close_to_reference(out, ref_out, low_out, dtype, "out")
    assert_close_to_reference(lse, ref_lse, low_lse, dtype, "lse")
    if variant == "empty_rows":
        assert (out[:, :, :5] == 0).all() and (lse[:, :, :5] == float("-inf")).all()


@pytest.mark.parametrize("shape", list(SHAPES.values()), ids=list(SHAPES))
@pytest.mark.parametrize("variant", ["noop", "causal", "document", "softcap"])
def test_tma_descriptor_loads_match_reference(variant, shape):
    # K/V tiles through tensor descriptors: rows past the length and columns past the head dim
    # (odd lengths, E=40) come back as zeros from the copy engine, not from load masks
    B, Hq, Hkv, Lq, Lkv, E, Ev = shape
    q, k, v = make_inputs(shape, torch.float16, "cpu")
    score_mod, block_mask = make_variant(variant, Lq, Lkv, Hq, "cpu")
    out, lse = flex_attention(q, k, v, score_mod=score_mod, block_mask=block_mask, enable_gqa=Hq != Hkv,
                              return_lse=True, kernel_options={**TRITON, "USE_TMA": True})
    ref_out, ref_lse, _ = math_attention(q.double(), k.double(), v.double(), score_mod, block_mask)
    low_out, low_lse, _ = math_attention(q, k, v, score_mod, block_mask)
    assert_close_to_reference(out, ref_out, low_out, torch.float16, "out")
    assert_close_to_reference(lse, ref_lse, low_lse, torch.float16, "lse")


def test_tma_falls_back_where_strides_do_not_allow_it():
    from inductor_flex.kernel import use_tma

    k = torch.zeros(1, 2, 37, 40, dtype=torch.float16)
    assert use_tma({"USE_TMA": True}, k, k)
    assert not use_tma({"USE_TMA": False}, k, k)
    assert not use_tma({}, k, k)  # off by default
    odd_rows = torch.zeros(1, 2, 37, 41, dtype=torch.float16)[..., :40]  # 82-byte rows
    assert not use_tma({"USE_TMA": True}, odd_rows, odd_rows)
    assert not use_tma({"USE_TMA": True}, k.transpose(2, 3), k.transpose(2, 3))  # head dim not unit stride


def test_non_contiguous_inputs_are_not_copied():
    # (B, L, H, E) storage viewed as (B, H, L, E): the kernel takes the strides as they are
    base_q = torch.randn(1, 45, 2, 32)
    base_k = torch.randn(1, 45, 2, 32)
    base_v = torch.randn(1, 45, 2, 48)
    q, k, v = (t.transpose(1, 2) for t in (base_q, base_k, base_v))
    assert not q.is_contiguous()
    out = flex_attention(q, k, v, kernel_options=TRITON)
    ref, _, _ = math_attention(q.double(), k.double(), v.double())
    assert (out.double() - ref).abs().max() < 1e-5


def test_captured_tensor_several_reads_and_negative_index():
    table = torch.randn(64)

    def two_reads(score, b, h, q_idx, kv_idx):
        # negative indices wrap like PyTorch indexing does
        return score + table[q_idx - kv_idx] - 0.5 * table[kv_idx]

    q, k, v = make_inputs((1, 2, 2, 40, 40, 32, 32), torch.float32, "cpu")
    out = flex_attention(q, k, v, score_mod=two_reads, kernel_options=TRITON)
    ref, _, _ = math_attention(q.double(), k.double(), v.double(), two_reads)
    assert (out.double() - ref).abs().max() < 1e-5


def test_mask_index_read_from_a_captured_tensor_wraps_only_when_it_may_be_negative():
    """A mask_mod that indexes a captured tensor with values read from another one (a document
    mask's offsets[ids[q]]) skips PyTorch's negative-index wrap when the index tensor holds no
    negative value (printer.nonneg_flag, read once per in-place version). Negative ids written in
    place later wrap again; an unsigned index tensor never needs the read. All against the math
    reference, which indexes as PyTorch does."""
    from inductor_flex import create_block_mask
    from inductor_flex import kernel as K
    from inductor_flex.printer import nonneg_flag

    L = 48
    ids = torch.div(torch.arange(L), 20, rounding_mode="floor")  # documents of 20, 20, 8 rows
    starts = torch.tensor([0, 20, 40])

    def doc_from_table(b, h, q_idx, kv_idx):
        # causal, from the start of the query's document on (starts[ids[q]])
        return (kv_idx <= q_idx) & (kv_idx >= starts[ids[q_idx]])

    q, k, v = make_inputs((1, 2, 2, L, L, 16, 16), torch.float16, "cpu")

    def check(expect_flag):
        bm = create_block_mask(doc_from_table, None, None, L, L, device="cpu", BLOCK_SIZE=16)
        out, lse = flex_attention(q, k, v, block_mask=bm, return_lse=True, kernel_options=TRITON)
        ref_out, ref_lse, _ = math_attention(q.double(), k.double(), v.double(), None, bm)
        low_out, low_lse, _ = math_attention(q, k, v, None, bm)
        assert_close_to_reference(out, ref_out, low_out, torch.float16, "out")
        assert_close_to_reference(lse, ref_lse, low_lse, torch.float16, "lse")
        plan = K.cached_plan(q, k, v, None, bm, None, dict(TRITON))
        assert "MM_CAP0_nonneg" in plan.source and plan.mask.index_sources == [0]
        assert plan.mask.args_for(plan.mask.tensors)[-1] == nonneg_flag(ids) == expect_flag

    check(1)
    # the last document's id written as -1 in place: starts[-1] is its start (40) as in PyTorch
    ids[40:] = -1
    check(0)
    ids[40:] = 2
    check(1)
    assert nonneg_flag(torch.tensor([-1], dtype=torch.uint8)) == 1  # unsigned: no device read
    assert nonneg_flag(torch.tensor([0, -3])) == 0


def test_return_aux_max_scores():
    from inductor_flex import AuxRequest

    q, k, v = make_inputs((1, 2, 2, 20, 30, 16, 16), torch.float32, "cpu")
    out, aux = flex_attention(q, k, v, return_aux=AuxRequest(lse=True, max_scores=True), kernel_options=TRITON)
    _, ref_lse, ref_max = math_attention(q.double(), k.double(), v.double())
    assert (aux.lse.double() - ref_lse).abs().max() < 1e-5
    assert (aux.max_scores.double() - ref_max).abs().max() < 1e-5


def test_kernel_reused_for_new_closure_values():
    from inductor_flex import kernel as K

    q, k, v = make_inputs((1, 1, 1, 16, 16, 16, 16), torch.float32, "cpu")
    sources = set()
    for i in range(3):
        bias = torch.randn(16)

        def with_bias(score, b, h, q_idx, kv_idx):
            return score + bias[kv_idx]

        out = flex_attention(q, k, v, score_mod=with_bias, kernel_options=TRITON)
        ref, _, _ = math_attention(q.double(), k.double(), v.double(), with_bias)
        assert (out.double() - ref).abs().max() < 1e-5
        sources.add(K.kernel_source(q, k, v, score_mod=with_bias))
    assert len(sources) == 1


def test_cached_print_sees_replaced_captured_tensor():
    q, k, v = make_inputs((1, 1, 1, 16, 16, 16, 16), torch.float32, "cpu")

    class Holder:
        bias = torch.zeros(16)

    def mod(score, b, h, q_idx, kv_idx):
        return score + Holder.bias[kv_idx]

    flex_attention(q, k, v, score_mod=mod, kernel_options=TRITON)
    Holder.bias = torch.randn(16) * 3
    out = flex_attention(q, k, v, score_mod=mod, kernel_options=TRITON)
    ref, _, _ = math_attention(q.double(), k.double(), v.double(), mod)
    assert (out.double() - ref).abs().max() < 1e-5


def test_rebinding_a_captured_tensor_is_seen_without_rerunning_the_print():
    # the cached print is reused only while the closure still holds the same tensor objects
    q, k, v = make_inputs((1, 2, 2, 33, 33, 16, 16), torch.float32, "cpu")
    bias = torch.zeros(2)

    def mod(score, b, h, q_idx, kv_idx):
        return score + bias[h] * (kv_idx == 0)

    first = flex_attention(q, k, v, score_mod=mod, kernel_options=TRITON)
    bias = torch.full((2,), 50.0)  # rebinds the closure cell
    second = flex_attention(q, k, v, score_mod=mod, kernel_options=TRITON)
    ref, _, _ = math_attention(q.double(), k.double(), v.double(), mod)
    assert (second.double() - ref).abs().max() < 1e-5
    assert (first - second).abs().max() > 1e-2
    bias.fill_(-50.0)  # in place: same object, the kernel reads the new values
    third = flex_attention(q, k, v, score_mod=mod, kernel_options=TRITON)
    ref, _, _ = math_attention(q.double(), k.double(), v.double(), mod)
    assert (third.double() - ref).abs().max() < 1e-5


@contextlib.contextmanager
def slow_prints():
    """The calls that ran a mod to learn what it reads (kernel._printed_mod_slow), listed."""
    from inductor_flex import kernel as K

    slow, calls = K._printed_mod_slow, []
    K._printed_mod_slow = lambda *a: calls.append(a) or slow(*a)
    try:
        yield calls
    finally:
        K._printed_mod_slow = slow


def test_mod_reaching_a_list_of_scalars_takes_the_fast_path_and_sees_changes():
    # a list of constants (e.g. document boundaries) reached through a helper: the call must not run
    # the mod on the device to learn what it reads (that cost 0.9 ms per call on the H100,
    # benchmarks/mask_cost_probe.py "arith"), and a changed list must reprint it
    q, k, v = make_inputs((1, 1, 1, 33, 33, 16, 16), torch.float32, "cpu")
    bounds = [5, 17]

    def seg(x):
        d = x * 0
        for s in bounds:
            d = d + (x >= s).to(torch.int32)
        return d

    def mod(score, b, h, q_idx, kv_idx):
        return score + 2.0 * (seg(q_idx) == seg(kv_idx))

    def check():
        out = flex_attention(q, k, v, score_mod=mod, kernel_options=TRITON)
        ref, _, _ = math_attention(q.double(), k.double(), v.double(), mod)
        assert (out.double() - ref).abs().max() < 1e-5
        return out

    first = check()
    with slow_prints() as calls:
        check()
        assert calls == []
        bounds[1] = 9  # in place: same list object, new constants
        assert (check() - first).abs().max() > 1e-3
        assert len(calls) == 1


@pytest.mark.parametrize("combine", ["or_masks", "and_masks"])
def test_composed_mask_takes_the_fast_path_and_sees_a_rebound_tensor(combine):
    # and_masks / or_masks close over a tuple of mods: walked like the mod's own cells, so the call
    # does not run the mask on the device to learn what it reads (that cost the H200's eager
    # prefix-LM forward 280-380 us of host time per call), and a rebound tensor still reprints it
    from inductor_flex import create_block_mask
    from inductor_flex import mods
    from inductor_flex.variants import generate_causal_mask

    q, k, v = make_inputs((1, 2, 2, 40, 40, 16, 16), torch.float32, "cpu")
    chosen_keys = torch.arange(40) % 3 == 0

    def chosen(b, h, q_idx, kv_idx):
        return chosen_keys[kv_idx]

    mask_mod = getattr(mods, combine)(generate_causal_mask(), chosen)

    def check():
        bm = create_block_mask(mask_mod, None, None, 40, 40, device="cpu", BLOCK_SIZE=16)
        out = flex_attention(q, k, v, block_mask=bm, kernel_options=TRITON)
        ref, _, _ = math_attention(q.double(), k.double(), v.double(), None, bm)
        low, _, _ = math_attention(q, k, v, None, bm)
        assert_close_to_reference(out, ref, low, torch.float32, "out")
        return out

    first = check()
    with slow_prints() as calls:
        check()
        assert calls == []
        chosen_keys = torch.arange(40) % 3 == 1  # rebinds the cell of a mod inside the tuple
        assert (check() - first).abs().max() > 1e-3
        assert len(calls) == 1


class _ModuleMods(torch.nn.Module):
    """Mods written as methods of a module, reading its attributes (a switch from torch's
    flex_attention keeps them: it calls whatever callable it is given)."""

    def __init__(self, L: int):
        super().__init__()
        self.table = torch.nn.Parameter(torch.randn(2, 2 * L) * 0.5)
        self.cap = 20.0
        self.window = 9
        self.L = L

    def score_mod(self, score, b, h, q_idx, kv_idx):
        return self.cap * torch.tanh((score + self.table[h, kv_idx - q_idx + self.L]) / self.cap)

    def mask_mod(self, b, h, q_idx, kv_idx):
        return (q_idx - kv_idx < self.window) & (kv_idx <= q_idx)


class _CallableScore:
    def __init__(self, slope: float):
        self.slope = slope

    def __call__(self, score, b, h, q_idx, kv_idx):
        return score + self.slope * (kv_idx - q_idx)


def test_mods_as_bound_methods_and_callable_objects():
    from inductor_flex import create_block_mask

    L = 37
    q, k, v = make_inputs((1, 2, 2, L, L, 16, 16), torch.float32, "cpu")
    m = _ModuleMods(L)
    bm = create_block_mask(m.mask_mod, None, None, L, L, device="cpu", BLOCK_SIZE=16)
    for score_mod in (m.score_mod, _CallableScore(0.25)):
        out = flex_attention(q, k, v, score_mod=score_mod, block_mask=bm, kernel_options=TRITON)
        ref, _, _ = math_attention(q.double(), k.double(), v.double(), score_mod, bm)
        low, _, _ = math_attention(q, k, v, score_mod, bm)
        assert_close_to_reference(out, ref, low, torch.float32, "out")


class _CallableMods(_ModuleMods):
    def __call__(self, score, b, h, q_idx, kv_idx):
        return self.score_mod(score, b, h, q_idx, kv_idx)


@pytest.mark.parametrize("form", ["bound_method", "callable_object"])
def test_method_mod_takes_the_fast_path_and_sees_a_rebound_attribute(form):
    # self.score_mod is a new bound object at every access: the plan cache finds it again by its
    # function and instance, its print is reused without running it, and a rebound attribute (a new
    # tensor, a new scalar) reprints it; a callable object's __call__ is such a method
    from inductor_flex import kernel as K

    L = 29
    q, k, v = make_inputs((1, 2, 2, L, L, 16, 16), torch.float32, "cpu")
    m = _CallableMods(L)

    def check():
        mod = m.score_mod if form == "bound_method" else m
        out = flex_attention(q, k, v, score_mod=mod, kernel_options=TRITON)
        ref, _, _ = math_attention(q.double(), k.double(), v.double(), mod)
        assert (out.double() - ref).abs().max() < 1e-5
        return out

    first = check()
    plans = len(K._plans)
    with slow_prints() as calls:
        check()
        assert calls == [] and len(K._plans) == plans
        m.table = torch.nn.Parameter(torch.randn(2, 2 * L) * 2.0)
        second = check()
        assert (second - first).abs().max() > 1e-3
        m.cap = 2.0
        assert (check() - second).abs().max() > 1e-3
        assert len(calls) == 2


class _SoftcapModule(torch.nn.Module):
    def __init__(self, L: int):
        super().__init__()
        self.bias = torch.nn.Parameter(torch.randn(L))
        self.cap = 20.0

    def forward(self, score, b, h, q_idx, kv_idx):
        return self.cap * torch.tanh((score + self.bias[kv_idx]) / self.cap)


def test_module_called_as_a_mod_sees_a_changed_number():
    # an nn.Module passed as the score_mod is called through Module.__call__, which hands self to
    # its hooks: what it reaches cannot be walked, so it is printed at every call, and a changed
    # number (baked into the print) is seen
    L = 29
    q, k, v = make_inputs((1, 2, 2, L, L, 16, 16), torch.float32, "cpu")
    m = _SoftcapModule(L)
    outs = []
    with pytest.warns(UserWarning, match="traced again at every eager call"):
        flex_attention(q, k, v, score_mod=m, kernel_options=TRITON)
    for cap in (20.0, 20.0, 1.0):
        m.cap = cap
        out = flex_attention(q, k, v, score_mod=m, kernel_options=TRITON)
        ref, _, _ = math_attention(q.double(), k.double(), v.double(), m)
        assert (out.double() - ref).abs().max() < 1e-5
        outs.append(out)
    assert torch.equal(outs[0], outs[1]) and (outs[2] - outs[1]).abs().max() > 1e-2


def test_slow_path_print_sees_a_changed_global_scalar():
    # a mod that reaches an opaque object is run at every call to find its tensors; its cached
    # print must still be keyed by the scalars it reads (here a module global through a helper)
    q, k, v = make_inputs((1, 1, 1, 17, 17, 16, 16), torch.float32, "cpu")

    class Opaque:
        pass

    box = Opaque()
    box.w = torch.ones(17)
    _GLOBAL_SCALE[0] = 1.0

    def helper(x):
        return x * _GLOBAL_SCALE[0]

    def mod(score, b, h, q_idx, kv_idx):
        return helper(score) + box.w[kv_idx]

    outs = []
    for scale in (1.0, 3.0):
        _GLOBAL_SCALE[0] = scale
        out = flex_attention(q, k, v, score_mod=mod, kernel_options=TRITON)
        ref, _, _ = math_attention(q.double(), k.double(), v.double(), mod)
        assert (out.double() - ref).abs().max() < 1e-5
        outs.append(out)
    assert (outs[0] - outs[1]).abs().max() > 1e-3


_GLOBAL_SCALE = [1.0]


def test_slow_path_print_sees_numbers_a_helper_reads_off_a_passed_object():
    # the mod hands an object to a helper that reads cfg.scale and cfg.inner.shift: names only the
    # helper's code holds, one of them a level down; a changed number must reprint the mod
    q, k, v = make_inputs((1, 1, 1, 19, 19, 16, 16), torch.float32, "cpu")

    class Box:
        pass

    cfg, cfg.inner = Box(), Box()
    cfg.scale, cfg.inner.shift, cfg.w = 1.0, 0.0, torch.randn(19)

    def helper(c, score, kv_idx):
        return score * c.scale + c.w[kv_idx] + c.inner.shift * kv_idx

    def mod(score, b, h, q_idx, kv_idx):
        return helper(cfg, score, kv_idx)

    outs = []
    for scale, shift in ((1.0, 0.0), (0.1, 0.0), (0.1, 0.2)):
        cfg.scale, cfg.inner.shift = scale, shift
        out = flex_attention(q, k, v, score_mod=mod, kernel_options=TRITON)
        ref, _, _ = math_attention(q.double(), k.double(), v.double(), mod)
        assert (out.double() - ref).abs().max() < 1e-5
        outs.append(out)
    assert (outs[0] - outs[1]).abs().max() > 1e-3 and (outs[1] - outs[2]).abs().max() > 1e-3


def test_printed_mask_loads_each_captured_value_once():
    """The printer reuses repeated expressions: a document mask reads ids[q_idx] and ids[kv_idx]
    once each (the traced graph indexes them twice), and the never-negative q_idx / kv_idx index
    without a wrap-around."""
    from inductor_flex.printer import print_mod
    from inductor_flex.variants import generate_causal_mask, generate_doc_mask_mod

    ids = torch.tensor([0] * 7 + [1] * 9 + [2] * 17, dtype=torch.int32)
    mask_mod = generate_doc_mask_mod(generate_causal_mask(), ids)
    src = print_mod(mask_mod, "mask_mod", torch.device("cpu")).source
    assert src.count("tl.load(") == 4, src  # ids[q], ids[kv], offsets[ids[q]], offsets[ids[kv]]
    assert "q_idx < 0" not in src and "kv_idx < 0" not in src, src
    q, k, v = make_inputs((1, 2, 2, 33, 33, 16, 16), torch.float32, "cpu")
    from inductor_flex import create_block_mask

    bm = create_block_mask(mask_mod, None, None, 33, 33, device="cpu", BLOCK_SIZE=16)
    out = flex_attention(q, k, v, block_mask=bm, kernel_options=TRITON)
    ref, _, _ = math_attention(q.double(), k.double(), v.double(), None, bm)
    low, _, _ = math_attention(q, k, v, None, bm)
    assert_close_to_reference(out, ref, low, torch.float32, "out")


@pytest.mark.parametrize("scale", [-0.5, 0.0, 0.3], ids=["negative", "zero", "positive"])
@pytest.mark.parametrize("variant", ["noop", "causal", "empty_rows"])
def test_any_scale(variant, scale):
    # without a score_mod the kernel folds a positive scale into the softmax's exp2 argument; zero and
    # negative scales take the score_mod path instead, and masked rows stay 0 / -inf either way
    shape = SHAPES["Lq50_Lkv97"]
    B, Hq, Hkv, Lq, Lkv, E, Ev = shape
    q, k, v = make_inputs(shape, torch.float32, "cpu")
    score_mod, block_mask = make_variant(variant, Lq, Lkv, Hq, "cpu")
    out, lse = flex_attention(q, k, v, score_mod=score_mod, block_mask=block_mask, scale=scale, return_lse=True,
                              kernel_options=TRITON)
    ref_out, ref_lse, _ = math_attention(q.double(), k.double(), v.double(), score_mod, block_mask, scale)
    low_out, low_lse, _ = math_attention(q, k, v, score_mod, block_mask, scale)
    assert_close_to_reference(out, ref_out, low_out, torch.float32, "out")
    assert_close_to_reference(lse, ref_lse, low_lse, torch.float32, "lse")


# ---- the kernels walk a BlockMask refined to 64 x 64 blocks when that saves work (kernel.py _refined)
@pytest.mark.parametrize("shape", [(2, 4, 2, 300, 300, 40, 24), (1, 2, 2, 200, 330, 32, 32)],
                         ids=["gqa_300_e40_ev24", "200x330"])
def test_refined_block_mask_forward(shape):
    from inductor_flex import create_block_mask
    from inductor_flex.kernel import cached_plan
    from inductor_flex.validation import validate_kernel_options

    B, Hq, Hkv, Lq, Lkv, E, Ev = shape
    _, mm = packed_documents(max(Lq, Lkv), [23, 60, 61, 150, 290])
    bm = create_block_mask(mm, None, None, Lq, Lkv, device="cpu", BLOCK_SIZE=128)
    q, k, v = make_inputs(shape, torch.float32, "cpu")
    out, lse = flex_attention(q, k, v, block_mask=bm, enable_gqa=Hq != Hkv, return_lse=True, kernel_options=TRITON)
    plan = cached_plan(q, k, v, None, bm, None, validate_kernel_options(TRITON))
    assert plan.block_mask.BLOCK_SIZE == (64, 64), "short documents should take the refined mask"
    ref_out, ref_lse, _ = math_attention(q.double(), k.double(), v.double(), None, bm)
    low_out, low_lse, _ = math_attention(q, k, v, None, bm)
    assert_close_to_reference(out, ref_out, low_out, torch.float32, "out")
    assert_close_to_reference(lse, ref_lse, low_lse, torch.float32, "lse")


def test_refined_block_mask_follows_an_in_place_change_of_the_mask_tensor():
    from inductor_flex import BlockMask

    L = 256
    ids, mm = packed_documents(L, [40, 100, 170])
    # every block listed as partial: the coarse mask stays right whatever the documents are
    n = L // 128
    bm = BlockMask.from_kv_blocks(torch.full((1, 1, n), n, dtype=torch.int32),
                                  torch.arange(n, dtype=torch.int32).expand(1, 1, n, n), BLOCK_SIZE=128, mask_mod=mm)
    q, k, v = make_inputs((1, 2, 2, L, L, 32, 32), torch.float32, "cpu")
    flex_attention(q, k, v, block_mask=bm, kernel_options=TRITON)
    ids.zero_()  # one document now: tiles the first refinement found empty are needed
    ids[200:] = 1
    out = flex_attention(q, k, v, block_mask=bm, kernel_options=TRITON)
    ref_out, _, _ = math_attention(q.double(), k.double(), v.double(), None, bm)
    low_out, _, _ = math_attention(q, k, v, None, bm)
    assert_close_to_reference(out, ref_out, low_out, torch.float32, "out")


@pytest.mark.parametrize("flag", [True, False, None], ids=["on", "off", "auto"])
def test_refine_block_mask_option(flag):
    from inductor_flex import create_block_mask
    from inductor_flex.kernel import cached_plan
    from inductor_flex.validation import validate_kernel_options
    from inductor_flex.variants import generate_causal_mask

    # causal S=1024: refining saves 5.6% of the area, less than the automatic threshold asks
    bm = create_block_mask(generate_causal_mask(), None, None, 1024, 1024, device="cpu", BLOCK_SIZE=128)
    q = torch.randn(1, 1, 1024, 16)
    opts = dict(TRITON) if flag is None else {**TRITON, "REFINE_BLOCK_MASK": flag}
    plan = cached_plan(q, q, q, None, bm, None, validate_kernel_options(opts))
    assert plan.block_mask.BLOCK_SIZE == ((64, 64) if flag else (128, 128))


def test_refinement_skipped_when_a_broadcast_mask_reads_the_head():
    from inductor_flex import create_block_mask
    from inductor_flex.kernel import cached_plan
    from inductor_flex.validation import validate_kernel_options

    def every_other_head_short(b, h, q_idx, kv_idx):
        return (q_idx >= kv_idx) & ((h % 2 == 0) | (q_idx - kv_idx < 10))

    # built for h = 0 and broadcast over 2 heads: head 1's mask is narrower than the blocks say
    bm = create_block_mask(every_other_head_short, None, None, 256, 256, device="cpu", BLOCK_SIZE=128)
    q, k, v = make_inputs((1, 2, 2, 256, 256, 16, 16), torch.float32, "cpu")
    opts = {**TRITON, "REFINE_BLOCK_MASK": True}
    plan = cached_plan(q, k, v, None, bm, None, validate_kernel_options(opts))
    assert plan.block_mask.BLOCK_SIZE == (128, 128)
    out = flex_attention(q, k, v, block_mask=bm, kernel_options=opts)
    ref_out, _, _ = math_attention(q.double(), k.double(), v.double(), None, bm)
    low_out, _, _ = math_attention(q, k, v, None, bm)
    assert_close_to_reference(out, ref_out, low_out, torch.float32, "out")


def test_refine_block_mask_true_needs_blocks_of_64():
    from inductor_flex import create_block_mask
    from inductor_flex.variants import generate_causal_mask

    bm = create_block_mask(generate_causal_mask(), None, None, 96, 96, device="cpu", BLOCK_SIZE=32)
    q = torch.randn(1, 1, 96, 16)
    with pytest.raises(ValueError, match="REFINE_BLOCK_MASK=True needs a BlockMask whose block sizes are multiples of 64"):
        flex_attention(q, q, q, block_mask=bm, kernel_options={**TRITON, "REFINE_BLOCK_MASK": True})


# ---- layout specialization (kernel.py _specialize_layout): strides and lengths as constexprs
def test_first_layout_gets_specialized_kernels_and_others_the_generic_ones(monkeypatch):
    from inductor_flex import kernel as K
    from inductor_flex.backward import BackwardPlan
    from inductor_flex.kernel import cached_plan
    from inductor_flex.validation import validate_kernel_options
    from conftest import assert_grads_close

    def halve(score, b, h, q_idx, kv_idx):  # a mod of its own: its first layout is this test's
        return score * 0.5 + (q_idx - kv_idx) * 0.01

    # (the interpreter is free of the GPU's reasons for these floors)
    monkeypatch.setattr(K, "SPECIALIZE_MIN_LEN", 16)
    monkeypatch.setattr(K, "SPECIALIZE_MIN_WORK", 0)

    specialized = {}
    for name, shape in (("first", (1, 2, 2, 37, 45, 32, 24)), ("second", (2, 2, 1, 50, 29, 32, 24)),
                        ("first_again", (1, 2, 2, 37, 45, 32, 24))):
        B, Hq, Hkv, Lq, Lkv, E, Ev = shape
        q, k, v = make_inputs(shape, torch.float32, "cpu", requires_grad=True)
        out = flex_attention(q, k, v, score_mod=halve, enable_gqa=Hq != Hkv, kernel_options=TRITON)
        g = torch.randn_like(out)
        grads = torch.autograd.grad(out, (q, k, v), g)
        plan = cached_plan(q, k, v, halve, None, None, validate_kernel_options(TRITON))
        bsource = BackwardPlan(plan, halve, (), plan.opts).source
        specialized[name] = plan.specialized
        for source in (plan.source, bsource):
            assert ("Q_LEN: tl.constexpr" in source) == plan.specialized
            assert ("stride_qm: tl.constexpr" in source) == plan.specialized
        ref, _, _ = math_attention(q.detach().double(), k.detach().double(), v.detach().double(), halve, None)
        low, _, _ = math_attention(q.detach(), k.detach(), v.detach(), halve, None)
        assert_close_to_reference(out.detach(), ref, low, torch.float32, name)
        assert_grads_close(q, k, v, grads, g, halve, None, torch.float32)
    assert specialized == {"first": True, "second": False, "first_again": True}


@pytest.mark.parametrize("flag", [False, True], ids=["off", "on"])
def test_specialize_layout_option(flag, monkeypatch):
    from inductor_flex import kernel as K
    from inductor_flex.kernel import cached_plan
    from inductor_flex.validation import validate_kernel_options

    monkeypatch.setattr(K, "SPECIALIZE_MIN_LEN", 16)
    monkeypatch.setattr(K, "SPECIALIZE_MIN_WORK", 0)

    def third(score, b, h, q_idx, kv_idx):
        return score / 3.0

    opts = {**TRITON, "SPECIALIZE_LAYOUT": flag}
    for L in (33, 40):  # the first layout and another one: the option decides both
        q, k, v = make_inputs((1, 2, 2, L, L, 16, 16), torch.float32, "cpu")
        out = flex_attention(q, k, v, score_mod=third, kernel_options=opts)
        assert cached_plan(q, k, v, third, None, None, validate_kernel_options(opts)).specialized is flag
        ref, _, _ = math_attention(q.double(), k.double(), v.double(), third, None)
        low, _, _ = math_attention(q, k, v, third, None)
        assert_close_to_reference(out, ref, low, torch.float32)


def test_short_sequences_keep_the_generic_kernels():
    from inductor_flex.kernel import SPECIALIZE_MIN_LEN, cached_plan
    from inductor_flex.validation import validate_kernel_options

    opts = validate_kernel_options({**TRITON, "SPECIALIZE_LAYOUT": True})
    q, k, v = make_inputs((1, 1, 1, SPECIALIZE_MIN_LEN - 1, SPECIALIZE_MIN_LEN, 16, 16), torch.float32, "cpu")
    plan = cached_plan(q, k, v, None, None, None, opts)
    assert not plan.specialized and "Q_LEN: tl.constexpr" not in plan.source


@pytest.mark.parametrize("min_work,want", [(None, False), (0, True)], ids=["little_work", "enough_work"])
def test_default_specializes_only_calls_with_enough_work(monkeypatch, min_work, want):
    # by default the first layout is specialized only when the call visits SPECIALIZE_MIN_WORK pairs:
    # 2 x 600 x 600 causal pairs (whole 128-blocks) are far below the default floor
    from inductor_flex import create_block_mask
    from inductor_flex import kernel as K
    from inductor_flex.validation import validate_kernel_options
    from inductor_flex.variants import generate_causal_mask

    default_floor = K.SPECIALIZE_MIN_WORK
    if min_work is not None:
        monkeypatch.setattr(K, "SPECIALIZE_MIN_WORK", min_work)

    def quarter(score, b, h, q_idx, kv_idx):  # its own mods: a fresh first layout
        return score * 0.25

    bm = create_block_mask(generate_causal_mask(), None, None, 600, 600, device="cpu")
    q = torch.empty(1, 2, 600, 16)
    blocks = int(bm.kv_num_blocks.sum()) + int(bm.full_kv_num_blocks.sum())
    assert K._visited_pairs(bm, 1, 2) == 2 * blocks * 128 * 128 < default_floor
    plan = K.cached_plan(q, q, q, quarter, bm, None, validate_kernel_options(TRITON))
    assert plan.specialized is want


def test_visited_block_count_is_read_once_per_block_mask():
    # the count costs a device sync on the GPU: plans for other batch sizes reuse the first read
    from inductor_flex import create_block_mask
    from inductor_flex import kernel as K
    from inductor_flex.variants import generate_causal_mask

    bm = create_block_mask(generate_causal_mask(), None, None, 600, 600, device="cpu")
    pairs = K._visited_pairs(bm, 1, 2)
    bm.full_kv_num_blocks = torch.zeros_like(bm.full_kv_num_blocks)  # a second read would count less
    assert K._visited_pairs(bm, 3, 2) == 3 * pairs


def test_fastest_config_times_the_best_two_again(monkeypatch):
    # the first pass is one timing per candidate; the best two are timed again in turn and decide
    import triton.testing

    from inductor_flex.kernel import fastest_config
    from inductor_flex.lowering.configs import Config

    a, b, c, broken = (Config(64, 64, 4, s) for s in (1, 2, 3, 4))
    first = {a: 1.0, b: 1.1, c: 1.3}
    again = {a: [1.2, 1.05, 1.2], b: [1.0, 1.0, 1.1]}
    calls = []

    def launch(cfg):
        if cfg is broken:
            raise RuntimeError("out of resources")
        calls.append(cfg)

    def do_bench(fn, warmup, rep, return_mode):
        assert return_mode == "median"
        fn()
        cfg = calls[-1]
        seen = calls.count(cfg)
        return first[cfg] if seen == 1 else again[cfg][seen - 2]

    monkeypatch.setattr(triton.testing, "do_bench", do_bench)
    best, ms = fastest_config([a, broken, b, c], launch, "forward")
    assert best == b and ms == 1.0
    assert calls.count(c) == 1 and calls.count(a) == 4  # c was never in the top two


@pytest.mark.parametrize("kv_runs", [True, False], ids=["runs", "index_lists"])
@pytest.mark.parametrize("lengths", [(150, 230), (230, 150)], ids=["Lq150_Lkv230", "Lq230_Lkv150"])
@pytest.mark.parametrize("variant", RUN_WALK_VARIANTS)
def test_block_mask_runs_walk(variant, lengths, kv_runs):
    """A BlockMask whose partial and full kv blocks are one run each is walked from the runs' first
    blocks in one loop, full run first (template RUNS). Where only the two lists together are one
    run (a wide window, documents: partial blocks at both ends of the full ones) the loop walks that
    run from its first block with mask_mod on the tiles outside the row's full run (MASK_ON_FULL),
    or on every tile where a row's full blocks are no run (a partial block between full ones).
    kernel_options KV_RUNS=False walks the index lists. All against the float64 reference; the
    kernel took the path it should."""
    from inductor_flex import create_block_mask
    from inductor_flex import kernel as K
    from inductor_flex.validation import validate_kernel_options

    Lq, Lkv = lengths
    q, k, v = make_inputs((1, 4, 2, Lq, Lkv, 40, 24), torch.float16, "cpu")
    mask_mod = run_walk_mask_mod(variant, max(Lq, Lkv))
    block_mask = create_block_mask(mask_mod, None, None, Lq, Lkv, device="cpu", BLOCK_SIZE=32)
    assert block_mask._union_kv and block_mask.full_from_mask_mod
    one_list_each = RUN_WALK_VARIANTS.index(variant) < 3
    assert block_mask._runs_kv == one_list_each
    opts = {**TRITON, "KV_RUNS": kv_runs}
    out, lse = flex_attention(q, k, v, block_mask=block_mask, enable_gqa=True, return_lse=True, kernel_options=opts)
    plan = K.cached_plan(q, k, v, None, block_mask, None, validate_kernel_options(dict(opts)))
    consts = K.forward_launch(plan, q, k, v, out, lse, lse, plan.candidates[0])[2]
    assert consts["RUNS"] == kv_runs
    assert consts["MASK_ON_FULL"] == (kv_runs and not one_list_each)
    ref_out, ref_lse, _ = math_attention(q.double(), k.double(), v.double(), None, block_mask)
    low_out, low_lse, _ = math_attention(q, k, v, None, block_mask)
    assert not torch.isnan(out).any()
    assert_close_to_reference(out, ref_out, low_out, torch.float16, "out")
    assert_close_to_reference(lse, ref_lse, low_lse, torch.float16, "lse")
    if variant == "causal_offset_rows":
        assert (out[:, :, :60] == 0).all() and (lse[:, :, :60] == float("-inf")).all()


def test_block_mask_runs_walk_keeps_mask_mod_off_blocks_declared_full():
    """Lists given by hand that call every block full under a causal mask_mod: full blocks skip
    mask_mod, so the runs walk masks nothing, as the reference (and the index-list walk) say."""
    from inductor_flex import BlockMask
    from inductor_flex import variants as V

    Lq, Lkv = 70, 90
    q, k, v = make_inputs((1, 2, 2, Lq, Lkv, 16, 16), torch.float16, "cpu")
    nq, nk = -(-Lq // 32), -(-Lkv // 32)
    every = torch.arange(nk, dtype=torch.int32).expand(1, 1, nq, nk).contiguous()
    none = torch.zeros(1, 1, nq, dtype=torch.int32)
    bm = BlockMask.from_kv_blocks(none, every, none + nk, every, BLOCK_SIZE=32, mask_mod=V.generate_causal_mask(),
                                  seq_lengths=(Lq, Lkv))
    ref_out, ref_lse, _ = math_attention(q.double(), k.double(), v.double())  # nothing masked
    low_out, low_lse, _ = math_attention(q, k, v)
    for runs in (True, False):
        out, lse = flex_attention(q, k, v, block_mask=bm, return_lse=True, kernel_options={**TRITON, "KV_RUNS": runs})
        assert_close_to_reference(out, ref_out, low_out, torch.float16, "out")
        assert_close_to_reference(lse, ref_lse, low_lse, torch.float16, "lse")
