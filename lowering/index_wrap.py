"""PyTorch's negative-index wrap for the captured-tensor gathers of a mod's FX graph, before Inductor
lowers it into a template.

Inductor lowers a gather inside a template modification to a plain load at the index it is given:
no wrap of negative indices and no bounds check (its modification handler ignores both). A
relative bias read as ``table[q_idx - kv_idx]`` then read before the table's start under
torch.compile, where PyTorch (and the eager kernels, printer._Printer.index) wrap ``-1`` to the
last entry. This pass writes the wrap into the graph, ``where(i < 0, i + size, i)``, for every
index that can be negative, so the compiled kernels index as PyTorch does.

An index is known non-negative, and left alone (no select per score), when it is built from the
kernels' row and column indices, batch and head (never negative) with +, *, floor division and
remainder by positive numbers, abs, max / min and where; and when it is a value read from a
captured integer tensor, which the compiled path assumes non-negative (document ids, page tables:
the README's known limitation; the eager kernels check such tensors, printer.nonneg_flag).
"""
from __future__ import annotations

import copy
from typing import Iterable

import torch

aten = torch.ops.aten
prims = torch.ops.prims

_PASS = {aten._to_copy.default, aten.to.dtype, prims.convert_element_type.default, aten.clone.default,
         aten.alias.default, aten.view.default}
_BOTH = {aten.add.Tensor, aten.add.Scalar, aten.mul.Tensor, aten.mul.Scalar, aten.minimum.default,
         aten.bitwise_or.Tensor}


def _nonneg(node, known: set) -> bool:
    """Whether ``node`` (an FX node or a Python number) is never negative."""
    if isinstance(node, bool):
        return True
    if isinstance(node, (int, float)):
        return node >= 0
    if not isinstance(node, torch.fx.Node):
        return False
    if node in known:
        return True
    t, args = node.target, node.args
    if t is aten.index.Tensor:
        return True  # a value read from a captured tensor: assumed non-negative (module docstring)
    if t in _PASS:
        return _nonneg(args[0], known)
    if t in _BOTH:
        return _nonneg(args[0], known) and _nonneg(args[1], known)
    if t in (aten.sub.Tensor, aten.sub.Scalar):
        return _nonneg(args[0], known) and isinstance(args[1], (int, float)) and args[1] <= 0
    if t is aten.maximum.default:
        return _nonneg(args[0], known) or _nonneg(args[1], known)
    if t in (aten.remainder.Tensor, aten.remainder.Scalar):
        return isinstance(args[1], (int, float)) and args[1] > 0  # Python's sign: the divisor's
    if t in (aten.floor_divide.default, aten.div.Tensor_mode):
        return _nonneg(args[0], known) and isinstance(args[1], (int, float)) and args[1] > 0
    if t is aten.abs.default:
        return True
    if t in (aten.clamp.default, aten.clamp_min.default):
        return len(args) > 1 and args[1] is not None and _nonneg(args[1], known)
    if t is aten.where.self:
        return _nonneg(args[1], known) and _nonneg(args[2], known)
    return False


def wrap_negative_indices(gm: torch.fx.GraphModule, nonneg_placeholders: Iterable[int]) -> torch.fx.GraphModule:
    """``gm`` with ``where(i < 0, i + size, i)`` around every gather index that can be negative
    (the graph itself when there is none). ``nonneg_placeholders``: positions of the placeholders
    that are never negative (the kernels' b, h, q_idx, kv_idx)."""
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    known = {placeholders[i] for i in nonneg_placeholders if i < len(placeholders)}
    todo = []
    for node in gm.graph.nodes:
        if node.target is not aten.index.Tensor:
            continue
        src, indices = node.args[0], node.args[1]
        shape = getattr(src.meta.get("val"), "shape", None) if isinstance(src, torch.fx.Node) else None
        for d, i in enumerate(indices):
            if i is None or _nonneg(i, known) or shape is None or d >= len(shape):
                continue
            if not isinstance(shape[d], int):  # a symbolic size (dynamic shapes): left as Inductor lowers it
                continue
            todo.append((node, d, shape[d]))
    if not todo:
        return gm
    gm = copy.deepcopy(gm)
    by_name = {n.name: n for n in gm.graph.nodes}
    g = gm.graph
    for orig, d, size in todo:
        node = by_name[orig.name]
        i = node.args[1][d]
        with g.inserting_before(node):
            wrapped = g.call_function(aten.where.self, (g.call_function(aten.lt.Scalar, (i, 0)),
                                                        g.call_function(aten.add.Tensor, (i, size)), i))
        indices = list(node.args[1])
        indices[d] = wrapped
        node.args = (node.args[0], indices)
    gm.recompile()
    return gm
