"""GPU suite (H100): the same variant matrix in bf16/fp16 through the eager CUDA kernel."""
import pytest
import torch

from inductor_flex import BlockMask, create_block_mask, flex_attention
from inductor_flex.attention import _choose_backend
from inductor_flex.reference import math_attention
from inductor_flex.validation import validate_kernel_options
from inductor_flex.variants import generate_causal_mask

from cases import SHAPES, VARIANTS, make_inputs, make_variant
from conftest import assert_close_to_reference

pytestmark = pytest.mark.gpu

GPU_SHAPES = dict(SHAPES)
GPU_SHAPES["S1000_D128_gqa"] = (2, 8, 2, 1000, 1000, 128, 128)
GPU_SHAPES["S777_S1500_D96"] = (1, 4, 4, 777, 1500, 96, 96)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("shape", list(GPU_SHAPES.values()), ids=list(GPU_SHAPES))
@pytest.mark.parametrize("variant", VARIANTS)
def test_forward_gpu_matches_reference(variant, shape, dtype):
    B, Hq, Hkv, Lq, Lkv, E, Ev = shape
    q, k, v = make_inputs(shape, dtype, "cuda")
    block = 128 if Lq >= 512 else 32
    score_mod, block_mask = make_variant(variant, Lq, Lkv, Hq, "cuda", block=block)
    # AUTO must pick the fused kernel on CUDA
    assert _choose_backend(validate_kernel_options(None), q, score_mod, block_mask) == "TRITON"
    out, lse = flex_attention(q, k, v, score_mod=score_mod, block_mask=block_mask, enable_gqa=Hq != Hkv, return_lse=True)
    ref_out, ref_lse, _ = math_attention(q.double(), k.double(), v.double(), score_mod, block_mask)
    low_out, low_lse, _ = math_attention(q, k, v, score_mod, block_mask)
    assert not torch.isnan(out).any()
    assert_close_to_reference(out, ref_out, low_out, dtype, "out")
    assert_close_to_reference(lse, ref_lse, low_lse, dtype, "lse")


@pytest.mark.parametrize("shape", ["odd37_E40", "S777_S1500_D96", "gqa4x2_E64_Ev32"])
@pytest.mark.parametrize("variant", ["noop", "causal", "document", "softcap"])
def test_forward_gpu_tma(variant, shape):
    B, Hq, Hkv, Lq, Lkv, E, Ev = GPU_SHAPES[shape]
    q, k, v = make_inputs(GPU_SHAPES[shape], torch.bfloat16, "cuda")
    score_mod, block_mask = make_variant(variant, Lq, Lkv, Hq, "cuda", block=128 if Lq >= 512 else 32)
    out, lse = flex_attention(q, k, v, score_mod=score_mod, block_mask=block_mask, enable_gqa=Hq != Hkv,
                              return_lse=True, kernel_options={"USE_TMA": True})
    ref_out, ref_lse, _ = math_attention(q.double(), k.double(), v.double(), score_mod, block_mask)
    low_out, low_lse, _ = math_attention(q, k, v, score_mod, block_mask)
    assert_close_to_reference(out, ref_out, low_out, torch.bfloat16, "out")
    assert_close_to_reference(lse, ref_lse, low_lse, torch.bfloat16, "lse")


WS_OPTIONS = {"BLOCK_M": 128, "BLOCK_N": 128, "num_warps": 4, "num_stages": 2, "WARP_SPECIALIZE": True}


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("shape", ["odd37_E40", "S777_S1500_D96", "gqa4x2_E64_Ev32", "S1000_D128_gqa"])
@pytest.mark.parametrize("variant", ["noop", "alibi", "softcap", "head_scale", "score_squared", "trig"])
def test_forward_gpu_warp_specialized(variant, shape, dtype):
    """The warp-specialized config (Hopper autotuning's extra candidate for calls without a BlockMask)
    pinned, checked to have launched specialized where it applies, against the float64 reference."""
    from inductor_flex import kernel as K
    from inductor_flex.lowering.configs import warp_specialize_supported

    if not warp_specialize_supported(torch.device("cuda")):
        pytest.skip("needs a Hopper GPU and a Triton with tl.range(warp_specialize=...)")
    B, Hq, Hkv, Lq, Lkv, E, Ev = GPU_SHAPES[shape]
    q, k, v = make_inputs(GPU_SHAPES[shape], dtype, "cuda")
    score_mod, _ = make_variant(variant, Lq, Lkv, Hq, "cuda")  # its score_mod alone: no BlockMask
    out, lse = flex_attention(q, k, v, score_mod=score_mod, enable_gqa=Hq != Hkv, return_lse=True,
                              kernel_options=dict(WS_OPTIONS))
    plan = K.cached_plan(q, k, v, score_mod, None, None, validate_kernel_options(dict(WS_OPTIONS)))
    assert plan.config.warp_specialize
    _, _, consts = K.forward_launch(plan, q, k, v, out, lse, lse, plan.config)
    # head_scale reads a captured tensor: the pinned config then runs the plain loop (kernel.ws_applies)
    assert consts["WARP_SPECIALIZE"] == (variant != "head_scale")
    assert consts["USE_TMA"] == consts["WARP_SPECIALIZE"]
    # Triton 3.6 does not build the separable score path in the specialized loop
    assert not (consts["WARP_SPECIALIZE"] and consts["SEPARABLE"])
    ref_out, ref_lse, _ = math_attention(q.double(), k.double(), v.double(), score_mod)
    low_out, low_lse, _ = math_attention(q, k, v, score_mod)
    assert not torch.isnan(out).any()
    assert_close_to_reference(out, ref_out, low_out, dtype, "out")
    assert_close_to_reference(lse, ref_lse, low_lse, dtype, "lse")


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("lengths", [(1000, 1000), (777, 1500), (1500, 777), (4096, 4096)],
                         ids=["S1000", "Lq777_Lkv1500", "Lq1500_Lkv777", "S4096"])
@pytest.mark.parametrize("variant", ["causal", "prefix_lm", "causal_softcap", "causal_alibi", "sliding_window",
                                     "declared_full"])
def test_forward_gpu_warp_specialized_block_mask(variant, lengths, dtype):
    """A BlockMask of 128-blocks whose partial and full kv blocks are one run together (causal,
    prefix-LM, a sliding window: block_mask.union_run) takes the warp-specialized loop, walked from
    the run's first block with mask_mod on every tile (MASK_ON_FULL: full blocks from the mask_mod).
    declared_full: lists given by hand that call every block full under a causal mask_mod: full
    blocks skip mask_mod, so nothing is masked (the two-run walk, MASK_ON_FULL off), as the
    reference says."""
    from inductor_flex import kernel as K
    from inductor_flex import variants as V
    from inductor_flex.lowering.configs import warp_specialize_supported

    if not warp_specialize_supported(torch.device("cuda")):
        pytest.skip("needs a Hopper GPU and a Triton with tl.range(warp_specialize=...)")
    Lq, Lkv = lengths
    q, k, v = make_inputs((2, 8, 2, Lq, Lkv, 128, 128), dtype, "cuda")
    masks = {"prefix_lm": V.generate_prefix_lm_mask(300), "sliding_window": V.generate_sliding_window(256)}
    score_mod = {"causal_softcap": V.generate_tanh_softcap(20.0), "causal_alibi": V.generate_alibi_bias(8)}.get(variant)
    mask_mod = masks.get(variant, V.generate_causal_mask())
    block_mask = create_block_mask(mask_mod, None, None, Lq, Lkv, device="cuda", BLOCK_SIZE=128)
    if variant == "declared_full":
        nq, nk = -(-Lq // 128), -(-Lkv // 128)
        every = torch.arange(nk, device="cuda", dtype=torch.int32).expand(1, 1, nq, nk).contiguous()
        none = torch.zeros(1, 1, nq, dtype=torch.int32, device="cuda")
        block_mask = BlockMask.from_kv_blocks(none, every, none + nk, every, BLOCK_SIZE=128, mask_mod=mask_mod,
                                              seq_lengths=(Lq, Lkv))
    opts = dict(WS_OPTIONS, REFINE_BLOCK_MASK=False)
    out, lse = flex_attention(q, k, v, score_mod=score_mod, block_mask=block_mask, enable_gqa=True, return_lse=True,
                              kernel_options=opts)
    plan = K.cached_plan(q, k, v, score_mod, block_mask, None, validate_kernel_options(dict(opts)))
    _, _, consts = K.forward_launch(plan, q, k, v, out, lse, lse, plan.config)
    assert consts["WARP_SPECIALIZE"] and consts["RUNS"]
    assert consts["MASK_ON_FULL"] == (variant != "declared_full")
    ref_out, ref_lse, _ = math_attention(q.double(), k.double(), v.double(), score_mod, block_mask)
    low_out, low_lse, _ = math_attention(q, k, v, score_mod, block_mask)
    assert not torch.isnan(out).any()
    assert_close_to_reference(out, ref_out, low_out, dtype, "out")
    assert_close_to_reference(lse, ref_lse, low_lse, dtype, "lse")


def test_forward_gpu_warp_specialized_config_on_other_layouts_runs_unspecialized():
    """[B, L, H, D] storage cannot be read as one row matrix: the pinned config then launches the
    plain loop, and the answer stays right."""
    from inductor_flex import kernel as K

    B, H, L, D = 2, 4, 300, 64
    q, k, v = (torch.randn(B, L, H, D, device="cuda", dtype=torch.bfloat16).transpose(1, 2) for _ in range(3))
    out = flex_attention(q, k, v, kernel_options=dict(WS_OPTIONS))
    plan = K.cached_plan(q, k, v, None, None, None, validate_kernel_options(dict(WS_OPTIONS)))
    assert plan.config.warp_specialize
    _, _, consts = K.forward_launch(plan, q, k, v, out, out, out, plan.config)
    assert not consts["WARP_SPECIALIZE"]
    ref, _, _ = math_attention(q.double(), k.double(), v.double())
    low, _, _ = math_attention(q, k, v)
    assert_close_to_reference(out, ref, low, torch.bfloat16)


@pytest.mark.parametrize("dtype", [torch.float32], ids=["fp32"])
def test_forward_gpu_fp32(dtype):
    shape = (1, 4, 4, 300, 300, 64, 64)
    q, k, v = make_inputs(shape, dtype, "cuda")
    score_mod, block_mask = make_variant("alibi", 300, 300, 4, "cuda")
    out = flex_attention(q, k, v, score_mod=score_mod)
    ref, _, _ = math_attention(q.double(), k.double(), v.double(), score_mod)
    low, _, _ = math_attention(q, k, v, score_mod)
    assert_close_to_reference(out, ref, low, dtype)


def test_eager_cuda_memory_is_linear():
    B, H, S, D = 1, 8, 8192, 64
    q, k, v = (torch.randn(B, H, S, D, device="cuda", dtype=torch.bfloat16) for _ in range(3))
    bm = create_block_mask(generate_causal_mask(), None, None, S, S, device="cuda")
    flex_attention(q, k, v, block_mask=bm)  # warm: compile + autotune
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    flex_attention(q, k, v, block_mask=bm)
    torch.cuda.synchronize()
    extra = torch.cuda.max_memory_allocated() - base
    inputs = 3 * q.numel() * q.element_size()
    scores = B * H * S * S * 2
    assert extra < inputs + 4 * B * H * S * 4 + (1 << 20), f"extra {extra} bytes vs inputs {inputs}"
    assert extra < scores / 50


def test_second_call_compiles_nothing():
    from inductor_flex import kernel as K

    q, k, v = make_inputs((1, 2, 2, 256, 256, 64, 64), torch.bfloat16, "cuda")
    bias = torch.randn(2, device="cuda")
    flex_attention(q, k, v, score_mod=lambda s, b, h, qi, kv: s + bias[h])
    n_modules = len(K._modules)
    bias2 = torch.randn(2, device="cuda")
    flex_attention(q, k, v, score_mod=lambda s, b, h, qi, kv: s + bias2[h])
    assert len(K._modules) == n_modules


def test_captured_cpu_tensor_with_cuda_inputs_is_an_error():
    from inductor_flex import FlexModError

    q, k, v = make_inputs((1, 2, 2, 64, 64, 64, 64), torch.bfloat16, "cuda")
    bias = torch.randn(2)  # CPU

    def cpu_bias(score, b, h, q_idx, kv_idx):
        return score + bias[h]

    with pytest.raises(FlexModError, match="captures a tensor on cpu"):
        flex_attention(q, k, v, score_mod=cpu_bias, kernel_options={"BACKEND": "TRITON"})


@pytest.mark.parametrize("cap", [2.0, 30.0], ids=["cap2", "cap30"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_fast_tanh_softcap_meets_the_criterion(cap, dtype):
    # 16-bit inputs print tanh as Hopper's tanh.approx.f32 by default (kernel_options FAST_TANH,
    # max rel. error ~2^-11): forward and backward must still meet the same-dtype criterion
    from inductor_flex.kernel import kernel_source
    from inductor_flex.variants import generate_tanh_softcap

    from conftest import assert_grads_close

    shape = GPU_SHAPES["S1000_D128_gqa"]
    q, k, v = make_inputs(shape, dtype, "cuda", requires_grad=True)
    score_mod = generate_tanh_softcap(cap)
    bm = create_block_mask(generate_causal_mask(), None, None, 1000, 1000, device="cuda", BLOCK_SIZE=128)
    opts = {}
    # the helper's definition is in every kernel; the hook must call it
    hooks = kernel_source(q, k, v, score_mod, bm, enable_gqa=True, kernel_options=opts).split("# ---- hooks")[1]
    assert "_tanh_approx(" in hooks
    out, lse = flex_attention(q, k, v, score_mod=score_mod, block_mask=bm, enable_gqa=True, return_lse=True,
                              kernel_options=opts)
    ref_out, ref_lse, _ = math_attention(q.detach().double(), k.detach().double(), v.detach().double(), score_mod, bm)
    low_out, low_lse, _ = math_attention(q.detach(), k.detach(), v.detach(), score_mod, bm)
    assert_close_to_reference(out.detach(), ref_out, low_out, dtype, "out")
    assert_close_to_reference(lse.detach(), ref_lse, low_lse, dtype, "lse")
    grad_out = torch.randn_like(out)
    grads = torch.autograd.grad(out, (q, k, v), grad_out)
    assert_grads_close(q, k, v, grads, grad_out, score_mod, bm, dtype)


@pytest.mark.parametrize("case", ["fp32_default", "bf16_off", "fp32_on"])
def test_fast_tanh_switch(case):
    # float32 inputs keep the exact tanh unless FAST_TANH asks; FAST_TANH=False turns it off for
    # 16-bit inputs; the printed kernel says which one runs
    from inductor_flex.kernel import kernel_source
    from inductor_flex.variants import generate_tanh_softcap

    dtype = torch.bfloat16 if case.startswith("bf16") else torch.float32
    opts = {"fp32_default": {}, "bf16_off": {"FAST_TANH": False}, "fp32_on": {"FAST_TANH": True}}[case]
    q, k, v = make_inputs(GPU_SHAPES["S1000_D128_gqa"], dtype, "cuda")
    score_mod = generate_tanh_softcap(20.0)
    src = kernel_source(q, k, v, score_mod, None, enable_gqa=True, kernel_options=opts)
    assert ("_tanh_approx(" in src.split("# ---- hooks")[1]) == (case == "fp32_on")
    out = flex_attention(q, k, v, score_mod=score_mod, enable_gqa=True, kernel_options=opts)
    ref, _, _ = math_attention(q.double(), k.double(), v.double(), score_mod, None)
    if case == "fp32_on":  # asked for: the approximation's ~2^-11, not float32 accuracy
        assert ((out.double() - ref).norm() / ref.norm()).item() < 2e-3
    else:
        low, _, _ = math_attention(q, k, v, score_mod, None)
        assert_close_to_reference(out, ref, low, dtype, "out")
