"""Argument checks for flex_attention: every bad input gets an error naming the argument."""
from __future__ import annotations

import math
from typing import Any, Dict, Optional, TypedDict

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
    # the hand-scheduled Gluon forward for dense and causal calls without a score_mod (Hopper;
    # gluon_forward.py): False never, absent where it applies
    "GLUON": bool,
    # the forward walks a BlockMask whose kv blocks form runs (causal, prefix-LM) with no index
    # loads, in one loop the warp-specialized config can take (default on; block_mask.block_runs)
    "KV_RUNS": bool,
    # a score_mod that is a * score + key bias + row bias runs as one FMA per score (kernel.use_separable)
    "SEPARABLE_SCORE_MOD": bool,
    # PyTorch's knob: never the decode kernel, the forward kernel for short queries too
    "FORCE_USE_FLEX_ATTENTION": bool,
}


class FlexKernelOptions(TypedDict, total=False):
    """Type of ``kernel_options`` (a plain dict works as well); the guide's kernel_options section
    says what each key does. PyTorch's keys are accepted too (COMPAT_KERNEL_OPTIONS), and any key
    read by one pass may carry a "fwd_" / "bwd_" prefix, e.g. "bwd_BLOCK_M1", "fwd_num_warps"."""

    # spelled out for type checkers, which cannot read a TypedDict built from the two dicts; a test
    # holds these keys to KNOWN_KERNEL_OPTIONS | COMPAT_KERNEL_OPTIONS

    BACKEND: str
    BLOCK_M: int
    BLOCK_N: int
    num_warps: int
    num_stages: int
    FAST_TANH: bool
    DETERMINISTIC: bool
    SPLIT_KV: int
    BLOCK_M1: int
    BLOCK_N1: int
    BLOCK_M2: int
    BLOCK_N2: int
    FUSED_DQ: bool
    REFINE_BLOCK_MASK: bool
    SPECIALIZE_LAYOUT: bool
    USE_TMA: bool
    WARP_SPECIALIZE: bool
    GLUON: bool
    KV_RUNS: bool
    SEPARABLE_SCORE_MOD: bool
    FORCE_USE_FLEX_ATTENTION: bool
    PRESCALE_QK: bool
    ROWS_GUARANTEED_SAFE: bool
    BLOCKS_ARE_CONTIGUOUS: bool
    WRITE_DQ: bool
    kpack: int
    matrix_instr_nonkdim: int
    waves_per_eu: int


# PyTorch's FlexKernelOptions keys that have nothing to change here: accepted (and type-checked) so
# that code written for torch.nn.attention.flex_attention runs after the import switch
COMPAT_KERNEL_OPTIONS = {
    "PRESCALE_QK": bool,  # the kernels already fold scale * log2(e) into the exp2's FFMA
    "ROWS_GUARANTEED_SAFE": bool,  # a promise of no empty rows; an empty row costs one select per row here
    "BLOCKS_ARE_CONTIGUOUS": bool,  # the kernels read block runs off the BlockMask itself (KV_RUNS)
    "WRITE_DQ": bool,  # which of PyTorch's backward loops scatters captured-tensor gradients
    "kpack": int,  # the three: ROCm only
    "matrix_instr_nonkdim": int,
    "waves_per_eu": int,
}

# keys one pass reads: PyTorch's "fwd_" / "bwd_" prefixes apply a value to that pass only
FORWARD_ONLY_OPTIONS = ("BLOCK_M", "BLOCK_N", "SPLIT_KV", "USE_TMA", "WARP_SPECIALIZE", "GLUON",
                        "FORCE_USE_FLEX_ATTENTION")
BACKWARD_ONLY_OPTIONS = ("BLOCK_M1", "BLOCK_N1", "BLOCK_M2", "BLOCK_N2", "FUSED_DQ", "DETERMINISTIC")
LAUNCH_OPTIONS = ("num_warps", "num_stages")
# the backward's num_warps / num_stages after validation (0: its default): apart from the forward's,
# so that "fwd_num_warps" stays out of the backward
BACKWARD_LAUNCH_KEYS = {"num_warps": "_BWD_NUM_WARPS", "num_stages": "_BWD_NUM_STAGES"}


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
    for k, v in kernel_options.items():
        _check_option(k, v)
    if kernel_options.get("FORCE_USE_FLEX_ATTENTION") and "BACKEND" in kernel_options:
        raise ValueError("kernel_options: BACKEND cannot be combined with FORCE_USE_FLEX_ATTENTION (as in PyTorch); "
                         "drop FORCE_USE_FLEX_ATTENTION and pass BACKEND 'TRITON' or 'AUTO' alone")
    opts = _resolve_pass_prefixes(kernel_options)
    opts.setdefault("BACKEND", "AUTO")
    if opts["BACKEND"] == "FLASH":
        raise ValueError("kernel_options['BACKEND'] 'FLASH' is PyTorch's CuteDSL FlashAttention kernel, which is "
                         f"not part of inductor_flex; use one of {BACKENDS}")
    if opts["BACKEND"] not in BACKENDS:
        raise ValueError(f"kernel_options['BACKEND'] must be one of {BACKENDS}, got {opts['BACKEND']!r}")
    for k in ("BLOCK_M", "BLOCK_N", "BLOCK_M1", "BLOCK_N1", "BLOCK_M2", "BLOCK_N2"):
        if k in opts and (opts[k] < 16 or opts[k] & (opts[k] - 1)):
            raise ValueError(f"kernel_options[{k!r}] must be a power of two >= 16, got {opts[k]}")
    return opts


def _check_option(k, v) -> None:
    if not isinstance(k, str):
        raise ValueError(f"kernel_options keys must be strings, got {k!r}")
    base = k[4:] if k.startswith(("fwd_", "bwd_")) else k
    want = KNOWN_KERNEL_OPTIONS.get(base, COMPAT_KERNEL_OPTIONS.get(base))
    if want is None:
        known = sorted(KNOWN_KERNEL_OPTIONS) + sorted(COMPAT_KERNEL_OPTIONS)
        raise ValueError(f"kernel_options: unknown key {k!r}; known keys are {known} (each may carry a 'fwd_' "
                         "or 'bwd_' prefix where it applies to one pass)")
    if want is int and (isinstance(v, bool) or not isinstance(v, int) or v <= 0):
        raise ValueError(f"kernel_options[{k!r}] must be a positive int, got {v!r}")
    if want is bool and not isinstance(v, bool):
        raise ValueError(f"kernel_options[{k!r}] must be a bool, got {v!r}")
    if want is str and not isinstance(v, str):
        raise ValueError(f"kernel_options[{k!r}] must be a str, got {v!r}")
    if base == k or base in COMPAT_KERNEL_OPTIONS or base in LAUNCH_OPTIONS:
        return
    prefix = k[:3]
    if prefix == "fwd" and base in BACKWARD_ONLY_OPTIONS or prefix == "bwd" and base in FORWARD_ONLY_OPTIONS:
        raise ValueError(f"kernel_options[{k!r}]: {base} is read by the "
                         f"{'backward' if prefix == 'fwd' else 'forward'} only, so the {prefix}_ prefix leaves "
                         f"nothing for it to set (the forward's tiles are BLOCK_M/BLOCK_N, the backward's "
                         f"BLOCK_M1/BLOCK_N1 (dK/dV) and BLOCK_M2/BLOCK_N2 (dQ))")
    if base not in FORWARD_ONLY_OPTIONS and base not in BACKWARD_ONLY_OPTIONS:
        raise ValueError(f"kernel_options[{k!r}]: {base} applies to forward and backward alike here; "
                         f"pass it without the {prefix}_ prefix")


def _resolve_pass_prefixes(kernel_options: Dict[str, Any]) -> Dict[str, Any]:
    """One key per setting: a prefixed key wins over the plain one for its pass; the backward's
    num_warps / num_stages go to BACKWARD_LAUNCH_KEYS (the plain key then holds the forward's)."""
    plain = {k: v for k, v in kernel_options.items() if not k.startswith(("fwd_", "bwd_"))}
    opts = dict(plain)
    for k, v in kernel_options.items():
        if k.startswith(("fwd_", "bwd_")) and k[4:] not in LAUNCH_OPTIONS:
            opts[k[4:]] = v  # one pass reads it (or nothing does: the compat keys)
    for name, bwd_key in BACKWARD_LAUNCH_KEYS.items():
        fwd = kernel_options.get("fwd_" + name, plain.get(name))
        bwd = kernel_options.get("bwd_" + name, plain.get(name))
        opts.pop(name, None)
        if fwd is not None:
            opts[name] = fwd
        if bwd is not None or fwd is not None:
            opts[bwd_key] = bwd or 0
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
        if 0 in t.shape:
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
