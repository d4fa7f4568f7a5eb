"""Short-query calls under torch.compile (lowering/decode.py): one inductor_flex::flex_decode op runs
the split-KV decode kernel (here in Triton's interpreter) inside the compiled graph, vs float64."""
import pytest
import torch
from torch._inductor.utils import run_and_get_code

from inductor_flex import AuxRequest, create_block_mask, flex_attention
from inductor_flex import decode as D
from inductor_flex.reference import math_attention
from inductor_flex.variants import generate_causal_mask

from cases import make_inputs, make_variant
from conftest import assert_close_to_reference, assert_grads_close, compile_counter

# CPU tensors take the kernels only when asked by name (the interpreter is a test device)
TRITON = {"BACKEND": "TRITON"}


def compiled_decode(score_mod, block_mask, opts=TRITON, **compile_kwargs):
    def attn(q, k, v):
        return flex_attention(q, k, v, score_mod=score_mod, block_mask=block_mask, enable_gqa=q.shape[1] != k.shape[1],
                              kernel_options=opts, return_aux=AuxRequest(lse=True, max_scores=True))

    cnt = compile_counter()
    return torch.compile(attn, backend=cnt, fullgraph=True, **compile_kwargs), cnt


def check_against_reference(out, aux, q, k, v, score_mod, block_mask):
    ref = math_attention(q.double(), k.double(), v.double(), score_mod, block_mask)
    low = math_attention(q, k, v, score_mod, block_mask)
    for name, a, r, lo in zip(("out", "lse", "max_scores"), (out, aux.lse, aux.max_scores), ref, low):
        assert_close_to_reference(a, r, lo, q.dtype, name)


@pytest.mark.parametrize("variant", ["noop", "causal", "document", "alibi", "softcap", "relative_bias", "empty_rows"])
@pytest.mark.parametrize("Lq", [1, 5], ids=lambda n: f"Lq{n}")
@pytest.mark.parametrize("group", [1, 4], ids=lambda g: f"gqa{g}")
def test_compiled_decode_matches_reference(variant, group, Lq):
    Hkv, Lkv = 2, 157  # odd kv length
    dims = (2, Hkv * group, Hkv, Lq, Lkv, 40, 24)  # non-power-of-two head dims, V dim != QK dim
    q, k, v = make_inputs(dims, torch.float32, "cpu")
    score_mod, block_mask = make_variant(variant, Lq, Lkv, Hkv * group, "cpu")
    fn, cnt = compiled_decode(score_mod, block_mask)
    (out, aux), code = run_and_get_code(fn, q, k, v)
    assert cnt.frame_count == 1
    # the decode op with the rendered decode kernel in Inductor's output code, not the forward template
    assert "inductor_flex.flex_decode" in code[0] and "def flex_decode_kernel" in code[0]
    assert "flex_forward" not in code[0]
    # no BlockMask: the eager path's 128-key blocks (tiles must be >= 16 keys for tl.dot on the GPU)
    from inductor_flex.lowering import decode as compiled
    assert all(p.sparse_kv == (128 if block_mask is None else block_mask.BLOCK_SIZE[1]) for p in compiled._plans.values()
               if p.constexprs["DENSE"] == (block_mask is None))
    check_against_reference(out, aux, q, k, v, score_mod, block_mask)
    if variant == "empty_rows":
        assert (out[:, :, :min(Lq, 5)] == 0).all() and (aux.lse[:, :, :min(Lq, 5)] == float("-inf")).all()


@pytest.mark.parametrize("split", [1, 3, 64], ids=lambda s: f"split{s}")
def test_compiled_decode_pinned_split(split):
    dims = (1, 8, 2, 1, 203, 32, 32)
    q, k, v = make_inputs(dims, torch.float16, "cpu")
    score_mod, block_mask = make_variant("alibi", 1, 203, 8, "cpu")
    fn, _ = compiled_decode(score_mod, block_mask, {**TRITON, "SPLIT_KV": split})
    out, aux = fn(q, k, v)
    check_against_reference(out, aux, q, k, v, score_mod, block_mask)


def test_decode_loop_reuses_one_graph():
    # a compiled decode step over a static cache: the position is a captured offset tensor and the
    # BlockMask is the full mask's row for the current q block; new positions do not recompile
    B, Hq, Hkv, E, MAX = 1, 8, 2, 32, 256
    offset = torch.tensor(0)

    def causal_at_offset(b, h, q_idx, kv_idx):
        return q_idx + offset >= kv_idx

    full = create_block_mask(generate_causal_mask(), None, None, MAX, MAX, device="cpu", BLOCK_SIZE=32)

    def step(q, k, v, bm):
        return flex_attention(q, k, v, block_mask=bm, enable_gqa=True, kernel_options=TRITON)

    cnt = compile_counter()
    fn = torch.compile(step, backend=cnt, fullgraph=True)
    k = torch.randn(B, Hkv, MAX, E, dtype=torch.float16)
    v = torch.randn(B, Hkv, MAX, E, dtype=torch.float16)
    for pos in (3, 40, 100, 255):
        offset.fill_(pos)
        bm = full[:, :, torch.tensor(pos // 32)]
        bm.mask_mod = causal_at_offset
        q = torch.randn(B, Hq, 1, E, dtype=torch.float16)
        out = fn(q, k, v, bm)
        ref, _, _ = math_attention(q.double(), k[:, :, :pos + 1].double(), v[:, :, :pos + 1].double())
        assert (out.double() - ref).abs().max() < 5e-3, pos
    assert cnt.frame_count == 1


def test_growing_cache_does_not_recompile_under_dynamic_shapes():
    B, Hq, Hkv, E = 1, 4, 2, 16

    def step(q, k, v):
        return flex_attention(q, k, v, enable_gqa=True, kernel_options=TRITON)

    cnt = compile_counter()
    fn = torch.compile(step, backend=cnt, fullgraph=True, dynamic=True)
    for length in (64, 97, 130):
        q, k, v = make_inputs((B, Hq, Hkv, 1, length, E, E), torch.float32, "cpu")
        out = fn(q, k, v)
        ref, _, _ = math_attention(q.double(), k.double(), v.double())
        assert (out.double() - ref).abs().max() < 1e-4, length
    assert cnt.frame_count == 1


def test_compiled_decode_backward():
    # short queries with gradients: the decode kernel's out and lse feed the fused backward
    dims = (1, 4, 2, 3, 97, 32, 32)
    q, k, v = make_inputs(dims, torch.float32, "cpu", requires_grad=True)
    score_mod, block_mask = make_variant("causal", 3, 97, 4, "cpu")

    def attn(q, k, v):
        return flex_attention(q, k, v, score_mod=score_mod, block_mask=block_mask, enable_gqa=True,
                              kernel_options=TRITON)

    fn = torch.compile(attn, fullgraph=True)
    out, code = run_and_get_code(fn, q, k, v)
    assert any("inductor_flex.flex_decode" in c for c in code)
    grad_out = torch.randn_like(out)
    grads = torch.autograd.grad(out, (q, k, v), grad_out)
    assert_grads_close(q, k, v, grads, grad_out, score_mod, block_mask, torch.float32)


def test_compiled_decode_backward_with_learned_bias():
    # a captured table that requires grad: its gradient comes from the fused backward after the decode op
    Lq, Lkv, H = 4, 61, 4
    q, k, v = make_inputs((1, H, 2, Lq, Lkv, 16, 16), torch.float32, "cpu", requires_grad=True)
    table = (0.1 * torch.randn(H, Lq + Lkv - 1)).requires_grad_(True)

    def bias(score, b, h, q_idx, kv_idx):
        return score + table[h, q_idx - kv_idx + Lkv - 1]

    def attn(q, k, v):
        return flex_attention(q, k, v, score_mod=bias, enable_gqa=True, kernel_options=TRITON)

    out, code = run_and_get_code(torch.compile(attn, fullgraph=True), q, k, v)
    assert any("inductor_flex.flex_decode" in c for c in code)
    grad_out = torch.randn_like(out)
    grads = torch.autograd.grad(out, (q, k, v, table), grad_out)

    table64 = table.detach().double().requires_grad_(True)

    def bias64(score, b, h, q_idx, kv_idx):
        return score + table64[h, q_idx - kv_idx + Lkv - 1]

    leaves64 = [t.detach().double().requires_grad_(True) for t in (q, k, v)]
    ref = torch.autograd.grad(math_attention(*leaves64, bias64)[0], (*leaves64, table64), grad_out.double())
    for name, g, r in zip(("dq", "dk", "dv", "dtable"), grads, ref):
        assert (g.double() - r).abs().max().item() < 1e-4 * max(1.0, r.abs().max().item()), name


def test_longer_queries_keep_the_forward_kernel():
    dims = (1, 4, 4, D.DECODE_MAX_LQ + 1, 64, 16, 16)
    q, k, v = make_inputs(dims, torch.float32, "cpu")
    fn, _ = compiled_decode(None, None)
    (out, aux), code = run_and_get_code(fn, q, k, v)
    assert "inductor_flex.flex_decode" not in code[0] and "inductor_flex.flex_forward" in code[0]
    check_against_reference(out, aux, q, k, v, None, None)


def test_decode_backend_that_cannot_run_raises_at_compile():
    # a query spanning two BlockMask q blocks cannot be one decode tile
    dims = (1, 4, 4, 16, 64, 16, 16)
    q, k, v = make_inputs(dims, torch.float32, "cpu")
    bm = create_block_mask(generate_causal_mask(), None, None, 16, 64, device="cpu", BLOCK_SIZE=(8, 16))
    fn, _ = compiled_decode(None, bm, {"BACKEND": "TRITON_DECODE"})
    with pytest.raises(Exception, match="TRITON_DECODE' cannot run this call"):
        fn(q, k, v)
