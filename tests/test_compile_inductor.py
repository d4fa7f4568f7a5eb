"""flex_attention under Inductor on CPU: the chunked decomposition, fused by Inductor, vs float64."""
import re

import pytest
import torch
import torch._dynamo.testing
from torch._inductor.utils import run_and_get_code

import inductor_flex.lowering.cpu as cpu_lowering
from inductor_flex import AuxRequest, create_block_mask, flex_attention
from inductor_flex.hop import flex_attention_hop
from inductor_flex.reference import math_attention
from inductor_flex.variants import generate_causal_mask, generate_doc_mask_mod

from cases import SHAPES, VARIANTS, make_inputs, make_variant
from conftest import assert_close_to_reference, assert_grads_close, compile_counter, reference64


@pytest.mark.parametrize("shape", ["odd37_E40", "gqa4x2_E64_Ev32", "Lq50_Lkv97"])
@pytest.mark.parametrize("variant", VARIANTS)
def test_inductor_forward_matches_reference(variant, shape):
    dims = SHAPES[shape]
    B, Hq, Hkv, Lq, Lkv, E, Ev = dims
    q, k, v = make_inputs(dims, torch.float32, "cpu")
    score_mod, block_mask = make_variant(variant, Lq, Lkv, Hq, "cpu")

    def attn(q, k, v):
        return flex_attention(q, k, v, score_mod=score_mod, block_mask=block_mask, enable_gqa=Hq != Hkv,
                              return_aux=AuxRequest(lse=True, max_scores=True))

    cnt = compile_counter()
    out, aux = torch.compile(attn, backend=cnt, fullgraph=True)(q, k, v)
    assert cnt.frame_count == 1
    ref_out, ref_lse, ref_max = math_attention(q.double(), k.double(), v.double(), score_mod, block_mask)
    low_out, low_lse, low_max = math_attention(q, k, v, score_mod, block_mask)
    assert_close_to_reference(out, ref_out, low_out, torch.float32, "out")
    assert_close_to_reference(aux.lse, ref_lse, low_lse, torch.float32, "lse")
    assert_close_to_reference(aux.max_scores, ref_max, low_max, torch.float32, "max_scores")
    if variant == "empty_rows":
        assert (out[:, :, :5] == 0).all() and (aux.lse[:, :, :5] == float("-inf")).all()


@pytest.mark.parametrize("variant", ["causal", "relative_bias", "softcap", "document", "head_scale"])
def test_inductor_forward_backward(variant):
    dims = SHAPES["gqa4x2_E64_Ev32"]
    B, Hq, Hkv, Lq, Lkv, E, Ev = dims
    q, k, v = make_inputs(dims, torch.float32, "cpu", requires_grad=True)
    score_mod, block_mask = make_variant(variant, Lq, Lkv, Hq, "cpu")
    captured = [t for t in getattr(score_mod, "__closure__", None) or () if isinstance(t.cell_contents, torch.Tensor)]
    extra = [c.cell_contents.requires_grad_(True) for c in captured if c.cell_contents.is_floating_point()]

    def loss(q, k, v):
        out, lse = flex_attention(q, k, v, score_mod=score_mod, block_mask=block_mask, enable_gqa=True,
                                  return_lse=True)
        return (out * out).sum() + lse.sum()

    cnt = compile_counter()
    grads = torch.autograd.grad(torch.compile(loss, backend=cnt, fullgraph=True)(q, k, v), (q, k, v, *extra))
    assert cnt.frame_count == 1
    leaves = [t.detach().double().requires_grad_(True) for t in (q, k, v)]
    out, lse, _ = math_attention(*leaves, score_mod, block_mask)
    ref = torch.autograd.grad((out * out).sum() + lse.sum(), leaves)
    low = torch.autograd.grad(loss(q, k, v), (q, k, v))
    for name, g, r, lo in zip(("dq", "dk", "dv"), grads, ref, low):
        assert_close_to_reference(g, r, lo, torch.float32, name)
    if extra:  # captured tables get gradients too (compared with eager autograd of the math path)
        eager = torch.autograd.grad(loss(q, k, v), extra)
        for g, e in zip(grads[3:], eager):
            torch.testing.assert_close(g, e, rtol=1e-4, atol=1e-5)


def test_no_full_score_matrix_in_generated_code(monkeypatch):
    """With a small chunk budget the largest buffer is one chunk of scores, never B·H·Lq·Lkv."""
    B, H, L = 1, 2, 64
    monkeypatch.setattr(cpu_lowering, "CHUNK_ELEMS", B * H * 16 * L)
    bm = create_block_mask(generate_causal_mask(), None, None, L, L, device="cpu", BLOCK_SIZE=16)
    q, k, v = make_inputs((B, H, H, L, L, 16, 16), torch.float32, "cpu")
    torch._dynamo.reset()
    f = torch.compile(lambda q, k, v: flex_attention(q, k, v, block_mask=bm, score_mod=lambda s, b, h, m, n: s * 0.5),
                      backend="inductor", fullgraph=True)
    out, code = run_and_get_code(f, q, k, v)
    sizes = [tuple(int(x) for x in s.split(",") if x.strip()) for s in
             re.findall(r"empty_strided_cpu\(\(([\d, ]*)\)", "\n".join(code))]
    assert sizes, "expected buffer allocations in the generated code"
    largest = max(torch.Size(s).numel() for s in sizes)
    assert largest <= B * H * 16 * L < B * H * L * L
    ref, _, _ = math_attention(q.double(), k.double(), v.double(), lambda s, b, h, m, n: s * 0.5, bm)
    assert (out.double() - ref).abs().max() < 1e-5
    # the HOP itself was decomposed: Inductor code holds C++ kernels, not a call back into Python
    assert "higher_order.inductor_flex_attention(" not in "\n".join(code)


def _document_step(L):
    """q, k, v, a document-causal BlockMask and a learnable bias table for length L."""
    g = torch.Generator().manual_seed(L)
    ids = torch.sort(torch.randint(0, 5, (L,), generator=g)).values
    bm = create_block_mask(generate_doc_mask_mod(generate_causal_mask(), ids), None, None, L, L, device="cpu",
                           BLOCK_SIZE=16)
    table = torch.randn(2, 2 * L - 1, requires_grad=True)
    q, k, v = make_inputs((1, 2, 2, L, L, 16, 16), torch.float32, "cpu", requires_grad=True)
    return q, k, v, bm, table


def test_inductor_dynamic_lengths_fwd_bwd_no_recompile():
    def attn(q, k, v, bm, table):
        def rel_bias(score, b, h, q_idx, kv_idx):
            return score + table[h, kv_idx - q_idx + q.shape[2] - 1]

        return flex_attention(q, k, v, score_mod=rel_bias, block_mask=bm)

    cnt = compile_counter()
    compiled = torch.compile(attn, backend=cnt, fullgraph=True, dynamic=True)
    for L in (40, 57, 72):
        q, k, v, bm, table = _document_step(L)
        out = compiled(q, k, v, bm, table)
        grads = torch.autograd.grad(out.sum(), (q, k, v, table))
        ref_grads = torch.autograd.grad(attn(q, k, v, bm, table).sum(), (q, k, v, table))
        ref = attn(q.double(), k.double(), v.double(), bm, table.double())
        assert (out.double() - ref).abs().max() < 1e-5
        for gc, ge in zip(grads, ref_grads):
            torch.testing.assert_close(gc, ge, rtol=1e-4, atol=1e-5)
    assert cnt.frame_count == 1


def test_inductor_flex_backend_compiles_flex_attention():
    assert "inductor_flex" in torch._dynamo.list_backends()
    L = 48
    bm = create_block_mask(generate_causal_mask(), None, None, L, L, device="cpu", BLOCK_SIZE=16)
    q, k, v = make_inputs((1, 2, 2, L, L, 16, 16), torch.float32, "cpu")
    torch._dynamo.reset()
    f = torch.compile(lambda q, k, v: flex_attention(q, k, v, block_mask=bm), backend="inductor_flex", fullgraph=True)
    out, code = run_and_get_code(f, q, k, v)
    assert code and "higher_order.inductor_flex_attention(" not in "\n".join(code)
    ref, _, _ = math_attention(q.double(), k.double(), v.double(), None, bm)
    assert (out.double() - ref).abs().max() < 1e-5


# ---- the fused kernel inside Inductor graphs (lowering/kernel_op.py), here in the interpreter ----
TRITON = {"BACKEND": "TRITON"}


def _kernel_in(code) -> bool:
    text = "\n".join(code)
    return "inductor_flex.flex_forward" in text and "def flex_fwd_kernel" in text


@pytest.mark.parametrize("variant", ["noop", "causal", "document", "relative_bias", "softcap", "ops_soup",
                                     "empty_rows"])
def test_inductor_graph_calls_the_fused_kernel(variant):
    dims = SHAPES["Lq50_Lkv97"]
    B, Hq, Hkv, Lq, Lkv, E, Ev = dims
    q, k, v = make_inputs(dims, torch.float32, "cpu")
    score_mod, block_mask = make_variant(variant, Lq, Lkv, Hq, "cpu")
    torch._dynamo.reset()
    f = torch.compile(lambda q, k, v: flex_attention(q, k, v, score_mod=score_mod, block_mask=block_mask,
                                                     return_lse=True, kernel_options=TRITON),
                      backend="inductor", fullgraph=True)
    (out, lse), code = run_and_get_code(f, q, k, v)
    # the rendered template, with the printed mods, is in Inductor's output code
    assert _kernel_in(code)
    ref_out, ref_lse, _ = math_attention(q.double(), k.double(), v.double(), score_mod, block_mask)
    low_out, low_lse, _ = math_attention(q, k, v, score_mod, block_mask)
    assert_close_to_reference(out, ref_out, low_out, torch.float32, "out")
    assert_close_to_reference(lse, ref_lse, low_lse, torch.float32, "lse")


def test_fused_kernel_graph_dynamic_lengths_and_backward():
    def attn(q, k, v, bm, table):
        def rel_bias(score, b, h, q_idx, kv_idx):
            return score + table[h, kv_idx - q_idx]

        return flex_attention(q, k, v, score_mod=rel_bias, block_mask=bm, kernel_options=TRITON)

    def attn_math(q, k, v, bm, table):
        return math_attention(q, k, v, lambda s, b, h, m, n: s + table[h, n - m], bm)[0]

    cnt = compile_counter()
    compiled = torch.compile(attn, backend=cnt, fullgraph=True, dynamic=True)
    for L in (40, 57):
        q, k, v, bm, table = _document_step(L)
        if L == 40:
            out, code = run_and_get_code(compiled, q, k, v, bm, table)
            assert _kernel_in(code)
        else:
            out = compiled(q, k, v, bm, table)
        assert (out.double() - attn_math(q.double(), k.double(), v.double(), bm, table.double())).abs().max() < 1e-5
        grads = torch.autograd.grad(out.sum(), (q, k, v, table))
        ref = torch.autograd.grad(attn_math(q, k, v, bm, table).sum(), (q, k, v, table))
        for gc, ge in zip(grads, ref):
            torch.testing.assert_close(gc, ge, rtol=1e-4, atol=1e-5)
    assert cnt.frame_count == 1


def test_mod_depending_on_a_symbolic_length_reads_it_at_run_time():
    """q.shape[2] read by the mod is symbolic under dynamic=True: the fused kernel gets it as a 0-d
    tensor operand and reads it at run time (printing its value would bake one length in; until
    2026-11-27 such calls took the decomposition), correct for every length without a recompile."""
    def attn(q, k, v):
        return flex_attention(q, k, v, score_mod=lambda s, b, h, m, n: s + (q.shape[2] - m) * 0.01,
                              kernel_options=TRITON)

    cnt = compile_counter()
    compiled = torch.compile(attn, backend=cnt, fullgraph=True, dynamic=True)
    for L in (33, 47):
        q, k, v = make_inputs((1, 2, 2, L, L, 16, 16), torch.float32, "cpu")
        if L == 33:
            out, code = run_and_get_code(compiled, q, k, v)
            assert code and _kernel_in(code)
        else:
            out = compiled(q, k, v)
        ref, _, _ = math_attention(q.double(), k.double(), v.double(), lambda s, b, h, m, n: s + (L - m) * 0.01)
        assert (out.double() - ref).abs().max() < 1e-5
    assert cnt.frame_count == 1


def test_no_full_score_matrix_in_backward_code(monkeypatch):
    B, H, L = 1, 2, 64
    monkeypatch.setattr(cpu_lowering, "CHUNK_ELEMS", B * H * 16 * L)
    bm = create_block_mask(generate_causal_mask(), None, None, L, L, device="cpu", BLOCK_SIZE=16)
    q, k, v = make_inputs((B, H, H, L, L, 16, 16), torch.float32, "cpu", requires_grad=True)
    torch._dynamo.reset()
    f = torch.compile(lambda q, k, v: flex_attention(q, k, v, block_mask=bm, score_mod=lambda s, b, h, m, n: s * 0.5),
                      backend="inductor", fullgraph=True)

    def step(q, k, v):
        return torch.autograd.grad(f(q, k, v).square().sum(), (q, k, v))

    grads, code = run_and_get_code(step, q, k, v)
    assert len(code) == 2  # forward and backward graphs
    sizes = [tuple(int(x) for x in s.split(",") if x.strip()) for s in
             re.findall(r"empty_strided_cpu\(\(([\d, ]*)\)", code[1])]
    assert sizes and max(torch.Size(s).numel() for s in sizes) <= B * H * 16 * L
    leaves = [t.detach().double().requires_grad_(True) for t in (q, k, v)]
    out, _, _ = math_attention(*leaves, lambda s, b, h, m, n: s * 0.5, bm)
    ref = torch.autograd.grad(out.square().sum(), leaves)
    for g, r in zip(grads, ref):
        assert (g.double() - r).abs().max() < 1e-4


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
def test_dynamic_shapes_with_a_mod_closing_over_an_int(dtype):
    """Under dynamic=True Dynamo passes an int the mod closes over (the gallery's ALiBi divides by
    its head count) as a symbolic graph input; the chunked decomposition evaluated the mod with it
    under vmap and failed ("x must be Tensor or scalar, got SymInt"). Forward and backward against
    float64, two lengths, one frame."""
    from inductor_flex.variants import generate_alibi_bias

    mod = generate_alibi_bias(4)
    cnt = compile_counter()
    fn = torch.compile(lambda q, k, v: flex_attention(q, k, v, score_mod=mod), backend=cnt, fullgraph=True,
                       dynamic=True)
    for L in (40, 57):
        q, k, v = make_inputs((1, 4, 4, L, L, 32, 32), dtype, "cpu", requires_grad=True)
        out = fn(q, k, v)
        g = torch.randn_like(out)
        grads = torch.autograd.grad(out, (q, k, v), g)
        assert_close_to_reference(out, reference64(q, k, v, mod)[0], math_attention(q, k, v, mod)[0], dtype, "out")
        assert_grads_close(q, k, v, grads, g, mod, None, dtype)
    assert cnt.frame_count == 1


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
def test_dynamic_int_operand_takes_the_fused_kernel(dtype):
    """The same mod with BACKEND "TRITON" (the interpreter here, the GPU's path alike): the symbolic
    int is handed to the fused kernel as a 0-d tensor it reads at run time, not baked into the print,
    so the call keeps the custom op (forward and backward) across lengths."""
    from inductor_flex.variants import generate_alibi_bias

    mod = generate_alibi_bias(4)
    cnt = compile_counter("inductor")
    fn = torch.compile(lambda q, k, v: flex_attention(q, k, v, score_mod=mod, kernel_options={"BACKEND": "TRITON"}),
                       backend=cnt, fullgraph=True, dynamic=True)
    for L in (40, 57):
        q, k, v = make_inputs((1, 4, 4, L, L, 32, 32), dtype, "cpu", requires_grad=True)
        g = torch.randn(1, 4, L, 32, dtype=dtype)

        def step():
            out = fn(q, k, v)
            return out, torch.autograd.grad(out, (q, k, v), g)

        if L == 40:
            (out, grads), code = run_and_get_code(step)
            code = "\n".join(code)
            assert "inductor_flex.flex_forward" in code and "inductor_flex.flex_backward" in code
        else:
            out, grads = step()
        assert_close_to_reference(out, reference64(q, k, v, mod)[0], math_attention(q, k, v, mod)[0], dtype, "out")
        assert_grads_close(q, k, v, grads, g, mod, None, dtype)
    assert cnt.frame_count == 1
