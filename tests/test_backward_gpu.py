"""GPU suite (H100): the fused backward kernels in bf16/fp16 vs the float64 math path."""
import pytest
import torch

from inductor_flex import create_block_mask, flex_attention
from inductor_flex.variants import generate_causal_mask, generate_doc_mask_mod

from cases import LEARNABLE, LEARNABLE_LEN as L, SHAPES, VARIANTS, make_inputs, make_variant
from test_backward_interpreter import check_backward

pytestmark = pytest.mark.gpu

GPU_SHAPES = {
    "odd37_E40": SHAPES["odd37_E40"],
    "gqa4x2_E64_Ev32": SHAPES["gqa4x2_E64_Ev32"],
    "S1000_D128_gqa": (2, 8, 2, 1000, 1000, 128, 128),
    "S333_S700_D96": (1, 4, 4, 333, 700, 96, 64),
}


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("shape", list(GPU_SHAPES.values()), ids=list(GPU_SHAPES))
@pytest.mark.parametrize("variant", VARIANTS)
def test_backward_gpu_matches_reference(variant, shape, dtype):
    B, Hq, Hkv, Lq, Lkv, E, Ev = shape
    block = 128 if Lq >= 512 else 32
    score_mod, block_mask = make_variant(variant, Lq, Lkv, Hq, "cuda", block=block)
    check_backward(shape, dtype, score_mod, block_mask, device="cuda")


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=["bf16", "fp32"])
@pytest.mark.parametrize("name", list(LEARNABLE))
def test_captured_tensor_gradients_gpu(name, dtype):
    factory, make = LEARNABLE[name]
    # pooled over 6 draws: with 1 to 4 gradient elements, whether one draw's error is within 1.1x the
    # bf16 reference's is chance (a float64 emulation of an exact-delta kernel: ALiBi slopes over
    # 2 of 6 draws, while its total error over them is 0.66x the reference's)
    check_backward((2, 4, 2, L, L, 64, 64), dtype, factory, None, make(4), device="cuda", draws=6)


def test_dq_dk_dv_are_deterministic_with_gqa():
    q, k, v = make_inputs((2, 8, 2, 1024, 1024, 128, 128), torch.bfloat16, "cuda", requires_grad=True)
    bm = create_block_mask(generate_causal_mask(), None, None, 1024, 1024, device="cuda")
    g = torch.randn(2, 8, 1024, 128, device="cuda", dtype=torch.bfloat16)
    grads = []
    for _ in range(3):
        for t in (q, k, v):
            t.grad = None
        flex_attention(q, k, v, block_mask=bm, enable_gqa=True).backward(g)
        grads.append([t.grad.clone() for t in (q, k, v)])
    for other in grads[1:]:
        for a, b in zip(grads[0], other):
            assert torch.equal(a, b)


def test_backward_memory_is_linear():
    B, H, S, D = 1, 8, 8192, 64
    q, k, v = make_inputs((B, H, H, S, S, D, D), torch.bfloat16, "cuda", requires_grad=True)
    ids = torch.arange(S, device="cuda") // 1000
    bm = create_block_mask(generate_doc_mask_mod(generate_causal_mask(), ids), None, None, S, S, device="cuda")
    flex_attention(q, k, v, block_mask=bm).sum().backward()  # warm: compile + autotune
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    flex_attention(q, k, v, block_mask=bm).sum().backward()
    torch.cuda.synchronize()
    extra = torch.cuda.max_memory_allocated() - base
    inputs = 3 * q.numel() * q.element_size()
    # out + dq, dk, dv (about 1.3x the inputs) and fp32 row stats; one S x S bf16 score matrix is 1 GiB
    assert extra < 2 * inputs + (4 << 20), f"backward used {extra} extra bytes vs inputs {inputs}"
    assert extra < B * H * S * S * 2 / 20


@pytest.mark.parametrize("variant", ["noop", "causal", "document", "softcap"])
def test_fused_dq_gpu_matches_reference(variant):
    shape = GPU_SHAPES["S1000_D128_gqa"]
    B, Hq, Hkv, Lq, Lkv, E, Ev = shape
    score_mod, block_mask = make_variant(variant, Lq, Lkv, Hq, "cuda", block=128)
    check_backward(shape, torch.bfloat16, score_mod, block_mask, kernel_options={"BACKEND": "TRITON", "FUSED_DQ": True}, device="cuda")


@pytest.mark.parametrize("variant", ["noop", "document"])
def test_eager_step_never_waits_for_the_gpu(variant):
    """Once planned and tuned, an eager forward + backward queues its kernels without a host-device
    synchronization (a sync would leave the GPU idle while the host prepares the next launches)."""
    dims = (2, 4, 4, 1024, 1024, 64, 64)
    B, Hq, Hkv, Lq, Lkv, E, Ev = dims
    q, k, v = make_inputs(dims, torch.bfloat16, "cuda", requires_grad=True)
    score_mod, block_mask = make_variant(variant, Lq, Lkv, Hq, "cuda", block=128)
    g = torch.randn(B, Hq, Lq, Ev, device="cuda", dtype=torch.bfloat16)

    def step():
        out = flex_attention(q, k, v, score_mod=score_mod, block_mask=block_mask)
        return torch.autograd.grad(out, (q, k, v), g)

    step()
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        grads = step()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert all(t is not None and t.shape == x.shape for t, x in zip(grads, (q, k, v)))


@pytest.mark.parametrize("variant", ["noop", "document", "softcap"])
def test_eager_step_replays_in_a_cuda_graph(variant):
    """An eager forward + backward captured in a torch.cuda.CUDAGraph (what bench_attention.py
    --cuda-graph times, and what a hand-graphed training step does) replays on new inputs with the
    results of the eager step on those inputs."""
    dims = (2, 4, 4, 1024, 1024, 64, 64)
    B, Hq, Hkv, Lq, Lkv, E, Ev = dims
    q, k, v = make_inputs(dims, torch.bfloat16, "cuda", requires_grad=True)
    g = torch.randn(B, Hq, Lq, Ev, device="cuda", dtype=torch.bfloat16)
    score_mod, block_mask = make_variant(variant, Lq, Lkv, Hq, "cuda", block=128)

    def step():
        out = flex_attention(q, k, v, score_mod=score_mod, block_mask=block_mask)
        return (out, *torch.autograd.grad(out, (q, k, v), g))

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(2):  # plans and tunes outside the capture
            step()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        static = step()
    for seed in (1, 2):
        torch.manual_seed(seed)
        with torch.no_grad():
            for t in (q, k, v, g):
                t.copy_(torch.randn_like(t))
        graph.replay()
        expected = step()
        for name, a, b in zip(("out", "dq", "dk", "dv"), static, expected):
            assert torch.equal(a, b), f"{variant}: replayed {name} differs from the eager step's"


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("variant", ["document", "sliding_window"])
def test_refined_block_mask_gpu(variant, dtype):
    # 128-blocks over short documents / a 24-wide window: the kernels walk the 64 x 64 refinement
    from inductor_flex.kernel import cached_plan
    from inductor_flex.validation import validate_kernel_options

    shape = (2, 8, 2, 1000, 1000, 128, 128)
    score_mod, bm = make_variant(variant, 1000, 1000, 8, "cuda", block=128)
    q = torch.empty(2, 8, 1000, 128, device="cuda", dtype=dtype)
    kv = torch.empty(2, 2, 1000, 128, device="cuda", dtype=dtype)
    plan = cached_plan(q, kv, kv, score_mod, bm, None, validate_kernel_options({"BACKEND": "TRITON"}))
    assert plan.block_mask.BLOCK_SIZE == (64, 64)
    check_backward(shape, dtype, score_mod, bm, kernel_options={"BACKEND": "TRITON"}, device="cuda")


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("variant", ["alibi", "causal"])
def test_layout_specialized_kernels_gpu(variant, dtype):
    # strides, lengths and head counts as constexprs (kernel.py _specialize_layout): GQA, odd lengths
    # past SPECIALIZE_MIN_LEN, a V head dim that is not a power of two
    from inductor_flex.kernel import cached_plan
    from inductor_flex.validation import validate_kernel_options

    opts = {"BACKEND": "TRITON", "SPECIALIZE_LAYOUT": True}
    shape = (1, 4, 2, 600, 520, 64, 48)
    score_mod, bm = make_variant(variant, 600, 520, 4, "cuda", block=128)
    q = torch.empty(1, 4, 600, 64, device="cuda", dtype=dtype)
    kv = torch.empty(1, 2, 520, 64, device="cuda", dtype=dtype)
    assert cached_plan(q, kv, kv, score_mod, bm, None, validate_kernel_options(opts)).specialized
    check_backward(shape, dtype, score_mod, bm, kernel_options=opts, device="cuda")
