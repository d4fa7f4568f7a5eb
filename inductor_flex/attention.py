"""The public ``flex_attention`` entry point: validation, backend choice, return conventions."""
from __future__ import annotations

import logging
import warnings
from dataclasses import dataclass
from typing import Callable, Optional, Tuple, Union

import torch

from .block_mask import BlockMask, kernel_block_mask
from .mods import FlexModError, check_arity
from .reference import math_attention
from .validation import validate_inputs, validate_kernel_options

log = logging.getLogger("inductor_flex")


@dataclass(frozen=True)
class AuxRequest:
    """Which auxiliary outputs to return alongside the attention output."""

    lse: bool = False
    max_scores: bool = False


@dataclass
class AuxOutput:
    """Auxiliary outputs: natural-log logsumexp and row max of the (modded) scores, (B, Hq, Lq)."""

    lse: Optional[torch.Tensor] = None
    max_scores: Optional[torch.Tensor] = None


def _choose_backend(opts, query, score_mod, block_mask) -> str:
    backend = opts["BACKEND"]
    if backend != "AUTO":
        return backend
    if query.device.type == "cuda" and query.dtype != torch.float64:
        from .kernel import kernel_supports

        reason = kernel_supports(query.shape[-1], None, block_mask)
        if reason is None:
            return "TRITON"
        log.info("inductor_flex: using the math path (%s)", reason)
    return "MATH"


def flex_attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    score_mod: Optional[Callable] = None,
    block_mask: Optional[BlockMask] = None,
    scale: Optional[float] = None,
    enable_gqa: bool = False,
    return_lse: bool = False,
    kernel_options: Optional[dict] = None,
    *,
    return_aux: Optional[AuxRequest] = None,
) -> Union[torch.Tensor, Tuple[torch.Tensor, torch.Tensor], Tuple[torch.Tensor, AuxOutput]]:
    """softmax(score_mod(Q Kᵀ · scale) masked by block_mask) V, as one fused kernel where possible.

    query (B, Hq, Lq, E), key (B, Hkv, Lkv, E), value (B, Hkv, Lkv, Ev). ``score_mod(score, b, h,
    q_idx, kv_idx)`` edits each score; ``block_mask`` (from create_block_mask) skips blocks and
    applies its mask_mod. Rows with nothing to attend give 0 output and -inf lse.
    """
    if torch.compiler.is_dynamo_compiling():
        return _flex_attention_traced(
            query, key, value, score_mod, block_mask, scale, enable_gqa, return_lse, kernel_options, return_aux
        )
    return _flex_attention_eager(
        query, key, value, score_mod, block_mask, scale, enable_gqa, return_lse, kernel_options, return_aux
    )


def traced_block_mask_facts(block_mask: Optional[BlockMask], opts: dict) -> dict:
    """What the kernels may assume of a BlockMask's lists, as private kernel options a compiled graph
    holds as constants (Dynamo guards these attributes): its runs per side (block_mask.block_runs,
    read by create_block_mask; False where not known, as for a mask built while tracing), whether
    each row's blocks are one run together, per side (block_mask.union_run) and whether its full blocks came
    from its mask_mod."""
    if block_mask is None or opts.get("KV_RUNS") is False:
        return {}
    return {"_KV_RUNS": block_mask._runs_kv is True, "_Q_RUNS": block_mask._runs_q is True,
            "_KV_UNION": block_mask._union_kv is True, "_Q_UNION": block_mask._union_q is True,
            "_FULL_FROM_MASK_MOD": bool(block_mask.full_from_mask_mod)}


def _check_return_options(return_lse, return_aux) -> None:
    if return_aux is not None and not isinstance(return_aux, AuxRequest):
        raise TypeError(f"return_aux must be an AuxRequest or None, got {type(return_aux).__name__}")
    if return_lse and return_aux is not None:
        raise ValueError("pass either return_lse=True or return_aux=AuxRequest(lse=True), not both")


def _package(out, lse, max_scores, return_lse, return_aux):
    if return_aux is not None:
        return out, AuxOutput(lse=lse if return_aux.lse else None, max_scores=max_scores if return_aux.max_scores else None)
    if return_lse:
        return out, lse
    return out


def _flex_attention_traced(query, key, value, score_mod, block_mask, scale, enable_gqa, return_lse,
                           kernel_options, return_aux):
    # Under Dynamo: the same checks (they only read shapes, dtypes and Python values), then the
    # HOP, which Dynamo captures with the mods as subgraphs and their captured tensors as operands.
    from .hop import block_mask_tuple, flex_attention_hop, identity_score

    validate_inputs(query, key, value, block_mask, scale, enable_gqa)
    _check_return_options(return_lse, return_aux)
    opts = validate_kernel_options(kernel_options)
    # mask_mod cannot be evaluated while tracing: the refinement create_block_mask kept, if any
    kbm = kernel_block_mask(block_mask, opts)
    opts.update(traced_block_mask_facts(kbm, opts))
    bm = block_mask_tuple(kbm, query.shape[2], key.shape[2])
    out, lse, max_scores = flex_attention_hop(
        query, key, value, identity_score if score_mod is None else score_mod, bm, scale, opts
    )
    return _package(out, lse, max_scores, return_lse, return_aux)


@torch.compiler.disable
def _flex_attention_eager(query, key, value, score_mod, block_mask, scale, enable_gqa, return_lse,
                          kernel_options, return_aux):
    validate_inputs(query, key, value, block_mask, scale, enable_gqa)
    check_arity(score_mod, "score_mod")
    _check_return_options(return_lse, return_aux)
    opts = validate_kernel_options(kernel_options)
    backend = _choose_backend(opts, query, score_mod, block_mask)
    if backend == "MATH":
        out, lse, max_scores = math_attention(query, key, value, score_mod, block_mask, scale)
    else:
        from .kernel import kernel_attention

        try:
            out, lse, max_scores = kernel_attention(query, key, value, score_mod, block_mask, scale, opts)
        except FlexModError as e:
            if opts["BACKEND"] != "AUTO" or "not supported by the Triton kernel" not in str(e):
                raise
            # AUTO keeps working for mods the printer cannot translate; TRITON would raise
            warnings.warn(f"inductor_flex: {e}; falling back to the math path", stacklevel=2)
            out, lse, max_scores = math_attention(query, key, value, score_mod, block_mask, scale)
    return _package(out, lse, max_scores, return_lse, return_aux)
