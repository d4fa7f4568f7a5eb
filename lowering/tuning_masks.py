"""The real BlockMask of a compiled call, kept for Inductor's config benchmarks.

Inductor picks the forward template's config at compile time by running each candidate on
example inputs, but the BlockMask tensors are graph inputs whose values it does not know. When
Dynamo traces a call whose BlockMask tensors are inputs of the compiled frame, ``dynamo.py``
copies them here (``remember``) and names them in the HOP's kernel_options under ``TUNE_KEY``;
``template.py`` benchmarks on those tensors (``lookup``), so the chosen config is the one that
is fastest for the mask the program runs with, as the eager autotuner's is. The key is a digest
of the tensors, so the same mask gives the same graph (and FX-graph cache key).
"""
from __future__ import annotations

import collections
import hashlib
from typing import Optional, Sequence, Tuple

import torch

TUNE_KEY = "_TUNE_MASK"
_MAX_ELEMS = 1 << 22  # larger masks (per-head masks of long sequences) use the causal stand-in
_MAX_ENTRIES = 8
_masks: "collections.OrderedDict[str, Tuple[torch.Tensor, ...]]" = collections.OrderedDict()


def remember(tensors: Sequence[Optional[torch.Tensor]]) -> Optional[str]:
    """Keep CPU copies of (kv_num, kv_idx, full_num, full_idx) and, for the backward, the q side's
    four; return their key, or None."""
    if any(t is None for t in tensors[:2]) or sum(t.numel() for t in tensors if t is not None) > _MAX_ELEMS:
        return None
    copies = tuple(None if t is None else t.detach().to("cpu", torch.int32).contiguous() for t in tensors)
    h = hashlib.sha1()
    for t in copies:
        h.update(b"-" if t is None else (str(tuple(t.shape)).encode() + t.numpy().tobytes()))
    key = h.hexdigest()[:16]
    _masks[key] = copies
    _masks.move_to_end(key)
    while len(_masks) > _MAX_ENTRIES:
        _masks.popitem(last=False)
    return key


def lookup(key: Optional[str]) -> Optional[Tuple[torch.Tensor, ...]]:
    return _masks.get(key) if key else None
