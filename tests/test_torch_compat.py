"""Code written for torch.nn.attention.flex_attention runs after the import switch: PyTorch's
kernel_options keys (with their fwd_ / bwd_ prefixes), create_block_mask's arguments and the
BlockMask methods decode loops use (numel, _adjust). PyTorch's own module is imported here only to
compare against."""
import inspect

import pytest
import torch

from inductor_flex import FlexKernelOptions, create_block_mask, flex_attention
from inductor_flex import decode as D
from inductor_flex.backward import Config, _pinned
from inductor_flex.reference import math_attention
from inductor_flex.validation import COMPAT_KERNEL_OPTIONS, KNOWN_KERNEL_OPTIONS, validate_kernel_options
from inductor_flex.variants import generate_causal_mask, generate_doc_mask_mod, generate_sliding_window

from cases import make_inputs
from conftest import assert_close_to_reference

torch_flex = pytest.importorskip("torch.nn.attention.flex_attention")


def _torch_option_keys():
    return sorted(getattr(torch_flex, "FlexKernelOptions").__annotations__)


def _value_for(key):
    want = {**KNOWN_KERNEL_OPTIONS, **COMPAT_KERNEL_OPTIONS}[key]
    return {"BACKEND": "AUTO", "BLOCK_M": 16, "BLOCK_N": 16, "BLOCK_M1": 16, "BLOCK_N1": 16, "BLOCK_M2": 16,
            "BLOCK_N2": 16}.get(key, True if want is bool else 2)


def test_flex_kernel_options_lists_every_key_we_accept():
    assert set(FlexKernelOptions.__annotations__) == set(KNOWN_KERNEL_OPTIONS) | set(COMPAT_KERNEL_OPTIONS)


@pytest.mark.parametrize("key", _torch_option_keys())
def test_every_torch_kernel_option_is_accepted(key):
    # the math path on CPU: the options are validated, and the answer does not move
    q, k, v = (torch.randn(1, 2, 40, 16) for _ in range(3))
    bm = create_block_mask(generate_causal_mask(), None, None, 40, 40, device="cpu", BLOCK_SIZE=16)
    base = flex_attention(q, k, v, block_mask=bm)
    out = flex_attention(q, k, v, block_mask=bm, kernel_options={key: _value_for(key)})
    assert torch.equal(out, base)


@pytest.mark.parametrize("opts, expected", [
    ({"fwd_BLOCK_M": 32, "BLOCK_M": 64}, {"BLOCK_M": 32}),
    ({"bwd_BLOCK_M1": 32, "bwd_FUSED_DQ": True}, {"BLOCK_M1": 32, "FUSED_DQ": True}),
    ({"num_warps": 4}, {"num_warps": 4, "_BWD_NUM_WARPS": 4}),
    ({"fwd_num_warps": 8}, {"num_warps": 8, "_BWD_NUM_WARPS": 0}),
    ({"bwd_num_stages": 2}, {"_BWD_NUM_STAGES": 2}),
    ({"num_warps": 4, "bwd_num_warps": 8, "fwd_num_stages": 3}, {"num_warps": 4, "_BWD_NUM_WARPS": 8,
                                                                 "num_stages": 3, "_BWD_NUM_STAGES": 0}),
    ({"fwd_PRESCALE_QK": True}, {"PRESCALE_QK": True}),
], ids=["fwd_wins", "bwd_only_keys", "plain_warps_both", "fwd_warps_only", "bwd_stages_only", "mixed", "compat"])
def test_pass_prefixes_resolve_to_one_key_per_setting(opts, expected):
    got = validate_kernel_options(opts)
    assert {k: v for k, v in got.items() if k != "BACKEND"} == expected


@pytest.mark.parametrize("opts, warps", [
    ({"BLOCK_M1": 32, "fwd_num_warps": 2}, 8), ({"BLOCK_M1": 32, "num_warps": 2}, 2),
    ({"BLOCK_M1": 32, "num_warps": 2, "bwd_num_warps": 4}, 4),
], ids=["fwd_only_stays_out", "plain_reaches_backward", "bwd_wins"])
def test_backward_config_takes_its_own_launch_values(opts, warps):
    default = Config(64, 64, 8, 3)
    cfg = _pinned(validate_kernel_options(opts), "BLOCK_M1", "BLOCK_N1", default)
    assert (cfg.BLOCK_M, cfg.num_warps, cfg.num_stages) == (32, warps, 3)


@pytest.mark.parametrize("opts, text", [
    ({"bwd_BLOCK_M": 32}, "read by the forward only"),
    ({"fwd_BLOCK_N2": 32}, "read by the backward only"),
    ({"fwd_FAST_TANH": True}, "without the fwd_ prefix"),
    ({"bwd_BLOK_M1": 32}, "unknown key 'bwd_BLOK_M1'"),
    ({"BACKEND": "FLASH"}, "CuteDSL"),
    ({"BACKEND": "TRITON", "FORCE_USE_FLEX_ATTENTION": True}, "cannot be combined"),
    ({"ROWS_GUARANTEED_SAFE": 1}, "must be a bool"),
    ({"waves_per_eu": 0}, "positive int"),
], ids=["bwd_forward_key", "fwd_backward_key", "shared_key", "typo", "flash", "force_and_backend", "hint_type",
        "rocm_int"])
def test_bad_torch_style_options_name_the_key(opts, text):
    q, k, v = (torch.randn(1, 1, 8, 8) for _ in range(3))
    with pytest.raises(ValueError, match=text):
        flex_attention(q, k, v, kernel_options=opts)


def test_force_use_flex_attention_keeps_short_queries_off_the_decode_kernel():
    # what AUTO does with CUDA tensors, here on CPU tensors in the interpreter
    from inductor_flex.kernel import kernel_attention

    q, k, v = make_inputs((1, 4, 2, 3, 70, 16, 16), torch.float32, "cpu")
    with torch.no_grad():
        for force, new_plans in ((True, 0), (False, 1)):
            opts = validate_kernel_options({"FORCE_USE_FLEX_ATTENTION": force})
            opts["BACKEND"] = "TRITON"
            before = D.stats["plans"] + D.stats["plan_hits"]
            out, lse, _ = kernel_attention(q, k, v, None, None, None, opts)
            assert D.stats["plans"] + D.stats["plan_hits"] == before + new_plans
            ref_out, ref_lse, _ = math_attention(q.double(), k.double(), v.double(), None, None)
            low_out, low_lse, _ = math_attention(q, k, v, None, None)
            assert_close_to_reference(out, ref_out, low_out, q.dtype, "out")
            assert_close_to_reference(lse, ref_lse, low_lse, q.dtype, "lse")


def test_force_use_flex_attention_keeps_compiled_short_queries_off_the_decode_op():
    from inductor_flex.lowering.decode import try_decode_forward

    q, k, v = make_inputs((1, 4, 2, 1, 70, 16, 16), torch.float32, "cpu")
    opts = validate_kernel_options({"FORCE_USE_FLEX_ATTENTION": True})
    assert try_decode_forward(q, k, v, None, (None,) * 12, None, opts, (), ()) is None


@pytest.mark.parametrize("name", ["flex_attention", "create_block_mask", "create_mask", "and_masks", "or_masks",
                                  "BlockMask.from_kv_blocks", "BlockMask.to_string", "BlockMask._adjust",
                                  "BlockMask.numel", "BlockMask.to", "BlockMask.sparsity", "BlockMask.to_dense"])
def test_every_torch_argument_name_is_taken(name):
    import inductor_flex

    def resolve(mod):
        obj = mod
        for part in name.split("."):
            obj = getattr(obj, part)
        return inspect.signature(obj).parameters

    theirs = resolve(torch_flex)
    ours = resolve(inductor_flex)
    assert [p for p in theirs if p not in ours] == []


def test_device_none_takes_the_default_device():
    bm = create_block_mask(generate_causal_mask(), None, None, 64, 64, device=None)
    assert bm.device.type == ("cuda" if torch.cuda.is_available() else "cpu")
    from inductor_flex import create_mask

    assert create_mask(generate_causal_mask(), None, None, 8, 8, device=None).device == bm.device


def test_from_kv_blocks_takes_torchs_extra_arguments():
    ref = create_block_mask(generate_causal_mask(), None, None, 256, 256, device="cpu")
    bm = type(ref).from_kv_blocks(ref.kv_num_blocks, ref.kv_indices, ref.full_kv_num_blocks, ref.full_kv_indices,
                                  compute_q_blocks=False, dq_write_order=None, dq_kv_order=True)
    assert torch.equal(bm.q_num_blocks, ref.q_num_blocks) and torch.equal(bm.to_dense(), ref.to_dense())
    with pytest.raises(ValueError, match="compute_q_blocks must be a bool"):
        type(ref).from_kv_blocks(ref.kv_num_blocks, ref.kv_indices, compute_q_blocks=1)


def test_to_string_takes_an_int_grid_and_a_slice_limit():
    bm = create_block_mask(lambda b, h, q, kv: (q >= kv) | (h == 1), 1, 3, 512, 512, device="cpu")
    one = bm.to_string(grid_size=4)
    assert one.count("|\n") + 1 == 4 and "(b=0, h=0)" in one
    many = bm.to_string(limit=2)
    assert "(b=0, h=0)" in many and "(b=0, h=1)" in many and "(b=0, h=2)" not in many
    assert many.split("\n\n")[1] == bm.to_string(b=0, h=1)
    with pytest.raises(ValueError, match="limit must be a positive int"):
        bm.to_string(limit=0)


@pytest.mark.parametrize("mask", ["causal", "sliding_window", "document"])
def test_separate_full_blocks_false_lists_every_block_as_partial(mask):
    mod = {"causal": generate_causal_mask(), "sliding_window": generate_sliding_window(100),
           "document": generate_doc_mask_mod(generate_causal_mask(), torch.tensor([0] * 70 + [1] * 60 + [2] * 70))}[mask]
    S = 200
    split = create_block_mask(mod, None, None, S, S, device="cpu", BLOCK_SIZE=32)
    whole = create_block_mask(mod, None, None, S, S, device="cpu", BLOCK_SIZE=32, separate_full_blocks=False)
    assert split.full_blocks().any()  # the comparison means something: this mask has full blocks
    assert whole.full_kv_num_blocks is None and whole.full_q_num_blocks is None
    assert torch.equal(whole.partial_blocks(), split.partial_blocks() | split.full_blocks())
    assert whole.refined is None and not whole.separate_full_blocks
    mirror = torch_flex.create_block_mask(mod, None, None, S, S, device="cpu", BLOCK_SIZE=32,
                                          separate_full_blocks=False) \
        if "separate_full_blocks" in inspect.signature(torch_flex.create_block_mask).parameters else None
    if mirror is not None:
        assert mirror.full_kv_num_blocks is None
        assert torch.equal(mirror.kv_num_blocks, whole.kv_num_blocks)
    q, k, v = make_inputs((1, 2, 2, S, S, 16, 16), torch.float32, "cpu")
    out = flex_attention(q, k, v, block_mask=whole, kernel_options={"BACKEND": "TRITON"})
    ref = math_attention(q.double(), k.double(), v.double(), None, split)[0]
    low = math_attention(q, k, v, None, split)[0]
    assert_close_to_reference(out, ref, low, q.dtype, "out")


@pytest.mark.parametrize("arg", ["separate_full_blocks", "compute_dq_write_order", "dq_kv_order"])
def test_create_block_mask_flags_must_be_bools(arg):
    with pytest.raises(ValueError, match=f"{arg} must be a bool"):
        create_block_mask(generate_causal_mask(), None, None, 64, 64, device="cpu", **{arg: 1})


@pytest.mark.parametrize("B, H, Lq, Lkv", [(2, 3, 500, 300), (None, None, 128, 1000)])
def test_numel_is_torchs(B, H, Lq, Lkv):
    ours = create_block_mask(generate_causal_mask(), B, H, Lq, Lkv, device="cpu")
    theirs = torch_flex.create_block_mask(generate_causal_mask(), B, H, Lq, Lkv, device="cpu")
    assert ours.numel() == theirs.numel() == (B or 1) * (H or 1) * Lq * Lkv


@pytest.mark.parametrize("new", [(256, 256), (130, 77), (1, 1000), (600, 1000)], ids=str)
@pytest.mark.parametrize("separate", [True, False], ids=["split", "whole"])
def test_adjust_crops_as_torch_does(new, separate):
    mod = generate_sliding_window(300)
    kw = {} if separate else {"separate_full_blocks": False}
    if not separate and "separate_full_blocks" not in inspect.signature(torch_flex.create_block_mask).parameters:
        pytest.skip("this torch's create_block_mask has no separate_full_blocks")  # ours is tested above
    ours = create_block_mask(mod, 2, 1, 600, 1000, device="cpu", **kw)._adjust(*new)
    theirs = torch_flex.create_block_mask(mod, 2, 1, 600, 1000, device="cpu", **kw)._adjust(*new)
    assert ours.shape == tuple(theirs.shape) and ours.seq_lengths == tuple(theirs.seq_lengths)

    def dense(num, idx, n):
        # PyTorch's cut lists may keep index columns past the new block count
        listed = (torch.arange(idx.shape[-1]) < num[..., None]) & (idx < n)
        hits = torch.zeros(*num.shape, n + 1, dtype=torch.int64)
        return hits.scatter_add_(-1, torch.where(listed, idx, n).long(), listed.long())[..., :n] > 0

    nk = ours.num_blocks[1]
    their_partial = dense(theirs.kv_num_blocks, theirs.kv_indices, nk)
    if separate:
        # the same blocks walked; a query block cut by the length can be full here (mask_mod holds on
        # all its valid rows) where PyTorch keeps it partial, never the other way round
        their_full = dense(theirs.full_kv_num_blocks, theirs.full_kv_indices, nk)
        assert torch.equal(ours.partial_blocks() | ours.full_blocks(), their_partial | their_full)
        assert not (their_full & ~ours.full_blocks()).any()
    else:
        assert torch.equal(ours.partial_blocks(), their_partial)
        assert ours.full_kv_num_blocks is None and theirs.full_kv_num_blocks is None


def test_adjust_gives_the_attention_of_the_shorter_call():
    # a mask built for the longest cache serves a shorter one; partial stays partial, so it is exact
    S, short_q, short_kv = 256, 100, 180
    mod = generate_causal_mask()
    big = create_block_mask(mod, None, None, S, S, device="cpu", BLOCK_SIZE=32)
    q, k, v = make_inputs((1, 2, 2, short_q, short_kv, 16, 16), torch.float32, "cpu")
    out = flex_attention(q, k, v, block_mask=big._adjust(short_q, short_kv), kernel_options={"BACKEND": "TRITON"})
    fresh = create_block_mask(mod, None, None, short_q, short_kv, device="cpu", BLOCK_SIZE=32)
    ref = math_attention(q.double(), k.double(), v.double(), None, fresh)[0]
    low = math_attention(q, k, v, None, fresh)[0]
    assert_close_to_reference(out, ref, low, q.dtype, "out")


@pytest.mark.parametrize("new", [(0, 10), (10, 2000), (True, 10)], ids=["zero", "longer", "bool"])
def test_adjust_rejects_lengths_it_has_no_blocks_for(new):
    bm = create_block_mask(generate_causal_mask(), None, None, 256, 256, device="cpu")
    with pytest.raises(ValueError, match="BlockMask._adjust"):
        bm._adjust(*new)


def test_torch_style_options_trace_under_torch_compile():
    # validate_kernel_options runs inside the traced function: the prefixes must trace too
    from conftest import compile_counter

    q, k, v = make_inputs((1, 2, 2, 48, 48, 16, 16), torch.float32, "cpu")
    bm = create_block_mask(generate_causal_mask(), None, None, 48, 48, device="cpu", BLOCK_SIZE=16)
    opts = {"fwd_BLOCK_M": 16, "bwd_num_warps": 4, "PRESCALE_QK": True, "FORCE_USE_FLEX_ATTENTION": True}
    cnt = compile_counter()
    fn = torch.compile(lambda q, k, v: flex_attention(q, k, v, block_mask=bm, kernel_options=opts), backend=cnt,
                       fullgraph=True)
    out = fn(q, k, v)
    assert cnt.frame_count == 1
    assert torch.allclose(out, flex_attention(q, k, v, block_mask=bm), atol=1e-5)


def test_mask_without_full_blocks_through_inductors_templates(interpreted_inductor):
    # separate_full_blocks=False: no full lists at all, forward and backward templates under Inductor
    from torch._inductor.utils import run_and_get_code
    from conftest import assert_grads_close, compile_counter

    S = 96
    mod = generate_sliding_window(70)
    bm = create_block_mask(mod, None, None, S, S, device="cpu", BLOCK_SIZE=32, separate_full_blocks=False)
    q, k, v = make_inputs((1, 2, 2, S, S, 16, 16), torch.float32, "cpu", requires_grad=True)
    cnt = compile_counter("inductor")
    fn = torch.compile(lambda q, k, v: flex_attention(q, k, v, block_mask=bm), backend=cnt, fullgraph=True)
    g = torch.randn(1, 2, S, 16)

    def step():
        out = fn(q, k, v)
        return (out, *torch.autograd.grad(out, (q, k, v), g))

    (out, *grads), code = run_and_get_code(step)
    assert "_attn_fwd_inner" in "\n".join(code) and "_bwd_dkdv_inner" in "\n".join(code)
    split = create_block_mask(mod, None, None, S, S, device="cpu", BLOCK_SIZE=32)
    assert split.full_blocks().any() and bm.full_kv_num_blocks is None
    ref = math_attention(q.detach().double(), k.detach().double(), v.detach().double(), None, split)[0]
    low = math_attention(q.detach(), k.detach(), v.detach(), None, split)[0]
    assert_close_to_reference(out.detach(), ref, low, q.dtype, "out")
    assert_grads_close(q, k, v, grads, g, None, split, q.dtype)


def _gallery(name, L, Lkv, H):
    from inductor_flex import variants as V

    table = torch.randn(H, 2 * L - 1, dtype=torch.float64)
    docs = torch.tensor([0] * (Lkv // 3) + [1] * (Lkv // 3) + [2] * (Lkv - 2 * (Lkv // 3)))
    return {
        "causal": (None, V.generate_causal_mask()),
        "sliding_window": (None, V.generate_sliding_window(17)),
        "prefix_lm": (None, V.generate_prefix_lm_mask(11)),
        "document": (None, V.generate_doc_mask_mod(V.generate_causal_mask(), docs)),
        "alibi": (V.generate_alibi_bias(H), None),
        "softcap": (V.generate_tanh_softcap(5.0), V.generate_causal_mask()),
        "relative_bias": (V.generate_relative_bias(table), None),
        "natten": (None, V.generate_natten_mask(8, L // 8, 3, 3)),
        "empty_rows": (None, lambda b, h, q, kv: (q >= 5) & (kv <= q)),
    }[name]


@pytest.mark.parametrize("name", ["causal", "sliding_window", "prefix_lm", "document", "alibi", "softcap",
                                  "relative_bias", "natten", "empty_rows"])
@pytest.mark.parametrize("gqa", [False, True], ids=["mha", "gqa"])
def test_same_call_same_answer_as_torch(name, gqa):
    # the import switch: one call written for PyTorch, both libraries, float64 on the CPU; out and
    # lse agree to rounding, empty rows included
    L = 64
    Hq, Hkv = (4, 2) if gqa else (2, 2)
    q = torch.randn(2, Hq, L, 24, dtype=torch.float64)
    k = torch.randn(2, Hkv, L, 24, dtype=torch.float64)
    v = torch.randn(2, Hkv, L, 16, dtype=torch.float64)
    score_mod, mask_mod = _gallery(name, L, L, Hq)
    results = []
    for lib, make in ((torch_flex, torch_flex.create_block_mask), (None, create_block_mask)):
        bm = None if mask_mod is None else make(mask_mod, None, None, L, L, device="cpu", BLOCK_SIZE=16)
        fn = torch_flex.flex_attention if lib is torch_flex else flex_attention
        aux_cls = torch_flex.AuxRequest if lib is torch_flex else __import__("inductor_flex").AuxRequest
        # PyTorch returns no max_scores on CPU
        out, aux = fn(q, k, v, score_mod=score_mod, block_mask=bm, scale=0.3, enable_gqa=gqa,
                      return_aux=aux_cls(lse=True))
        results.append((out, aux.lse))
    for (a, b), what in zip(zip(*results), ("out", "lse")):
        assert torch.equal(torch.isinf(a), torch.isinf(b)), what
        fin = torch.isfinite(a)
        assert torch.allclose(a[fin], b[fin], rtol=1e-9, atol=1e-9), what
    if name == "empty_rows":
        assert (results[1][0][:, :, :5] == 0).all() and (results[1][1][:, :, :5] == float("-inf")).all()


_KEYS = sorted(KNOWN_KERNEL_OPTIONS) + sorted(COMPAT_KERNEL_OPTIONS)


def _option_dicts():
    from hypothesis import strategies as st

    key = st.one_of(st.sampled_from(_KEYS), st.sampled_from(_KEYS).map(lambda k: "fwd_" + k),
                    st.sampled_from(_KEYS).map(lambda k: "bwd_" + k), st.text(max_size=8), st.integers(0, 3))
    value = st.one_of(st.booleans(), st.integers(-2, 300), st.sampled_from(["AUTO", "TRITON", "FLASH", "X", ""]),
                      st.none(), st.floats(allow_nan=True))
    return st.dictionaries(key, value, max_size=5)


def test_any_kernel_options_dict_validates_or_names_the_problem():
    # random dicts: a resolved dict of known keys, or a ValueError / TypeError that says kernel_options
    from hypothesis import given, settings

    @settings(max_examples=400, deadline=None)
    @given(_option_dicts())
    def check(opts):
        try:
            got = validate_kernel_options(opts)
        except (ValueError, TypeError) as e:
            assert "kernel_options" in str(e)
            return
        assert got["BACKEND"] in ("AUTO", "MATH", "TRITON", "TRITON_DECODE")
        internal = {"_BWD_NUM_WARPS", "_BWD_NUM_STAGES"}
        assert set(got) <= set(_KEYS) | internal
        assert not any(k.startswith(("fwd_", "bwd_")) for k in got)

    check()
