"""Rewrites of a score_mod's joint graph (score, b, h, q_idx, kv_idx, grad, *captured) -> d score, ...
that save instructions per score in the backward kernels, shared by the eager printer and the
Inductor lowering.

Every score of the backward passes through this graph twice (dK/dV and dQ kernels), so an
instruction here costs as much as one in the softmax itself:

* ``fold_constant_factors``: autograd writes softcap's derivative as
  ``tanh_backward(grad * cap, t) / cap``; constant factors are carried along products and linear
  ops and multiplied in once, where a value is used otherwise (here: never, they cancel).
* ``derivative_is_bounded``: the kernels guard the derivative with ``where(grad != 0, d, 0)`` so
  that a masked score (grad 0) never gives 0 * inf = NaN (sqrt at 0). Built only from ops that are
  finite on finite inputs, the derivative needs no guard (ALiBi's is ``grad`` itself).
"""
from __future__ import annotations

import numbers

import torch

aten = torch.ops.aten

_MUL = (aten.mul.Tensor, aten.mul.Scalar)
_DIV = (aten.div.Tensor, aten.div.Scalar)
_PASS = (aten.detach.default, aten.alias.default)
# linear in their first argument: f(c * g, ...) == c * f(g, ...)
_LINEAR_FIRST = (aten.tanh_backward.default, aten.sigmoid_backward.default)


def _number(x) -> bool:
    return isinstance(x, numbers.Number) and not isinstance(x, bool)


def _is_float(node) -> bool:
    val = node.meta.get("val") if isinstance(node, torch.fx.Node) else None
    return isinstance(val, torch.Tensor) and val.dtype.is_floating_point


def fold_constant_factors(gm: torch.fx.GraphModule) -> torch.fx.GraphModule:
    """``gm`` with products by literal constants carried as one factor per value and applied where
    the value meets anything but a product, a negation or a linear-in-first-argument op. Floating
    values only (meta 'val'); a graph without metadata comes back unchanged."""
    g = torch.fx.Graph()
    env = {}  # old node -> (new node, factor)
    applied = {}
    changed = False

    def value(x):
        if not isinstance(x, torch.fx.Node):
            return x
        node, f = env[x]
        if f == 1.0:
            return node
        if (node, f) not in applied:
            # x / c stays x / c (as the printed forward mod has it: the kernels then compute it once)
            op, c = aten.mul.Tensor, f
            if f and 1.0 / f == round(1.0 / f):
                op, c = aten.div.Tensor, 1.0 / f
            applied[(node, f)] = out = g.call_function(op, (node, c))
            out.meta = dict(node.meta)
        return applied[(node, f)]

    for n in gm.graph.nodes:
        if n.op == "output":
            g.output(torch.fx.node.map_arg(n.args[0], value))
            continue
        t, a = n.target, n.args
        if n.op == "call_function" and _is_float(n) and not n.kwargs:
            if t in _MUL and len(a) == 2:
                x, c = a if isinstance(a[0], torch.fx.Node) else (a[1], a[0])
                if _is_float(x) and _number(c):
                    env[n] = (env[x][0], env[x][1] * c)
                    changed = True
                    continue
                if isinstance(x, torch.fx.Node) and isinstance(c, torch.fx.Node):  # factors of non-floats are 1
                    (bx, fx), (bc, fc) = env[x], env[c]
                    new = g.call_function(t, (bx, bc))
                    new.meta = dict(n.meta)
                    env[n] = (new, fx * fc)
                    continue
            if t in _DIV and len(a) == 2 and _is_float(a[0]) and _number(a[1]) and a[1] != 0:
                env[n] = (env[a[0]][0], env[a[0]][1] / a[1])
                changed = True
                continue
            if t is aten.neg.default and _is_float(a[0]):
                env[n] = (env[a[0]][0], -env[a[0]][1])
                continue
            if t in _PASS and _is_float(a[0]):
                env[n] = env[a[0]]
                continue
            if t in _LINEAR_FIRST and _is_float(a[0]):
                new = g.call_function(t, (env[a[0]][0],) + tuple(torch.fx.node.map_arg(a[1:], value)))
                new.meta = dict(n.meta)
                env[n] = (new, env[a[0]][1])
                continue
        new = g.node_copy(n, value)
        env[n] = (new, 1.0)
    if not changed:
        return gm
    g.eliminate_dead_code()
    out = torch.fx.GraphModule(gm, g)
    return out


# finite on finite inputs (a product can overflow, as the forward's own arithmetic can)
_BOUNDED = {
    "add", "sub", "rsub", "mul", "neg", "tanh", "tanh_backward", "sigmoid", "sigmoid_backward", "sin", "cos",
    "abs", "where", "clamp", "clamp_min", "clamp_max", "maximum", "minimum", "sign", "detach", "alias",
    "_to_copy", "convert_element_type", "expand", "view", "unsqueeze", "squeeze", "full", "full_like",
    "ones_like", "zeros_like", "scalar_tensor", "gt", "ge", "lt", "le", "eq", "ne", "logical_and",
    "logical_or", "logical_not", "bitwise_and", "bitwise_or", "bitwise_not", "lift_fresh_copy", "clone",
    "tanh_approx",
}


def derivative_is_bounded(gm: torch.fx.GraphModule, inputs: int = 6) -> bool:
    """Whether the first output (d score) is finite wherever score, indices and grad are: it reads no
    captured tensor or constant (placeholders past ``inputs``, get_attr) and uses only _BOUNDED ops,
    dividing only by nonzero literals."""
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    out = next(n for n in gm.graph.nodes if n.op == "output").args[0]
    first = out[0] if isinstance(out, (tuple, list)) else out
    if not isinstance(first, torch.fx.Node):
        return True
    seen, stack = set(), [first]
    while stack:
        n = stack.pop()
        if n in seen:
            continue
        seen.add(n)
        if n.op == "placeholder":
            if placeholders.index(n) >= inputs:
                return False
            continue
        if n.op != "call_function":
            return False
        name = getattr(getattr(n.target, "overloadpacket", None), "__name__", getattr(n.target, "__name__", ""))
        if n.target in _DIV:
            if not (_number(n.args[1]) and n.args[1] != 0):
                return False
        elif name not in _BOUNDED:
            return False
        stack.extend(x for x in n.all_input_nodes)
    return True


def prescale(gm: torch.fx.GraphModule, scale: float, strip_factor: bool = False):
    """(gm', c): gm' takes the raw q·k where ``gm`` (a score_mod or its joint graph) took the scaled
    score, with the scale folded into the mod's own leading constant (softcap: one multiply by
    scale / cap); with ``strip_factor``, a trailing positive literal factor is left out of gm' and
    returned as c (gm(s) == gm'(qk) * c), for the kernel to fold into its log2(e) factor. This is
    what the eager printer's score_mod_scaled does, for the graphs Inductor lowers."""
    import copy

    gm = copy.deepcopy(gm)
    g = gm.graph
    score = next(n for n in g.nodes if n.op == "placeholder")
    if not _is_float(score):
        return gm, 1.0
    with g.inserting_after(score):
        scaled = g.call_function(aten.mul.Tensor, (score, float(scale)))
    scaled.meta = dict(score.meta)
    score.replace_all_uses_with(scaled)
    scaled.args = (score, float(scale))
    gm.recompile()
    gm = fold_constant_factors(gm)
    factor = 1.0
    if strip_factor:
        out = next(n for n in gm.graph.nodes if n.op == "output")
        res = out.args[0]
        single = isinstance(res, (tuple, list)) and len(res) == 1
        node = res[0] if single else res
        if (isinstance(node, torch.fx.Node) and node.op == "call_function" and node.target in _MUL + _DIV
                and isinstance(node.args[0], torch.fx.Node) and _number(node.args[1])
                and node.args[0].op != "placeholder" and _is_float(node.args[0])):
            c = node.args[1] if node.target in _MUL else 1.0 / node.args[1]
            if c > 0:
                x = node.args[0]
                out.args = ((x,) if single else x,)
                gm.graph.eliminate_dead_code()
                gm.recompile()
                factor = float(c)
    return gm, factor
