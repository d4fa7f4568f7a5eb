"""Tile configurations and split-KV counts for the decode kernel (templates/flex_decode.py.jinja).

Decoding is bound by reading K/V once: the config only has to keep enough bytes in flight per SM
(BLOCK_N x stages) and the split count has to give every SM work, since B * Hkv programs alone
rarely fill an H100's 132 SMs.
"""
from __future__ import annotations

from typing import List, NamedTuple

import torch

from .configs import head_pad, max_shared_memory


class DecodeConfig(NamedTuple):
    BLOCK_N: int
    num_warps: int
    num_stages: int


# Hopper-first candidates; the first entry is the no-autotune default (measured best of the
# 3-4-stage ones on the H100). With a BlockMask the kv tile's address depends on a loaded block
# index, so Triton's pipeliner spends two stages on the index (num_stages=5 double-buffers K/V,
# checked in sm_90 TTGIR); without one (DENSE) every stage but one buffers K/V.
_DECODE_CANDIDATES = [
    DecodeConfig(64, 4, 3), DecodeConfig(128, 4, 3), DecodeConfig(64, 4, 4), DecodeConfig(64, 4, 5),
    DecodeConfig(128, 8, 3),
]
_INTERPRETER = DecodeConfig(16, 1, 1)
# a split should stream at least this many kv tiles, or the merge costs more than it saves
MIN_TILES_PER_SPLIT = 4
MAX_SPLIT = 64


def decode_configs(qk_head: int, v_head: int, dtype: torch.dtype, kv_block: int, device: torch.device,
                   interpret: bool = False) -> List[DecodeConfig]:
    """Candidate configs, best guess first; BLOCK_N always divides the BlockMask's kv block size."""
    if interpret:
        return [DecodeConfig(min(_INTERPRETER.BLOCK_N, kv_block), 1, 1)]
    elem = 4 if dtype == torch.float32 else 2
    per_row = (head_pad(qk_head) + head_pad(v_head)) * elem
    limit = max_shared_memory(device)
    out: List[DecodeConfig] = []
    for c in _DECODE_CANDIDATES:
        bn = min(c.BLOCK_N, kv_block)
        if dtype == torch.float32 or max(head_pad(qk_head), head_pad(v_head)) > 128:
            bn = max(16, bn // 2)
        if kv_block % bn:
            continue
        c = DecodeConfig(bn, c.num_warps, c.num_stages)
        kv_buffers = max(1, c.num_stages - 1)  # DENSE, the most (see _DECODE_CANDIDATES)
        if bn * per_row * kv_buffers + 16 * head_pad(qk_head) * elem <= limit and c not in out:
            out.append(c)
    return out or [DecodeConfig(16, 4, 1)]


def sm_count(device: torch.device) -> int:
    try:
        return int(torch.cuda.get_device_properties(device).multi_processor_count)
    except Exception:  # noqa: BLE001 - CPU / interpreter
        return 132


def decode_split(programs: int, kv_tiles: int, sms: int) -> int:
    """Shares of the kv range per (batch, head group): about two programs per SM, each streaming at
    least MIN_TILES_PER_SPLIT tiles."""
    want = -(-2 * sms // max(1, programs))
    most = max(1, kv_tiles // MIN_TILES_PER_SPLIT)
    return max(1, min(want, most, MAX_SPLIT))


def split_candidates(default: int, kv_tiles: int, programs: int, sms: int) -> List[int]:
    """Split counts to time: multiples of the default, and the counts that give a whole number of
    programs per SM (B * Hkv * SPLIT close to k * SMs), since the slowest SM sets the time."""
    most = max(1, min(MAX_SPLIT, kv_tiles // MIN_TILES_PER_SPLIT))
    waves = [max(1, k * sms // max(1, programs)) for k in (1, 2, 3, 4, 6, 8)]
    out = []
    for s in (default, default * 2, max(1, default // 2), default * 4, *waves):
        s = min(s, most)
        if s not in out:
            out.append(s)
    return out
