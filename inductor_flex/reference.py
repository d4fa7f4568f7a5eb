"""The math path: flex attention written with plain torch ops, one chunk of queries at a time.

It is the CPU fallback, the backward of last resort, and the oracle every test compares against
(run it in float64 for the "true" answer). Peak extra memory is O(chunk · KV_LEN) per (b, h): the
(B, H, Q_LEN, KV_LEN) score matrix never exists. Under autograd each chunk is checkpointed, so
backward recomputes one chunk at a time instead of keeping every chunk's scores alive.
"""
from __future__ import annotations

from typing import Callable, Optional, Tuple

import torch
from torch.utils.checkpoint import checkpoint

from .block_mask import BlockMask
from .mods import eval_mask_grid, eval_score_grid

# Scores evaluated per chunk across all (b, h): about 1M elements (4 MB in fp32).
DEFAULT_CHUNK_ELEMS = 1 << 20


def _working_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _chunk_forward(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, q0: int,
    score_mod: Optional[Callable], mask_mod: Optional[Callable],
    partial_map: Optional[torch.Tensor], full_map: Optional[torch.Tensor], block_size: Tuple[int, int],
    scale: float,
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Attention of query rows q0 .. q0 + q.shape[2] against all keys. Returns out, lse, max."""
    B, Hq, C, _ = q.shape
    Hkv, L = k.shape[1], k.shape[2]
    G = Hq // Hkv
    wdt = _working_dtype(q.dtype)
    dev = q.device
    # (B, Hkv, G, C, E) @ (B, Hkv, 1, E, L): GQA without materialising repeated K/V
    s = torch.matmul(q.view(B, Hkv, G, C, -1), k.unsqueeze(2).transpose(-1, -2)).view(B, Hq, C, L)
    s = s.to(wdt) * scale
    b_idx = torch.arange(B, device=dev)
    h_idx = torch.arange(Hq, device=dev)
    q_idx = torch.arange(q0, q0 + C, device=dev)
    kv_idx = torch.arange(L, device=dev)
    if score_mod is not None:
        s = eval_score_grid(score_mod, s, b_idx, h_idx, q_idx, kv_idx).to(wdt)
    if partial_map is not None:
        qb = q_idx // block_size[0]
        kb = kv_idx // block_size[1]
        part = partial_map.expand(B, Hq, -1, -1)[:, :, qb][:, :, :, kb]
        full = full_map.expand(B, Hq, -1, -1)[:, :, qb][:, :, :, kb]
        keep = full | (part & eval_mask_grid(mask_mod, b_idx, h_idx, q_idx, kv_idx))
    elif mask_mod is not None:
        keep = eval_mask_grid(mask_mod, b_idx, h_idx, q_idx, kv_idx)
    else:
        keep = None
    if keep is not None:
        s = s.masked_fill(~keep, float("-inf"))
    # softmax with fully-masked rows -> p = 0, lse = -inf, and no NaN in forward or backward
    m = s.amax(dim=-1, keepdim=True).detach()
    m_safe = torch.where(torch.isinf(m), torch.zeros_like(m), m)
    e = torch.exp(s - m_safe)
    denom = e.sum(dim=-1, keepdim=True)
    empty = denom == 0
    denom_safe = torch.where(empty, torch.ones_like(denom), denom)
    p = e / denom_safe
    lse = torch.where(empty, torch.full_like(denom, float("-inf")), torch.log(denom_safe) + m_safe)
    pv = p.to(v.dtype).view(B, Hkv, G, C, L)
    out = torch.matmul(pv, v.unsqueeze(2)).view(B, Hq, C, -1)
    max_scores = s.amax(dim=-1).detach() if L > 0 else s.new_full((B, Hq, C), float("-inf"))
    return out, lse.squeeze(-1).to(torch.float32 if wdt == torch.float32 else wdt), max_scores.to(lse.dtype)


def math_attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    score_mod: Optional[Callable] = None,
    block_mask: Optional[BlockMask] = None,
    scale: Optional[float] = None,
    chunk_elems: int = DEFAULT_CHUNK_ELEMS,
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Flex attention by the definition. Returns (out, lse, max_scores); lse/max are float32
    (float64 for float64 inputs) of shape (B, Hq, Lq). Inputs are assumed validated, with
    K/V already holding Hkv heads (GQA handled here)."""
    B, Hq, Lq, E = query.shape
    Lkv = key.shape[2]
    if scale is None:
        scale = 1.0 / (E ** 0.5)
    if block_mask is not None:
        partial_map, full_map = block_mask.partial_blocks(), block_mask.full_blocks()
        mask_mod, block_size = block_mask.mask_mod, block_mask.BLOCK_SIZE
    else:
        partial_map = full_map = mask_mod = None
        block_size = (1, 1)
    rows = max(1, chunk_elems // max(1, B * Hq * Lkv))
    outs, lses, maxes = [], [], []
    for q0 in range(0, Lq, rows):
        q_chunk = query[:, :, q0:q0 + rows]
        args = (q_chunk, key, value, q0, score_mod, mask_mod, partial_map, full_map, block_size, scale)
        if torch.is_grad_enabled():
            # checkpoint also covers tensors captured by the mods (they may require grad even
            # when q/k/v do not): backward recomputes one chunk at a time
            o, l, m = checkpoint(_chunk_forward, *args, use_reentrant=False)
        else:
            o, l, m = _chunk_forward(*args)
        outs.append(o)
        lses.append(l)
        maxes.append(m)
    return torch.cat(outs, dim=2), torch.cat(lses, dim=2), torch.cat(maxes, dim=2)
