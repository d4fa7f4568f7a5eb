"""lowering/index_wrap.py: PyTorch's negative-index wrap written into a mod's graph before Inductor
lowers it (Inductor's template modifications load at the raw index), only where an index can be
negative; and the compiled kernels against the float64 math path with negative indices."""
import pytest
import torch
from torch.fx.experimental.proxy_tensor import make_fx

from inductor_flex import create_block_mask, flex_attention
from inductor_flex.lowering.index_wrap import wrap_negative_indices

from conftest import assert_close_to_reference, assert_grads_close, reference64, reference_same_dtype
from cases import make_inputs

TABLE = torch.randn(16)
IDS = torch.tensor([0, 0, 1, 1, 2, 2, 3, 3])


def _graph(fn):
    # (1,)-shaped index tensors: make_fx turns a 0-d one into a Python int (the compiled graphs'
    # 0-d placeholders lower the same aten.index either way)
    idx = [torch.zeros((1,), dtype=torch.int32) for _ in range(4)]
    return make_fx(lambda b, h, q, kv, table, ids: fn(b, h, q, kv, table, ids))(*idx, TABLE, IDS)


def _wraps(fn) -> int:
    gm = wrap_negative_indices(_graph(fn), range(4))
    return sum(n.target is torch.ops.aten.where.self for n in gm.graph.nodes)


@pytest.mark.parametrize("fn, wraps", [
    (lambda b, h, q, kv, t, ids: t[q - kv], 1),                 # relative position: negative below the diagonal
    (lambda b, h, q, kv, t, ids: t[kv - 3], 1),
    (lambda b, h, q, kv, t, ids: t[-1 - q], 1),
    (lambda b, h, q, kv, t, ids: t[q % 5] + t[(q + kv) // 2], 0),  # built from never-negative parts
    (lambda b, h, q, kv, t, ids: t[torch.abs(q - kv)] + t[torch.maximum(q - kv, kv)], 0),
    (lambda b, h, q, kv, t, ids: t[(q - kv) % 16], 0),          # Python's % takes the divisor's sign
    (lambda b, h, q, kv, t, ids: t[ids[q]] + t[ids[kv] * 2 + h], 0),  # values read from a captured tensor
], ids=["q_minus_kv", "kv_minus_3", "minus_one_minus_q", "mod_and_floordiv", "abs_and_max", "mod_of_difference",
        "gathered_ids"])
def test_wrap_only_where_an_index_can_be_negative(fn, wraps):
    assert _wraps(fn) == wraps


def test_graph_without_a_negative_index_is_returned_as_is():
    gm = _graph(lambda b, h, q, kv, t, ids: t[q] * 2.0)
    assert wrap_negative_indices(gm, range(4)) is gm


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
def test_compiled_negative_indices_wrap_as_pytorch(interpreted_inductor, dtype):
    """A score_mod reading table[q_idx - kv_idx] and a mask_mod reading band[kv_idx - q_idx]: both
    index below 0 for half the scores; under torch.compile they must read the table's end, as the
    math path does (before the pass they read outside the table: max error 1.7). Forward and
    gradients vs float64."""
    L = 45
    table = torch.randn(2 * L)
    band = (torch.arange(2 * L) % 3 != 0)

    def rel(score, b, h, q_idx, kv_idx):
        return score + table[q_idx - kv_idx]

    def banded(b, h, q_idx, kv_idx):
        return band[kv_idx - q_idx] | (q_idx == kv_idx)

    bm = create_block_mask(banded, None, None, L, L, device="cpu", BLOCK_SIZE=16)
    q, k, v = make_inputs((1, 2, 2, L, L, 16, 16), dtype, "cpu", requires_grad=True)
    g = torch.randn(1, 2, L, 16, dtype=dtype)
    fn = torch.compile(lambda q, k, v: flex_attention(q, k, v, score_mod=rel, block_mask=bm), fullgraph=True)
    out = fn(q, k, v)
    grads = torch.autograd.grad(out, (q, k, v), g)
    ref_out, _, _ = reference64(q, k, v, rel, bm)
    low_out, _, _ = reference_same_dtype(q, k, v, rel, bm)
    assert_close_to_reference(out, ref_out, low_out, dtype, "out")
    assert_grads_close(q, k, v, grads, g, rel, bm, dtype)
