"""The math path vs hand-written formulas, its backward on CPU, and its memory bound."""
import math

import pytest
import torch
from hypothesis import given, settings, strategies as st

from inductor_flex import create_block_mask, flex_attention
from inductor_flex.reference import math_attention
from inductor_flex.variants import (
    generate_alibi_bias, generate_causal_mask, generate_doc_mask_mod, generate_head_scale,
    generate_natten_mask, generate_prefix_lm_mask, generate_relative_bias, generate_sliding_window,
    generate_tanh_softcap, generate_dilated_sliding_window,
)

MATH = {"BACKEND": "MATH"}


def dense_attention(q, k, v, bias=None, allowed=None, scale=None, transform=None):
    """Plain softmax attention written out by hand (float64), GQA by repeating heads."""
    G = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(G, 1), v.repeat_interleave(G, 1)
    s = q @ k.transpose(-1, -2) * (scale if scale is not None else 1 / math.sqrt(q.shape[-1]))
    if transform is not None:
        s = transform(s)
    if bias is not None:
        s = s + bias
    if allowed is not None:
        s = s.masked_fill(~allowed, float("-inf"))
    lse = torch.logsumexp(s, -1)
    p = torch.where(torch.isinf(lse)[..., None], torch.zeros_like(s), torch.exp(s - lse[..., None]))
    return p @ v, lse


L = 45
Q = torch.arange(L)[:, None]
K = torch.arange(L)[None, :]
IDS = torch.tensor([0] * 10 + [1] * 20 + [2] * 15)
TABLE = torch.randn(2, 2 * L - 1, dtype=torch.float64)
SCALES = torch.tensor([0.5, 2.0], dtype=torch.float64)
SLOPES = torch.exp2(-8.0 * (torch.arange(2) + 1) / 2).double()

# name -> (score_mod, mask_mod, bias (H, L, L) or None, allowed (L, L) or None, transform)
FORMULAS = {
    "causal": (None, generate_causal_mask(), None, Q >= K, None),
    "sliding_window": (None, generate_sliding_window(7), None, (Q >= K) & (Q - K < 7), None),
    "prefix_lm": (None, generate_prefix_lm_mask(9), None, (Q >= K) | (K < 9), None),
    "document": (None, generate_doc_mask_mod(generate_causal_mask(), IDS), None, (IDS[:, None] == IDS[None, :]) & (Q >= K), None),
    "natten": (None, generate_natten_mask(9, 5, 3, 3), None, None, None),
    "dilated": (None, generate_dilated_sliding_window(6, 2), None, ((Q - K).abs() <= 6) & ((Q - K) % 2 == 0), None),
    "alibi": (generate_alibi_bias(2), None, SLOPES[:, None, None] * (K - Q), None, None),
    "relative_bias": (generate_relative_bias(TABLE), None, TABLE[:, (K - Q + L - 1)], None, None),
    "softcap": (generate_tanh_softcap(3.0), None, None, None, lambda s: 3.0 * torch.tanh(s / 3.0)),
    "head_scale": (generate_head_scale(SCALES), None, None, None, lambda s: s * SCALES[:, None, None]),
    "causal_alibi": (generate_alibi_bias(2), generate_causal_mask(), SLOPES[:, None, None] * (K - Q), Q >= K, None),
}


def _natten_allowed():
    y, x = torch.arange(L) // 9, torch.arange(L) % 9
    cx, cy = x.clamp(1, 7), y.clamp(1, 3)
    return ((cx[:, None] - x[None, :]).abs() <= 1) & ((cy[:, None] - y[None, :]).abs() <= 1)


@pytest.mark.parametrize("name", list(FORMULAS))
def test_math_path_matches_formula(name):
    score_mod, mask_mod, bias, allowed, transform = FORMULAS[name]
    if name == "natten":
        allowed = _natten_allowed()
    q, k, v = (torch.randn(2, 2, L, 16, dtype=torch.float64) for _ in range(3))
    bm = create_block_mask(mask_mod, None, None, L, L, device="cpu", BLOCK_SIZE=16) if mask_mod else None
    out, lse = flex_attention(q, k, v, score_mod=score_mod, block_mask=bm, return_lse=True, kernel_options=MATH)
    ref, ref_lse = dense_attention(q, k, v, bias=bias, allowed=allowed, transform=transform)
    torch.testing.assert_close(out, ref, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(lse, ref_lse, rtol=1e-10, atol=1e-10)


def test_gqa_scale_and_value_dim():
    q = torch.randn(1, 6, 20, 24, dtype=torch.float64)
    k = torch.randn(1, 2, 31, 24, dtype=torch.float64)
    v = torch.randn(1, 2, 31, 40, dtype=torch.float64)
    out = flex_attention(q, k, v, scale=0.3, enable_gqa=True)
    ref, _ = dense_attention(q, k, v, scale=0.3)
    torch.testing.assert_close(out, ref)


def test_h_passed_to_mods_is_query_head():
    q = torch.randn(1, 6, 4, 8, dtype=torch.float64)
    k = torch.randn(1, 2, 4, 8, dtype=torch.float64)

    def per_head(score, b, h, q_idx, kv_idx):
        return score + h * 100.0 * (kv_idx == 0)

    out, lse = flex_attention(q, k, k, score_mod=per_head, enable_gqa=True, return_lse=True)
    bias = torch.zeros(6, 4, 4, dtype=torch.float64)
    bias[:, :, 0] = torch.arange(6)[:, None] * 100.0
    ref, _ = dense_attention(q, k, k, bias=bias)
    torch.testing.assert_close(out, ref)


def test_fully_masked_rows_zero_output_minus_inf_lse_and_zero_grad():
    def late(b, h, q_idx, kv_idx):
        return kv_idx > q_idx + 100  # nothing for every row

    def some(b, h, q_idx, kv_idx):
        return (q_idx >= 3) & (kv_idx <= q_idx)

    q, k, v = (torch.randn(1, 1, 10, 8, dtype=torch.float64, requires_grad=True) for _ in range(3))
    for mm in (late, some):
        bm = create_block_mask(mm, None, None, 10, 10, device="cpu", BLOCK_SIZE=4)
        out, lse = flex_attention(q, k, v, block_mask=bm, return_lse=True)
        empty = ~torch.isfinite(lse)
        assert empty[0, 0, :3].all()
        assert (out[empty] == 0).all() and not torch.isnan(out).any()
        (out.sum() + lse[torch.isfinite(lse)].sum()).backward()
        for t in (q, k, v):
            assert not torch.isnan(t.grad).any()
        assert (q.grad[0, 0, :3] == 0).all()
        for t in (q, k, v):
            t.grad = None


def test_cpu_backward_gradcheck_with_captured_bias():
    table = torch.randn(2, 2 * 9 - 1, dtype=torch.float64, requires_grad=True)
    ids = torch.tensor([0, 0, 0, 1, 1, 1, 1, 2, 2])

    def rel(score, b, h, q_idx, kv_idx):
        return score + table[h, kv_idx - q_idx + 8] * 0.5

    bm = create_block_mask(generate_doc_mask_mod(generate_causal_mask(), ids), None, None, 9, 9, device="cpu", BLOCK_SIZE=4)
    q = torch.randn(1, 2, 9, 5, dtype=torch.float64, requires_grad=True)
    k = torch.randn(1, 1, 9, 5, dtype=torch.float64, requires_grad=True)
    v = torch.randn(1, 1, 9, 3, dtype=torch.float64, requires_grad=True)

    def f(q, k, v, t):
        nonlocal table
        saved, table = table, t
        try:
            out, lse = flex_attention(q, k, v, score_mod=rel, block_mask=bm, enable_gqa=True, return_lse=True)
        finally:
            table = saved
        return out, lse

    assert torch.autograd.gradcheck(f, (q, k, v, table))


def test_math_path_memory_is_bounded_by_chunks():
    # peak live tensor bytes during forward+backward, tracked at the aten level
    from memory_tracker import PeakTensorMemory

    B, H, Lq, Lkv, E = 1, 2, 16384, 1024, 16
    q = torch.randn(B, H, Lq, E, requires_grad=True)
    k = torch.randn(B, H, Lkv, E, requires_grad=True)
    v = torch.randn(B, H, Lkv, E, requires_grad=True)
    full_scores = B * H * Lq * Lkv * 4
    with PeakTensorMemory() as mem:
        out = flex_attention(q, k, v, score_mod=generate_alibi_bias(H))
        out.sum().backward()
    assert mem.peak < full_scores / 4, f"peak {mem.peak} vs full score matrix {full_scores}"
    assert mem.largest < full_scores / 8


@settings(max_examples=25, deadline=None)
@given(B=st.integers(1, 2), Hkv=st.integers(1, 2), G=st.integers(1, 3), Lq=st.integers(1, 40), Lkv=st.integers(1, 40),
       E=st.integers(1, 20), Ev=st.integers(1, 20), w=st.integers(1, 50), c=st.floats(0.5, 5.0))
def test_hypothesis_math_path_vs_dense(B, Hkv, G, Lq, Lkv, E, Ev, w, c):
    q = torch.randn(B, Hkv * G, Lq, E, dtype=torch.float64)
    k = torch.randn(B, Hkv, Lkv, E, dtype=torch.float64)
    v = torch.randn(B, Hkv, Lkv, Ev, dtype=torch.float64)

    def mm(b, h, q_idx, kv_idx):
        return (q_idx - kv_idx).abs() < w

    def sm(score, b, h, q_idx, kv_idx):
        return c * torch.tanh(score / c) - 0.01 * h

    bm = create_block_mask(mm, None, None, Lq, Lkv, device="cpu", BLOCK_SIZE=8)
    out, lse = flex_attention(q, k, v, score_mod=sm, block_mask=bm, enable_gqa=True, return_lse=True)
    qq, kk = torch.arange(Lq)[:, None], torch.arange(Lkv)[None, :]
    heads = torch.arange(Hkv * G, dtype=torch.float64)[:, None, None]
    ref, ref_lse = dense_attention(q, k, v, allowed=(qq - kk).abs() < w,
                                   transform=lambda s: c * torch.tanh(s / c) - 0.01 * heads)
    torch.testing.assert_close(out, ref)
    torch.testing.assert_close(lse, ref_lse)
