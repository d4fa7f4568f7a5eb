"""Block-size configurations for the flex kernels, per (head dims, dtype, GPU arch).

A config is (BLOCK_M, BLOCK_N, num_warps, num_stages[, warp_specialize]). The candidates are pruned by the
BlockMask's block sizes (the kernel's tiles must divide them) and by the device's shared memory,
so autotuning never meets an "out of resource" failure.
"""
from __future__ import annotations

from typing import List, NamedTuple, Optional, Tuple

import torch


class Config(NamedTuple):
    BLOCK_M: int
    BLOCK_N: int
    num_warps: int
    num_stages: int
    # forward only: K/V through TMA and the kv loop split by Triton into a load warp group and
    # the compute warps (tl.range(warp_specialize=True); Hopper, 16-bit, K/V that TMA can read)
    warp_specialize: bool = False


def next_pow2(x: int) -> int:
    return 1 << max(0, (int(x) - 1).bit_length())


def head_pad(d: int) -> int:
    return max(16, next_pow2(d))


# Hopper-first candidates; the first entry of each list is the no-autotune default.
_FWD_CANDIDATES = {
    64: [Config(128, 64, 4, 3), Config(128, 128, 8, 3), Config(64, 64, 4, 3), Config(128, 64, 8, 4), Config(64, 128, 4, 3)],
    128: [Config(128, 64, 8, 3), Config(128, 64, 4, 3), Config(128, 128, 8, 2), Config(64, 64, 4, 3), Config(128, 32, 4, 3)],
    256: [Config(64, 32, 4, 2), Config(64, 64, 4, 2), Config(128, 32, 8, 2), Config(32, 32, 4, 2)],
}
# Warp-specialized forward candidates (sm_90, 16-bit inputs). Triton 3.6's Hopper warp
# specialization wants 4 compute warps; 128 x 128 with 2 stages measured 534 TFLOP/s on a plain
# D=128 forward where the best unspecialized config of the same kernel gave 480 (H100,
# benchmarks/results/h100_2026-11-27_ws_probe.json). 128 x 64 tiles gave NaN there: a
# miscompile, so they are not candidates.
_FWD_WS_CANDIDATES = {
    64: [Config(128, 128, 4, 2, True)],
    128: [Config(128, 128, 4, 2, True)],
}
_INTERPRETER_CONFIG = Config(16, 16, 1, 1)
# below this many (query, key) pairs summed over batch and heads a kernel runs in microseconds, so
# timing candidates costs more than it can save: the first candidate runs, eager and compiled alike
# (under Inductor this also keeps tiny problems out of the template benchmark that faulted on the
# H100 for a 64 x 64 GQA case, README "Known bug")
AUTOTUNE_MIN_PAIRS = 1 << 24


def autotune_pays(batch: int, heads: int, q_len: int, kv_len: int) -> bool:
    return batch * heads * q_len * kv_len >= AUTOTUNE_MIN_PAIRS


def _smem_bytes(cfg: Config, qk_pad: int, v_pad: int, elem: int) -> int:
    q = cfg.BLOCK_M * qk_pad
    kv = cfg.BLOCK_N * (qk_pad + v_pad) * max(1, cfg.num_stages - 1)
    return (q + kv) * elem


def max_shared_memory(device: torch.device) -> int:
    try:
        props = torch.cuda.get_device_properties(device)
        return int(getattr(props, "shared_memory_per_block_optin", 0) or 99 * 1024)
    except Exception:  # noqa: BLE001
        return 99 * 1024


def warp_specialize_supported(device: torch.device) -> bool:
    """Hopper GPU and a Triton whose tl.range takes warp_specialize (3.4 on)."""
    try:
        import inspect

        import triton.language as tl

        if "warp_specialize" not in inspect.signature(tl.range.__init__).parameters:
            return False
        return device.type == "cuda" and torch.cuda.get_device_capability(device)[0] == 9
    except Exception:  # noqa: BLE001
        return False


def forward_configs(qk_head: int, v_head: int, dtype: torch.dtype, sparse_block: Tuple[int, int],
                    device: torch.device, interpret: bool = False) -> List[Config]:
    """Candidate configs, best guess first, valid for this BlockMask and device."""
    q_bs, kv_bs = sparse_block
    if interpret:
        bm = min(_INTERPRETER_CONFIG.BLOCK_M, q_bs)
        bn = min(_INTERPRETER_CONFIG.BLOCK_N, kv_bs)
        return [Config(bm, bn, 1, 1)]
    pad = max(head_pad(qk_head), head_pad(v_head))
    key = 64 if pad <= 64 else (128 if pad <= 128 else 256)
    elem = 4 if dtype == torch.float32 else 2
    limit = max_shared_memory(device)
    out = []
    candidates = list(_FWD_CANDIDATES[key])
    if dtype in (torch.float16, torch.bfloat16) and key in _FWD_WS_CANDIDATES and warp_specialize_supported(device):
        candidates += _FWD_WS_CANDIDATES[key]
    for cfg in candidates:
        bm, bn = min(cfg.BLOCK_M, q_bs), min(cfg.BLOCK_N, kv_bs)
        if q_bs % bm or kv_bs % bn:
            continue
        if cfg.warp_specialize and (bm, bn) != (cfg.BLOCK_M, cfg.BLOCK_N):
            continue  # only the measured tile
        c = Config(bm, bn, cfg.num_warps, cfg.num_stages, cfg.warp_specialize)
        if dtype == torch.float32:  # fp32 tiles are twice the bytes: halve the kv tile
            c = Config(c.BLOCK_M, max(16, c.BLOCK_N // 2), c.num_warps, min(c.num_stages, 2))
        if _smem_bytes(c, head_pad(qk_head), head_pad(v_head), elem) <= limit and c not in out:
            out.append(c)
    if not out:
        out.append(Config(min(16, q_bs), min(16, kv_bs), 4, 1))
    return out


def wide_configs(qk_head: int, v_head: int, dtype: torch.dtype, sparse_block: Tuple[int, int],
                 device: torch.device) -> List[Config]:
    """A wider forward grid for Inductor's max-autotune, filtered like forward_configs."""
    q_bs, kv_bs = sparse_block
    elem = 4 if dtype == torch.float32 else 2
    limit = max_shared_memory(device)
    out = []
    for bm in (64, 128):
        for bn in (32, 64, 128):
            for warps in (4, 8):
                for stages in (2, 3, 4):
                    c = Config(bm, bn, warps, stages)
                    if (q_bs % bm == 0 and kv_bs % bn == 0
                            and _smem_bytes(c, head_pad(qk_head), head_pad(v_head), elem) <= limit):
                        out.append(c)
    return out


# Backward: (BLOCK_M, BLOCK_N) is the (query, kv) tile of each kernel. dK/dV keeps a kv tile of K, V,
# dK, dV resident and streams query tiles; dQ keeps a query tile of Q, dO, dQ and streams kv tiles.
# (64, 64, 4, 2) leads both D=128 lists: on the H100 (benchmarks/sweep_backward.py, 2026-11-26) it
# was the fastest dK/dV config for causal S=4096 and document S=1024, 9% ahead of (64, 128, 8, 2),
# while the same tile with 3 stages was 50% slower.
_DKDV_CANDIDATES = {
    64: [Config(64, 128, 8, 3), Config(64, 64, 4, 2), Config(32, 128, 4, 3), Config(64, 64, 4, 3),
         Config(32, 64, 4, 3)],
    128: [Config(64, 64, 4, 2), Config(64, 128, 8, 2), Config(64, 128, 8, 4), Config(64, 64, 4, 3),
          Config(32, 128, 8, 3)],
    256: [Config(32, 64, 4, 1), Config(16, 64, 4, 1), Config(32, 32, 4, 1)],
}
_DQ_CANDIDATES = {
    64: [Config(128, 64, 8, 3), Config(64, 64, 4, 2), Config(128, 32, 4, 3), Config(64, 64, 4, 3)],
    128: [Config(64, 64, 4, 2), Config(128, 128, 8, 2), Config(128, 64, 8, 2), Config(64, 32, 4, 2),
          Config(128, 32, 8, 3)],
    256: [Config(64, 32, 4, 1), Config(64, 16, 4, 1), Config(32, 32, 4, 1)],
}


def backward_configs(kind: str, qk_head: int, v_head: int, dtype: torch.dtype, sparse_block: Tuple[int, int],
                     interpret: bool = False) -> List[Config]:
    """Candidates for the 'dkdv' or 'dq' backward kernel, best guess first."""
    q_bs, kv_bs = sparse_block
    if interpret:
        return [Config(min(16, q_bs), min(16, kv_bs), 1, 1)]
    pad = max(head_pad(qk_head), head_pad(v_head))
    key = 64 if pad <= 64 else (128 if pad <= 128 else 256)
    table = _DKDV_CANDIDATES if kind == "dkdv" else _DQ_CANDIDATES
    out = []
    for cfg in table[key]:
        bm, bn = min(cfg.BLOCK_M, q_bs), min(cfg.BLOCK_N, kv_bs)
        if dtype == torch.float32:
            bm, bn = max(16, bm // 2), max(16, bn // 2)
        if q_bs % bm or kv_bs % bn:
            continue
        c = Config(bm, bn, cfg.num_warps, min(cfg.num_stages, 2) if dtype == torch.float32 else cfg.num_stages)
        if c not in out:
            out.append(c)
    return out or [Config(min(16, q_bs), min(16, kv_bs), 4, 1)]


def user_config(opts: dict, default: Config) -> Optional[Config]:
    """A config pinned through kernel_options, or None to autotune."""
    keys = ("BLOCK_M", "BLOCK_N", "num_warps", "num_stages")
    if not any(k in opts for k in keys):
        return None
    return Config(*(opts.get(k, getattr(default, k)) for k in keys), bool(opts.get("WARP_SPECIALIZE", False)))


def filter_warp_specialize(configs: List[Config], opts: dict, applies: bool = True) -> List[Config]:
    """kernel_options WARP_SPECIALIZE: False drops the warp-specialized candidates, True keeps only
    them (when there are any), absent lets autotuning choose; none where they do not apply."""
    flag = opts.get("WARP_SPECIALIZE") if applies else False
    if flag is None:
        return configs
    kept = [c for c in configs if c.warp_specialize == bool(flag)]
    return kept or [c for c in configs if not c.warp_specialize]
