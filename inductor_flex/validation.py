"""Argument checks for flex_attention: every bad input gets an error naming the argument."""
from __future__ import annotations

import math
from typing import Any, Dict, Optional

import torch

from .block_mask import BlockMask

_FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)

BACKENDS = ("AUTO", "MATH", "TRITON", "TRITON_DECODE")

# kernel_options understood by this package (others raise, so typos never pass silently)
KNOWN_KERNEL_OPTIONS = {
    "BACKEND": str,
    "BLOCK_M": int,
    "BLOCK_N": int,
    "num_warps": int,
    "num_stages": int,
    "FAST_TANH": bool,
    "DETERMINISTIC": bool,
    "SPLIT_KV": int,
    # backward tiles: (BLOCK_M1, BLOCK_N1) of the dK/dV kernel, (BLOCK_M2, BLOCK_N2) of the dQ kernel
    "BLOCK_M1": int,
    "BLOCK_N1": int,
    "BLOCK_M2": int,
    "BLOCK_N2": int,
    # backward: accumulate dQ inside the dK/dV kernel with atomics instead of a separate dQ kernel
    "FUSED_DQ": bool,
    # the kernels walk the BlockMask refined to 64 x 64 blocks (default: when that saves 10% of the area)
    "REFINE_BLOCK_MASK": bool,
    # eager kernels compiled for the call's strides and lengths (default: the first layout of a
    # score_mod / mask_mod pair, for calls with enough work; kernel.py _specialize_layout)
    "SPECIALIZE_LAYOUT": bool,
    # the forward kernel loads K/V tiles through TMA tensor descriptors (default: kernel.py use_tma)
    "USE_TMA": bool,
    # warp-specialized forward configs (Hopper): False never, True only them, absent: autotuning picks
    "WARP_SPECIALIZE": bool,
    # the forward walks a BlockMask whose kv blocks form runs (causal, prefix-LM) with no index
    # loads, in one loop the warp-specialized config can take (default on; block_mask.block_runs)
    "KV_RUNS": bool,
    # a score_mod that is a * score + key bias + row bias runs as one FMA per score (kernel.use_separable)
    "SEPARABLE_SCORE_MOD": bool,
}


def use_fast_tanh(opts: Dict[str, Any], dtype: torch.dtype, on_gpu: bool) -> bool:
    """Whether mods print torch.tanh as the hardware tanh.approx.f32: kernel_options FAST_TANH,
    by default on for 16-bit inputs on the GPU. Its relative error (~2^-11) is at or under a 16-bit
    score's rounding, and the GPU tests hold it to the same-dtype error criterion; float32 inputs
    keep the exact formula unless asked, and the interpreter has no PTX."""
    if not on_gpu:
        return False
    flag = opts.get("FAST_TANH")
    return dtype in (torch.float16, torch.bfloat16) if flag is None else bool(flag)


def validate_kernel_options(kernel_options: Optional[Dict[str, Any]]) -> Dict[str, Any]:
    if kernel_options is None:
        return {"BACKEND": "AUTO"}
    if not isinstance(kernel_options, dict):
        raise TypeError(f"kernel_options must be a dict or None, got {type(kernel_options).__name__}")
    opts = dict(kernel_options)
    for k, v in opts.items():
        if k not in KNOWN_KERNEL_OPTIONS:
            raise ValueError(
                f"kernel_options: unknown key {k!r}; known keys are {sorted(KNOWN_KERNEL_OPTIONS)}"
            )
        want = KNOWN_KERNEL_OPTIONS[k]
        if want is int and (isinstance(v, bool) or not isinstance(v, int) or v <= 0):
            raise ValueError(f"kernel_options[{k!r}] must be a positive int, got {v!r}")
        if want is bool and not isinstance(v, bool):
            raise ValueError(f"kernel_options[{k!r}] must be a bool, got {v!r}")
    opts.setdefault("BACKEND", "AUTO")
    if opts["BACKEND"] not in BACKENDS:
        raise ValueError(f"kernel_options['BACKEND'] must be one of {BACKENDS}, got {opts['BACKEND']!r}")
    for k in ("BLOCK_M", "BLOCK_N", "BLOCK_M1", "BLOCK_N1", "BLOCK_M2", "BLOCK_N2"):
        if k in opts and (opts[k] < 16 or opts[k] & (opts[k] - 1)):
            raise ValueError(f"kernel_options[{k!r}] must be a power of two >= 16, got {opts[k]}")
    return opts


def validate_inputs(query, key, value, block_mask, scale, enable_gqa) -> None:
    names = ("query", "key", "value")
    tensors = (query, key, value)
    for n, t in zip(names, tensors):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{n} must be a torch.Tensor, got {type(t).__name__}")
        if t.dim() != 4:
            raise ValueError(f"{n} must be 4-D (batch, heads, seq_len, head_dim), got shape {tuple(t.shape)}")
        if t.dtype not in _FLOAT_DTYPES:
            raise TypeError(f"{n} must be float16, bfloat16, float32 or float64, got {t.dtype}")
        if any(s == 0 for s in t.shape):
            raise ValueError(f"{n} has a zero-size dimension: shape {tuple(t.shape)}")
    if not (query.dtype == key.dtype == value.dtype):
        raise TypeError(
            f"query, key and value must share one dtype, got query={query.dtype}, key={key.dtype}, value={value.dtype}"
        )
    if not (query.device == key.device == value.device):
        raise ValueError(
            f"query, key and value must be on one device, got query={query.device}, key={key.device}, value={value.device}"
        )
    B, Hq, Lq, E = query.shape
    Bk, Hkv, Lkv, Ek = key.shape
    Bv, Hv, Lv, Ev = value.shape
    if not (B == Bk == Bv):
        raise ValueError(f"batch sizes differ: query {B}, key {Bk}, value {Bv}")
    if Hkv != Hv:
        raise ValueError(f"key and value must have the same number of heads, got key {Hkv}, value {Hv}")
    if Lkv != Lv:
        raise ValueError(f"key and value must have the same sequence length, got key {Lkv}, value {Lv}")
    if E != Ek:
        raise ValueError(f"query and key head dims differ: query {E}, key {Ek}")
    if Hq != Hkv:
        if not enable_gqa:
            raise ValueError(
                f"query has {Hq} heads but key/value have {Hkv}; pass enable_gqa=True for grouped-query attention"
            )
        if Hq % Hkv != 0:
            raise ValueError(f"enable_gqa needs query heads ({Hq}) to be a multiple of key/value heads ({Hkv})")
    if scale is not None:
        if isinstance(scale, bool) or not isinstance(scale, (int, float)) or not math.isfinite(scale):
            raise ValueError(f"scale must be a finite float or None, got {scale!r}")
    if block_mask is not None:
        validate_block_mask(block_mask, B, Hq, Lq, Lkv, query.device)


def validate_block_mask(block_mask, B, Hq, Lq, Lkv, device) -> None:
    if not isinstance(block_mask, BlockMask):
        raise TypeError(f"block_mask must be a BlockMask or None, got {type(block_mask).__name__}")
    if block_mask.device != device and not (block_mask.device.type == device.type == "cuda"):
        raise ValueError(
            f"block_mask is on {block_mask.device} but query is on {device}; use block_mask.to({str(device)!r})"
        )
    q_bs, kv_bs = block_mask.BLOCK_SIZE
    n_q, n_kv = block_mask.num_blocks
    want_q, want_kv = math.ceil(Lq / q_bs), math.ceil(Lkv / kv_bs)
    if n_q != want_q or n_kv != want_kv:
        raise ValueError(
            f"block_mask was built for Q_LEN={block_mask.seq_lengths[0]}, KV_LEN={block_mask.seq_lengths[1]} "
            f"({n_q}x{n_kv} blocks of {q_bs}x{kv_bs}) but query/key have Q_LEN={Lq}, KV_LEN={Lkv} "
            f"(needs {want_q}x{want_kv} blocks); rebuild it with create_block_mask(..., {Lq}, {Lkv})"
        )
    mq, mkv = block_mask.seq_lengths
    if Lq > mq or Lkv > mkv:
        # same block counts but longer sequences: the new positions were never classified
        raise ValueError(
            f"block_mask was built for Q_LEN={mq}, KV_LEN={mkv} but query/key have Q_LEN={Lq}, KV_LEN={Lkv}; "
            f"rebuild it with create_block_mask(..., {Lq}, {Lkv})"
        )
    bm_b, bm_h = block_mask.kv_num_blocks.shape[:2]
    if bm_b not in (1, B):
        raise ValueError(f"block_mask has batch size {bm_b}; expected 1 (broadcast) or {B}")
    if bm_h not in (1, Hq):
        raise ValueError(f"block_mask has {bm_h} heads; expected 1 (broadcast) or the query's {Hq}")
