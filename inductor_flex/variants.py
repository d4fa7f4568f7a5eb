"""A gallery of attention variants, one small factory each (in the spirit of attention-gym).

Every factory returns a score_mod or mask_mod whose ``__name__`` says what it is; its docstring
states the assumption it makes. ``docs/gallery.md`` shows each mask as a BlockMask picture.
"""
from __future__ import annotations

from typing import Callable

import torch

from .mods import and_masks, or_masks


def _named(fn: Callable, name: str) -> Callable:
    fn.__name__ = name
    fn.__qualname__ = name
    return fn


def generate_causal_mask() -> Callable:
    """Causal: query i sees keys j <= i (queries and keys share one position axis)."""

    def causal(b, h, q_idx, kv_idx):
        return q_idx >= kv_idx

    return _named(causal, "causal")


def generate_sliding_window(window: int) -> Callable:
    """Causal sliding window: query i sees keys in (i - window, i]."""

    def sliding_window(b, h, q_idx, kv_idx):
        return (q_idx >= kv_idx) & (q_idx - kv_idx < window)

    return _named(sliding_window, f"sliding_window_{window}")


def generate_prefix_lm_mask(prefix_length: int) -> Callable:
    """Prefix-LM: the first ``prefix_length`` keys are visible to every query, the rest causally."""

    def prefix(b, h, q_idx, kv_idx):
        return kv_idx < prefix_length

    return _named(or_masks(generate_causal_mask(), _named(prefix, "prefix")), f"prefix_lm_{prefix_length}")


def generate_doc_mask_mod(mask_mod: Callable, document_ids: torch.Tensor) -> Callable:
    """Document masking for packed sequences: ``document_ids[i]`` is the document of token i
    (non-decreasing). Tokens attend only within their document, where ``mask_mod`` is applied
    to positions relative to the document's start."""
    counts = torch.bincount(document_ids.to(torch.int64))
    offsets = torch.cat([counts.new_zeros(1), counts.cumsum(0)[:-1]]).to(document_ids.device)

    def doc_mask(b, h, q_idx, kv_idx):
        same = document_ids[q_idx] == document_ids[kv_idx]
        q_rel = q_idx - offsets[document_ids[q_idx]]
        kv_rel = kv_idx - offsets[document_ids[kv_idx]]
        return same & mask_mod(b, h, q_rel, kv_rel)

    return _named(doc_mask, f"document_{getattr(mask_mod, '__name__', 'mask')}")


def generate_alibi_bias(num_heads: int) -> Callable:
    """ALiBi: a per-head linear penalty on distance, slopes 2^(-8(h+1)/H) (Press et al.)."""

    def alibi(score, b, h, q_idx, kv_idx):
        slope = torch.exp2(-8.0 * (h + 1) / num_heads)
        return score + slope * (kv_idx - q_idx)

    return _named(alibi, f"alibi_{num_heads}")


def generate_tanh_softcap(soft_cap: float, approx: bool = False) -> Callable:
    """Logit soft-capping (Gemma 2, Grok): score -> cap * tanh(score / cap). ``approx`` is only a
    label: the GPU kernels use the hardware tanh for 16-bit inputs unless kernel_options has
    FAST_TANH=False (and for float32 only with FAST_TANH=True)."""

    def softcap(score, b, h, q_idx, kv_idx):
        return soft_cap * torch.tanh(score / soft_cap)

    return _named(softcap, f"softcap_{soft_cap:g}")


def generate_relative_bias(table: torch.Tensor) -> Callable:
    """Learned relative-position bias: ``table`` is (H, 2L - 1), indexed by kv_idx - q_idx + L - 1
    (T5/Swin-style). Gradients flow into ``table`` when it requires grad."""
    offset = (table.shape[-1] + 1) // 2 - 1

    def relative_bias(score, b, h, q_idx, kv_idx):
        return score + table[h, kv_idx - q_idx + offset]

    return _named(relative_bias, "relative_bias")


def generate_head_scale(scales: torch.Tensor) -> Callable:
    """Per-head temperature: score * scales[h]."""

    def head_scale(score, b, h, q_idx, kv_idx):
        return score * scales[h]

    return _named(head_scale, "head_scale")


def generate_natten_mask(canvas_w: int, canvas_h: int, kernel_w: int, kernel_h: int) -> Callable:
    """Neighbourhood attention (NATTEN) on a row-major canvas_h x canvas_w image: a token sees the
    kernel_h x kernel_w window centred on it, shifted inwards at the borders."""

    def coord(idx):
        return idx // canvas_w, idx % canvas_w

    def natten(b, h, q_idx, kv_idx):
        q_y, q_x = coord(q_idx)
        k_y, k_x = coord(kv_idx)
        c_x = torch.clamp(q_x, kernel_w // 2, canvas_w - 1 - kernel_w // 2)
        c_y = torch.clamp(q_y, kernel_h // 2, canvas_h - 1 - kernel_h // 2)
        return ((c_x - k_x).abs() <= kernel_w // 2) & ((c_y - k_y).abs() <= kernel_h // 2)

    return _named(natten, f"natten_{canvas_h}x{canvas_w}_k{kernel_h}x{kernel_w}")


def generate_dilated_sliding_window(window: int, dilation: int) -> Callable:
    """Dilated sliding window: every ``dilation``-th key within ``window`` positions, either side."""

    def dilated(b, h, q_idx, kv_idx):
        diff = (q_idx - kv_idx).abs()
        return (diff <= window) & (diff % dilation == 0)

    return _named(dilated, f"dilated_window_{window}_d{dilation}")


def generate_random_block_mask_mod(num_q_blocks: int, num_kv_blocks: int, block: int, density: float,
                                   seed: int = 0, device="cpu") -> Callable:
    """Random block sparsity: a fixed random (q block, kv block) pattern; the diagonal is kept so
    no row is empty."""
    g = torch.Generator().manual_seed(seed)
    keep = torch.rand(num_q_blocks, num_kv_blocks, generator=g) < density
    n = min(num_q_blocks, num_kv_blocks)
    keep[torch.arange(n), torch.arange(n)] = True
    keep = keep.to(device)

    def random_blocks(b, h, q_idx, kv_idx):
        return keep[q_idx // block, kv_idx // block]

    return _named(random_blocks, f"random_blocks_{density:g}")


__all__ = [n for n in dir() if n.startswith("generate_")] + ["and_masks", "or_masks"]
