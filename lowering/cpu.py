"""CPU under Inductor: the flex attention HOPs decomposed into chunked aten code.

When Inductor's AOT trace meets ``flex_attention_hop`` (or its backward) on CPU tensors, the
HOP is replaced in the traced graph by this decomposition: the queries are processed in a fixed
number of row chunks, each one ``q_chunk @ kᵀ`` -> score_mod / mask_mod (the subgraphs, applied
over the chunk's index grid) -> safe softmax -> ``@ v``. Inductor then fuses each chunk's
pointwise and reduction work into C++ kernels. The largest intermediate is one chunk's scores,
``B·H·rows·Lkv`` with ``rows`` chosen so that this stays near ``CHUNK_ELEMS``: the full
``B·H·Lq·Lkv`` matrix never exists. The backward recomputes each chunk and differentiates it
locally (autograd traced into aten code), so it is bounded the same way.
"""
from __future__ import annotations

import math
from typing import Callable, List, Optional, Tuple

import torch

# scores per chunk across all (b, h): 4M elements, 16 MB in fp32
CHUNK_ELEMS = 1 << 22
# keeps compile time sane for very long sequences (each chunk is unrolled into the graph)
MAX_CHUNKS = 64


def _hint(x) -> int:
    if isinstance(x, torch.SymInt):
        return x.node.hint if x.node.hint is not None else 4096
    return int(x)


def chunk_rows(B, H, Lq, Lkv) -> Tuple[object, int]:
    """(rows per chunk, number of chunks); rows may be symbolic, the count never is."""
    total = _hint(B) * _hint(H) * _hint(Lq) * _hint(Lkv)
    n = min(MAX_CHUNKS, max(1, math.ceil(total / CHUNK_ELEMS)), max(1, _hint(Lq)))
    if n == 1:
        return Lq, 1
    return (Lq + n - 1) // n, n


def _block_map(num: torch.Tensor, idx: torch.Tensor, n_cols) -> torch.Tensor:
    """(count, indices) -> bool (..., n_cols), without in-place ops (this runs inside a trace)."""
    slots = torch.arange(idx.shape[-1], device=idx.device)
    valid = slots < num.unsqueeze(-1).to(torch.int64)
    cols = torch.arange(n_cols, device=idx.device)
    hit = (idx.unsqueeze(-1).to(torch.int64) == cols) & valid.unsqueeze(-1)
    return hit.any(dim=-2)


def _maps(bm: tuple):
    if bm[2] is None:
        return None, None, None
    n_kv = bm[3].shape[-1]
    partial = _block_map(bm[2], bm[3], n_kv)
    full = _block_map(bm[4], bm[5], n_kv) if bm[4] is not None else torch.zeros_like(partial)
    return partial, full, (bm[10], bm[11])


def _bind(fn: Callable, bufs, device) -> Callable:
    if not bufs:
        return fn
    bufs = [_operand(b, device) for b in bufs]

    def bound(*args):
        return fn(*args, *bufs)

    return bound


def _operand(b, device):
    """A captured symbolic number (a Python int the mod closes over, under dynamic=True) as a 0-d
    tensor on ``device``: the mods run under vmap here, whose scalar handling rejects SymInts
    (score / n with n a SymInt failed: "x must be Tensor or scalar, got SymInt"). The values are
    the same; a 0-d tensor takes part in type promotion much as the number would (an int as int64)."""
    for kind, dtype in ((torch.SymBool, torch.bool), (torch.SymInt, torch.int64),
                        (torch.SymFloat, torch.get_default_dtype())):
        if isinstance(b, kind):
            return torch.full((), b, dtype=dtype, device=device)
    return b


def _bounds(i: int, rows, length):
    # clamped to the length, so a symbolic length shorter than the traced one (fewer rows in the
    # last chunks, or none) needs no new guard
    if isinstance(rows, torch.SymInt) or isinstance(length, torch.SymInt):
        return torch.sym_min(i * rows, length), torch.sym_min((i + 1) * rows, length)
    return min(i * rows, length), min((i + 1) * rows, length)


def _plan(q, k):
    B, H, Lq, _ = q.shape
    return chunk_rows(B, H, Lq, k.shape[2])


def chunked_forward(query, key, value, score_mod, block_mask, scale, score_bufs, mask_bufs):
    from inductor_flex.reference import _chunk_forward

    partial, full, bs = _maps(block_mask)
    mask_mod = _bind(block_mask[12], mask_bufs, query.device) if partial is not None else None
    sm = _bind(score_mod, score_bufs, query.device)
    if scale is None:
        scale = 1.0 / math.sqrt(query.shape[-1])
    rows, n = _plan(query, key)
    outs, lses, maxes = [], [], []
    for i in range(n):
        q0, q1 = _bounds(i, rows, query.shape[2])
        o, l, m = _chunk_forward(query[:, :, q0:q1], key, value, q0, sm, mask_mod, partial, full, bs or (1, 1), scale)
        outs.append(o)
        lses.append(l)
        maxes.append(m)
    if n == 1:
        return outs[0], lses[0], maxes[0]
    return torch.cat(outs, dim=2), torch.cat(lses, dim=2), torch.cat(maxes, dim=2)


def chunked_backward(query, key, value, out, lse, grad_out, grad_lse, score_mod, block_mask, scale, score_bufs,
                     mask_bufs):
    """Gradients by recomputing one chunk at a time and differentiating it; call with autograd
    enabled. Returns (dq, dk, dv, grads of the floating-point score_mod buffers)."""
    from inductor_flex.reference import _chunk_forward

    partial, full, bs = _maps(block_mask)
    mask_mod = _bind(block_mask[12], mask_bufs, query.device) if partial is not None else None
    if scale is None:
        scale = 1.0 / math.sqrt(query.shape[-1])
    k = key.detach().requires_grad_(True)
    v = value.detach().requires_grad_(True)
    bufs = [b.detach().requires_grad_(True) if _floating(b) else b for b in score_bufs]
    diff_bufs = [b for b in bufs if _floating(b)]
    sm = _bind(score_mod, bufs, query.device)
    rows, n = _plan(query, key)
    dqs: List[torch.Tensor] = []
    dk = dv = None
    dbufs: List[Optional[torch.Tensor]] = [None] * len(diff_bufs)
    for i in range(n):
        q0, q1 = _bounds(i, rows, query.shape[2])
        qc = query[:, :, q0:q1].detach().requires_grad_(True)
        o, l, _ = _chunk_forward(qc, k, v, q0, sm, mask_mod, partial, full, bs or (1, 1), scale)
        outs, grads = [o], [grad_out[:, :, q0:q1]]
        if grad_lse is not None:
            outs.append(l)
            grads.append(grad_lse[:, :, q0:q1].to(l.dtype))
        res = torch.autograd.grad(outs, [qc, k, v] + diff_bufs, grads, allow_unused=True)
        dqs.append(res[0] if res[0] is not None else torch.zeros_like(qc))
        dk = _acc(dk, res[1])
        dv = _acc(dv, res[2])
        dbufs = [_acc(a, g) for a, g in zip(dbufs, res[3:])]
    dq = dqs[0] if n == 1 else torch.cat(dqs, dim=2)
    dk = torch.zeros_like(key) if dk is None else dk
    dv = torch.zeros_like(value) if dv is None else dv
    it = iter(dbufs)
    out_bufs = []
    for b in score_bufs:
        if _floating(b):
            g = next(it)
            out_bufs.append(torch.zeros_like(b) if g is None else g)
        else:
            out_bufs.append(None)
    return dq.detach(), dk.detach(), dv.detach(), tuple(None if g is None else g.detach() for g in out_bufs)


def _acc(total, g):
    if g is None:
        return total
    return g if total is None else total + g


def _floating(b) -> bool:
    return isinstance(b, torch.Tensor) and b.dtype.is_floating_point
