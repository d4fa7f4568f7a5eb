"""The flex attention HOPs called directly: dense, fake tensors, make_fx, functionalization, autograd."""
import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.fx.experimental.proxy_tensor import make_fx

from inductor_flex import create_block_mask
from inductor_flex.hop import (
    block_mask_tuple, flex_attention_backward_hop, flex_attention_hop, identity_score,
)
from inductor_flex.reference import math_attention
from inductor_flex.variants import generate_causal_mask, generate_doc_mask_mod

from cases import make_inputs


def _setup(L=40):
    g = torch.Generator().manual_seed(0)
    ids = torch.sort(torch.randint(0, 3, (L,), generator=g)).values
    bm = create_block_mask(generate_doc_mask_mod(generate_causal_mask(), ids), None, None, L, L, device="cpu",
                           BLOCK_SIZE=16)
    table = torch.randn(2, 2 * L - 1)

    def bias_mod(score, b, h, q_idx, kv_idx, table):
        return score + table[h, kv_idx - q_idx + L - 1]

    # the mask_mod with its captured tensors as trailing arguments, the HOP's convention
    cells = [c.cell_contents for c in bm.mask_mod.__closure__]
    ids_t, offsets = [c for c in cells if isinstance(c, torch.Tensor)][:2]
    inner = generate_causal_mask()

    def doc_mask(b, h, q_idx, kv_idx, ids_t, offsets):
        same = ids_t[q_idx] == ids_t[kv_idx]
        return same & inner(b, h, q_idx - offsets[ids_t[q_idx]], kv_idx - offsets[ids_t[kv_idx]])

    bm_t = (*block_mask_tuple(bm, L, L)[:-1], doc_mask)
    return bm, bm_t, table, bias_mod, (ids_t, offsets)


def test_dense_matches_math_path():
    L = 40
    bm, bm_t, table, bias_mod, mask_bufs = _setup(L)
    q, k, v = make_inputs((1, 2, 2, L, L, 16, 8), torch.float64, "cpu")
    out, lse, mx = flex_attention_hop(q, k, v, bias_mod, bm_t, None, {}, (table,), mask_bufs)
    ref = math_attention(q, k, v, lambda s, b, h, m, n: bias_mod(s, b, h, m, n, table), bm)
    for a, r in zip((out, lse, mx), ref):
        torch.testing.assert_close(a, r)


def test_no_block_mask_tuple():
    q, k, v = make_inputs((1, 2, 2, 20, 33, 16, 16), torch.float32, "cpu")
    out, lse, _ = flex_attention_hop(q, k, v, identity_score, block_mask_tuple(None, 20, 33), 0.3, {})
    ref, ref_lse, _ = math_attention(q, k, v, None, None, 0.3)
    torch.testing.assert_close(out, ref)
    torch.testing.assert_close(lse, ref_lse)


@pytest.mark.parametrize("dtype", [torch.float16, torch.float32, torch.float64], ids=["fp16", "fp32", "fp64"])
def test_fake_tensor_shapes(dtype):
    L = 40
    _, bm_t, table, bias_mod, mask_bufs = _setup(L)
    with FakeTensorMode() as mode:
        q, k, v = (mode.from_tensor(t) for t in make_inputs((2, 4, 2, L, L, 16, 24), dtype, "cpu"))
        fbm = tuple(mode.from_tensor(x) if isinstance(x, torch.Tensor) else x for x in bm_t)
        out, lse, mx = flex_attention_hop(q, k, v, bias_mod, fbm, None, {}, (mode.from_tensor(table),),
                                          tuple(mode.from_tensor(t) for t in mask_bufs))
    stats = torch.float64 if dtype == torch.float64 else torch.float32
    assert out.shape == (2, 4, L, 24) and out.dtype == dtype
    assert lse.shape == mx.shape == (2, 4, L) and lse.dtype == mx.dtype == stats


def _hop_taking_tensors(bm_t, bias_mod):
    """The HOP call as a function of tensors only (what make_fx traces): the BlockMask tuple's
    tensors come in as trailing arguments, in order."""
    def f(q, k, v, table, ids_t, offsets, *bm_tensors):
        it = iter(bm_tensors)
        bmx = tuple(next(it) if isinstance(x, torch.Tensor) else x for x in bm_t)
        return flex_attention_hop(q, k, v, bias_mod, bmx, None, {}, (table,), (ids_t, offsets))

    return f


def test_make_fx_turns_mods_into_subgraphs():
    L = 40
    bm, bm_t, table, bias_mod, mask_bufs = _setup(L)
    q, k, v = make_inputs((1, 2, 2, L, L, 16, 16), torch.float32, "cpu")
    tensors = [x for x in bm_t if isinstance(x, torch.Tensor)]
    f = _hop_taking_tensors(bm_t, bias_mod)
    gm = make_fx(f, tracing_mode="fake")(q, k, v, table, *mask_bufs, *tensors)
    (node,) = [n for n in gm.graph.nodes if n.target is flex_attention_hop]
    score_gm = getattr(gm, node.args[3].target)
    mask_gm = getattr(gm, node.args[4][-1].target)
    assert isinstance(score_gm, torch.fx.GraphModule) and isinstance(mask_gm, torch.fx.GraphModule)
    # captured tensors index through aten.index (a gather), with the operands as placeholders
    assert any(n.target is torch.ops.aten.index.Tensor for n in score_gm.graph.nodes)
    assert len([n for n in score_gm.graph.nodes if n.op == "placeholder"]) == 6
    got = gm(q, k, v, table, *mask_bufs, *tensors)
    ref = f(q, k, v, table, *mask_bufs, *tensors)
    for a, r in zip(got, ref):
        torch.testing.assert_close(a, r)


def test_functionalized_trace_runs():
    L = 32
    bm, bm_t, table, bias_mod, mask_bufs = _setup(L)
    q, k, v = make_inputs((1, 2, 2, L, L, 16, 16), torch.float32, "cpu")

    tensors = [x for x in bm_t if isinstance(x, torch.Tensor)]

    def f(*args):
        return _hop_taking_tensors(bm_t, bias_mod)(*args)[0]

    args = (q, k, v, table, *mask_bufs, *tensors)
    gm = make_fx(torch.func.functionalize(f), tracing_mode="fake")(*args)
    assert any(n.target is flex_attention_hop for n in gm.graph.nodes)
    torch.testing.assert_close(gm(*args), f(*args))


def test_autograd_through_hop_and_backward_hop():
    L = 37
    bm, bm_t, table, bias_mod, mask_bufs = _setup(L)
    q, k, v = make_inputs((1, 2, 2, L, L, 16, 16), torch.float64, "cpu", requires_grad=True)
    table = table.double().requires_grad_(True)
    out, lse, _ = flex_attention_hop(q, k, v, bias_mod, bm_t, None, {}, (table,), mask_bufs)
    grads = torch.autograd.grad(out.sum() + lse.sum(), (q, k, v, table))
    o, l, _ = math_attention(q, k, v, lambda s, b, h, m, n: bias_mod(s, b, h, m, n, table), bm)
    ref = torch.autograd.grad(o.sum() + l.sum(), (q, k, v, table))
    for g, r in zip(grads, ref):
        torch.testing.assert_close(g, r)
    # the backward HOP on its own returns the same gradients
    dq, dk, dv, (dtable,) = flex_attention_backward_hop(
        q.detach(), k.detach(), v.detach(), out.detach(), lse.detach(), torch.ones_like(out), torch.ones_like(lse),
        bias_mod, None, bm_t, None, {}, (table.detach(),), mask_bufs)
    for g, r in zip((dq, dk, dv, dtable), ref):
        torch.testing.assert_close(g, r)


def test_captured_non_tensor_is_rejected():
    q, k, v = make_inputs((1, 1, 1, 16, 16, 16, 16), torch.float32, "cpu")
    with pytest.raises(TypeError, match="score_mod captures a str"):
        flex_attention_hop(q, k, v, identity_score, block_mask_tuple(None, 16, 16), None, {}, ("x",), ())
