"""Kernel launches that skip Triton's per-call argument binding once a launch has compiled.

``kernel[grid](*args, **constexprs)`` binds and specializes every argument (dtype, 16-byte
alignment, integer divisibility), hashes the result and looks the compiled kernel up on each call:
tens of microseconds of host time per launch with the forty-odd arguments our kernels take, which
an eager decode step (a 0.1 ms kernel) or a short-sequence backward (four launches) pays on the
critical path. ``launch`` keys the compiled kernel by something at least as fine as Triton's
specialization (integer values themselves, each tensor's dtype and alignment, the constexprs, warps,
stages and the first argument's device) and then calls its launcher directly. A key it has not seen goes through Triton
once, which compiles or finds the kernel and launches it, and the result is kept.

Under the Triton interpreter, for arguments of a type the key does not know, or with
INDUCTOR_FLEX_FAST_LAUNCH=0, every launch takes Triton's own path.
"""
from __future__ import annotations

import operator
import os
from typing import Any, Dict, Optional, Sequence, Tuple

import torch

from . import compat

_ENABLED = os.environ.get("INDUCTOR_FLEX_FAST_LAUNCH", "1") != "0"
_MAX_KEYS = 256  # per kernel: a shape that changes every call (growing lengths) must not grow this


_Tensor = torch.Tensor
_PLAIN = (int, float, bool, type(None))


def _known(args) -> bool:
    """Whether every argument is of a type whose specialization the key captures: a value's
    (ints: == 1, % 16, 32 or 64 bits) by the value itself, a tensor's by dtype and alignment."""
    return all(type(a) in _PLAIN or isinstance(a, _Tensor) for a in args)


def _key(args, constexprs, num_warps, num_stages):
    # the types apart: 1 == 1.0 == True would otherwise share a key. A launch site passes the same
    # argument types call after call, so where its tensors sit is looked up once per type list
    types = tuple(map(type, args))
    layout = _layouts.get(types)
    if layout is None:
        if len(_layouts) >= _MAX_KEYS:
            _layouts.clear()
        layout = _layouts[types] = _layout(types)
    tensors, scalars = layout[0](args), layout[1](args)
    return (types, scalars, tuple([t.dtype for t in tensors]), tuple([t.data_ptr() & 15 for t in tensors]),
            tuple(constexprs.items()), num_warps, num_stages, getattr(args[0], "device", None))


_layouts: Dict[tuple, tuple] = {}  # argument types -> (their tensors, the other values)


def _picker(positions):
    # a tuple of args at these positions (operator.itemgetter returns a bare item for one position)
    if len(positions) > 1:
        return operator.itemgetter(*positions)
    if positions:
        i = positions[0]
        return lambda args: (args[i],)
    return lambda args: ()


def _layout(types) -> tuple:
    tensor_pos = [i for i, t in enumerate(types) if issubclass(t, _Tensor)]
    other_pos = [i for i, t in enumerate(types) if not issubclass(t, _Tensor)]
    return _picker(tensor_pos), _picker(other_pos)


class _Kernel:
    __slots__ = ("compiled", "tail")

    def __init__(self, compiled, tail):
        self.compiled, self.tail = compiled, tail


_cache: Dict[int, Tuple[Any, Dict[tuple, Optional[_Kernel]]]] = {}  # id(jit fn) -> (fn, key -> kernel)


def launch(fn, grid: Sequence[int], args: Sequence[Any], constexprs: Dict[str, Any], num_warps: int,
           num_stages: int, interpret: bool = False) -> None:
    """``fn[grid](*args, **constexprs, num_warps=, num_stages=)``, with the compiled kernel cached."""
    if not _ENABLED or interpret:
        fn[grid](*args, **constexprs, num_warps=num_warps, num_stages=num_stages)
        return
    entry = _cache.get(id(fn))
    if entry is None or entry[0] is not fn:
        entry = _cache[id(fn)] = (fn, {})
    table = entry[1]
    try:
        key = _key(args, constexprs, num_warps, num_stages)
        hit = table.get(key, False)
    except TypeError:  # an unhashable argument or constexpr: Triton's path every time
        key, hit = None, None
    if hit:
        compat.launch_compiled(hit.compiled, grid, args, hit.tail)
        return
    compiled = fn[grid](*args, **constexprs, num_warps=num_warps, num_stages=num_stages)
    if key is None or hit is None:
        return
    if len(table) >= _MAX_KEYS:
        table.clear()
    table[key] = _direct(fn, compiled, args, constexprs) if _known(args) else None


def _direct(fn, compiled, args, constexprs) -> Optional[_Kernel]:
    """The kernel and the constexpr values that follow ``args`` in its signature, or None where the
    launcher cannot be called directly (then this key keeps taking Triton's path)."""
    names = list(getattr(fn, "arg_names", []))
    rest = names[len(args):]
    if not compat.can_launch_compiled(compiled) or any(n not in constexprs for n in rest):
        return None
    return _Kernel(compiled, tuple(constexprs[n] for n in rest))
