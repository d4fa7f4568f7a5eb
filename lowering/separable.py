"""Separable score_mods for the Inductor-rendered templates: the FX counterpart of the eager printer's
``printer._SeparablePrinter``.

A score_mod of the form ``a * score + key_bias(kv) + row_bias(q)`` (``a`` constant over a tile: a
number or a function of b and h) - ALiBi, per-key biases, per-head temperatures - costs the kernels
one FMA per score, ``qk * a + key_bias``, when its parts are lowered apart; the row bias is constant
along a softmax row, so it goes onto the row's lse and max instead of into every score (the
templates' SEPARABLE path). ``split`` finds the parts in the (prescaled) score_mod graph and returns
them as three graphs ``(b, h, q_idx, kv_idx, *captured) -> value`` that Inductor lowers like a
mask_mod.
"""
from __future__ import annotations

import numbers
from typing import Dict, Optional, Tuple

import torch

aten, prims = torch.ops.aten, torch.ops.prims

_ADD = (aten.add.Tensor, aten.add.Scalar)
_SUB = (aten.sub.Tensor, aten.sub.Scalar)
_MUL = (aten.mul.Tensor, aten.mul.Scalar)
_DIV = (aten.div.Tensor, aten.div.Scalar)
# keep the value when they give float32 (a cast to an integer or 16-bit type rounds: not linear)
_PASS = (aten._to_copy.default, aten.to.dtype, prims.convert_element_type.default, aten.clone.default,
         aten.detach.default, aten.alias.default, aten.view.default, aten.expand.default,
         aten.lift_fresh_copy.default)
_INTS = (torch.int32, torch.int64, torch.int16, torch.int8, torch.uint8)

Part = Optional[object]  # a node of the new graph, a Python float, or None for 0


class _Split:
    def __init__(self, gm: torch.fx.GraphModule):
        self.gm = gm
        self.g = torch.fx.Graph()
        self.env: Dict[torch.fx.Node, torch.fx.Node] = {}
        self.axes: Dict[torch.fx.Node, frozenset] = {}
        self.lin: Dict[torch.fx.Node, tuple] = {}

    # ---- helpers -------------------------------------------------------------------------------
    @staticmethod
    def _dtype(node) -> Optional[torch.dtype]:
        val = node.meta.get("val") if isinstance(node, torch.fx.Node) else None
        return val.dtype if isinstance(val, torch.Tensor) else None

    def _op(self, target, *args) -> torch.fx.Node:
        return self.g.call_function(target, args)

    def _float(self, node: torch.fx.Node) -> Part:
        """The new graph's float32 value of an old node that does not vary along both axes."""
        dt = self._dtype(node)
        if dt == torch.float32:
            return self.env[node]
        if dt in _INTS:
            return self._op(prims.convert_element_type.default, self.env[node], torch.float32)
        return None

    def part_of(self, a) -> Optional[tuple]:
        """(coefficient, key part, row part) of an argument, or None where it is not of that form."""
        if isinstance(a, numbers.Number) and not isinstance(a, bool):
            return (None, float(a), None)
        if not isinstance(a, torch.fx.Node):
            return None
        if a in self.lin:
            return self.lin[a]
        ax = self.axes.get(a)
        if ax is None or "s" in ax or ax == frozenset("mn") or a not in self.env:
            return None
        v = self._float(a)
        if v is None:
            return None
        return (None, v, None) if "m" not in ax else (None, None, v)

    def _add(self, x: Part, y: Part, sub: bool) -> Part:
        if y is None:
            return x
        if x is None:
            if not sub:
                return y
            return -y if isinstance(y, float) else self._op(aten.neg.default, y)
        if isinstance(x, float) and isinstance(y, float):
            return x - y if sub else x + y
        return self._op(aten.sub.Tensor if sub else aten.add.Tensor, x, y)

    def _scale(self, part: tuple, k, div: bool) -> tuple:
        out = []
        for x in part:
            if x is None:
                out.append(None)
            elif isinstance(x, float) and isinstance(k, float):
                out.append(x / k if div else x * k)
            else:
                out.append(self._op(aten.div.Tensor if div else aten.mul.Tensor, x, k))
        return tuple(out)

    def _scalar(self, part: tuple, arg) -> Part:
        """A factor constant over the tile (no score, no index), or None."""
        if part[0] is not None or part[2] is not None:
            return None
        if isinstance(arg, torch.fx.Node) and self.axes.get(arg):
            return None
        return part[1] if part[1] is not None else 0.0

    def affine(self, node: torch.fx.Node) -> Optional[tuple]:
        f, args, kw = node.target, node.args, node.kwargs
        dt = self._dtype(node)
        if dt != torch.float32 and dt not in _INTS:
            return None
        if f in _PASS:
            return self.part_of(args[0]) if dt == torch.float32 else None
        if f in _ADD + _SUB and kw.get("alpha", 1) == 1 and len(args) == 2:
            a, b = self.part_of(args[0]), self.part_of(args[1])
            if a is None or b is None:
                return None
            return tuple(self._add(x, y, f in _SUB) for x, y in zip(a, b))
        if f is aten.neg.default:
            a = self.part_of(args[0])
            return None if a is None else self._scale(a, -1.0, False)
        if f in _MUL + _DIV and len(args) == 2 and not kw:
            a, b = self.part_of(args[0]), self.part_of(args[1])
            if a is None or b is None:
                return None
            div = f in _DIV
            k = self._scalar(b, args[1])
            if k is not None and not (div and k == 0.0):
                return self._scale(a, k, div)
            k = self._scalar(a, args[0])
            if k is not None and not div:
                return self._scale(b, k, False)
        return None

    # ---- the walk ------------------------------------------------------------------------------
    def run(self) -> Optional[tuple]:
        placeholders = [n for n in self.gm.graph.nodes if n.op == "placeholder"]
        if len(placeholders) < 5:
            return None
        score, b, h, q_idx, kv_idx = placeholders[:5]
        self.axes[score] = frozenset("smn")
        self.lin[score] = (1.0, None, None)
        for node, name, ax in ((b, "b", ""), (h, "h", ""), (q_idx, "q_idx", "m"), (kv_idx, "kv_idx", "n")):
            self.env[node] = self.g.placeholder(name)
            self.axes[node] = frozenset(ax)
        for i, node in enumerate(placeholders[5:]):
            self.env[node] = self.g.placeholder(f"captured_{i}")
            self.axes[node] = frozenset()
        result = None
        for node in self.gm.graph.nodes:
            if node.op == "placeholder":
                continue
            if node.op == "output":
                res = node.args[0]
                result = res[0] if isinstance(res, (tuple, list)) and len(res) == 1 else res
                break
            if node.op == "get_attr":
                self.env[node] = self.g.node_copy(node, lambda n: self.env[n])
                self.axes[node] = frozenset()
                continue
            if node.op != "call_function":
                return None
            ax = frozenset().union(*(self.axes.get(a, frozenset("smn")) for a in node.all_input_nodes))
            self.axes[node] = ax
            if "s" not in ax:
                # a value of the indices and captured tensors alone: copied as it is
                self.env[node] = self.g.node_copy(node, lambda n: self.env[n])
            if "s" in ax or ax == frozenset("mn"):
                part = self.affine(node)
                if part is not None:
                    self.lin[node] = part
                elif "s" in ax:
                    return None  # the score enters some other way (softcap's tanh, a product)
        if not isinstance(result, torch.fx.Node) or result not in self.lin:
            return None
        if self._dtype(result) != torch.float32:
            return None
        coef, key, row = self.lin[result]
        if coef is None:
            return None  # the mod drops the score
        return coef, key, row

    def graphs(self, parts: tuple) -> Tuple[torch.fx.GraphModule, ...]:
        """One graph per part, each with every placeholder (Inductor passes them all)."""
        import copy

        out = []
        for i, part in enumerate(parts):
            g = copy.deepcopy(self.g)
            node_map = {old: new for old, new in zip(self.g.nodes, g.nodes)}
            if isinstance(part, torch.fx.Node):
                value = node_map[part]
            else:
                value = g.call_function(aten.scalar_tensor.default, (float(part or 0.0),),
                                        {"dtype": torch.float32})
            g.output(value)
            g.eliminate_dead_code()
            gm = torch.fx.GraphModule(self.gm, g)
            out.append(gm)
        return tuple(out)


def split(gm: torch.fx.GraphModule) -> Optional[Tuple[torch.fx.GraphModule, torch.fx.GraphModule,
                                                     torch.fx.GraphModule]]:
    """(coefficient, key_bias, row_bias) graphs when ``gm(score, b, h, q_idx, kv_idx, *captured)`` is
    coefficient * score + key_bias + row_bias (float32 arithmetic; casts to other types end the
    form), else None. Each graph takes (b, h, q_idx, kv_idx, *captured); the coefficient's reads
    neither index, the key bias not q_idx, the row bias not kv_idx."""
    s = _Split(gm)
    try:
        parts = s.run()
        if parts is None:
            return None
        return s.graphs(parts)
    except Exception:  # noqa: BLE001 - an optimization: a graph it cannot analyse lowers as before
        return None
