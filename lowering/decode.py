"""Compiled decode: short-query flex attention calls inside a torch.compile graph.

The forward template (lowering/template.py) tiles 128 query rows of one (batch, head): a decode
step, one query row per head with GQA, would read every K/V tile once per query head and leave
127 of 128 rows empty. So when a forward HOP has at most DECODE_MAX_LQ query rows (or BACKEND
"TRITON_DECODE"), its functionalization (inductor_flex/hop.py) emits one ``inductor_flex::flex_decode``
op instead. The mods are printed and the split-KV decode template is rendered at trace time (the
source is an argument of the op, so it shows in Inductor's output code); the captured tensors and
the BlockMask stay graph inputs; at run time the op launches the kernel through the eager path's
plan cache, split choice and autotuning (inductor_flex/decode.py). Its out and lse feed the fused
backward op like the forward kernel's would, so training with short queries works too.
"""
from __future__ import annotations

import math
from typing import Dict, List, Optional, Tuple

import torch

from inductor_flex import compat
from inductor_flex.validation import use_fast_tanh

from .kernel_op import _lib, _print_mods, _register, _uses_kernel

# kernel_options a compiled decode call may pin (0: not pinned)
_TUNING_KEYS = ("BLOCK_N", "num_warps", "num_stages", "SPLIT_KV")

_lib.define(
    "flex_decode(Tensor query, Tensor key, Tensor value, Tensor? kv_num_blocks, Tensor? kv_indices, "
    "Tensor? full_kv_num_blocks, Tensor? full_kv_indices, Tensor[] score_tensors, Tensor[] mask_tensors, "
    "str source, bool has_score_mod, float? scale, int[] block_size, int[] tuning) -> (Tensor, Tensor, Tensor)")

_plans: Dict[tuple, object] = {}


def flex_decode(
    query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
    kv_num_blocks: Optional[torch.Tensor], kv_indices: Optional[torch.Tensor],
    full_kv_num_blocks: Optional[torch.Tensor], full_kv_indices: Optional[torch.Tensor],
    score_tensors: List[torch.Tensor], mask_tensors: List[torch.Tensor],
    source: str, has_score_mod: bool, scale: Optional[float], block_size: List[int], tuning: List[int],
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    from inductor_flex import decode as D
    from inductor_flex.block_mask import BlockMask
    from inductor_flex.kernel import _default_block_mask
    from inductor_flex.printer import PrintedMod, mask_index_sources

    dense = kv_num_blocks is None
    mask_heads = 1 if dense else kv_num_blocks.shape[1]
    k = (source, tuple(query.shape), tuple(key.shape), tuple(value.shape), query.dtype, query.device,
         tuple(block_size), mask_heads, tuple(tuning))
    plan = _plans.get(k)
    if plan is None:
        opts = {name: v for name, v in zip(_TUNING_KEYS, tuning) if v}
        mask = PrintedMod("mask_mod", "", index_sources=mask_index_sources(source))
        plan = D.DecodePlan(query, key, value, PrintedMod("score_mod", ""), mask,
                            has_score_mod, tuple(block_size), mask_heads, opts, dense=dense, source=source)
        if len(_plans) > 256:
            _plans.clear()
        _plans[k] = plan
    # this call's captured tensors (graph inputs: new values, same plan)
    plan.score.tensors, plan.mask.tensors = score_tensors, mask_tensors
    Lq, Lkv = query.shape[2], key.shape[2]
    if dense:
        bm = _default_block_mask(Lq, Lkv, query.device)
    else:
        bm = BlockMask((Lq, Lkv), kv_num_blocks, kv_indices, full_kv_num_blocks, full_kv_indices,
                       None, None, None, None, tuple(block_size), None)
    scale = scale if scale is not None else 1.0 / math.sqrt(query.shape[-1])
    try:
        return D.run_decode(plan, query, key, value, bm, scale)
    finally:
        # keep no reference to this call's tensors past the call: under torch.compile's CUDA graphs
        # (mode "reduce-overhead") they may be graph intermediates from its memory pool, which must
        # not outlive the call (a dense call's launch views are of the cached default BlockMask,
        # allocated outside any graph pool: kept, so the next call does not rebuild them)
        if not dense:
            plan.mask_args = None
        plan.score.tensors, plan.mask.tensors = [], []


def _flex_decode_fake(query, key, value, kv_num_blocks, kv_indices, full_kv_num_blocks, full_kv_indices, score_tensors,
                      mask_tensors, source, has_score_mod, scale, block_size, tuning):
    from inductor_flex.hop import forward_meta

    out, lse, mx = forward_meta(query, key, value)
    return out.contiguous(), lse, mx


_register("flex_decode", flex_decode, _flex_decode_fake)


def try_decode_forward(query, key, value, score_mod, block_mask, scale, kernel_options, score_bufs, mask_bufs):
    """The flex_decode op call for a short-query forward HOP, or None when the call is no decode
    step (longer queries, BACKEND "MATH", shapes or mods the decode kernel does not take)."""
    from inductor_flex.decode import DECODE_MAX_LQ, decode_supports
    from inductor_flex.hop import identity_score
    from inductor_flex.kernel import template_hooks
    from inductor_flex.templates import render

    opts = dict(kernel_options or {})
    backend = opts.get("BACKEND", "AUTO")
    forced = backend == "TRITON_DECODE"
    if not forced and (backend not in ("AUTO", "TRITON") or query.shape[2] > DECODE_MAX_LQ
                       or opts.get("FORCE_USE_FLEX_ATTENTION")):
        return None
    block_size = None if block_mask[2] is None else (int(block_mask[10]), int(block_mask[11]))
    reason = decode_supports(query, key, value, block_size)
    if reason is not None and forced:
        raise ValueError(f"BACKEND 'TRITON_DECODE' cannot run this call: {reason}")
    if reason is not None or not _uses_kernel(query, key, value, block_mask, opts):
        return None
    fast_tanh = use_fast_tanh(opts, query.dtype, query.device.type == "cuda")
    with compat.disable_current_modes():
        mods = _print_mods(score_mod, block_mask, score_bufs, mask_bufs, query.device, fast_tanh, opts)
        if mods is None:
            return None
        sm, s_order, _, mm, m_order = mods
        source = render("flex_decode.py.jinja", **template_hooks(sm, mm))
    return torch.ops.inductor_flex.flex_decode(
        query, key, value, *block_mask[2:6], [score_bufs[i] for i in s_order], [mask_bufs[i] for i in m_order],
        source, score_mod is not identity_score, None if scale is None else float(scale),
        # (no BlockMask: the eager path's default 128 x 128 blocks, so tiles divide them)
        [128, 128] if block_size is None else list(block_size), [int(opts.get(name, 0)) for name in _TUNING_KEYS],
    )
