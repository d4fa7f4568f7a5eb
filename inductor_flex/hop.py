"""The flex attention HigherOrderOperators: what ``flex_attention`` becomes inside torch.compile.

``flex_attention_hop(query, key, value, score_mod, block_mask, scale, kernel_options,
score_mod_other_buffers, mask_mod_other_buffers) -> (out, lse, max_scores)``

``flex_attention_backward_hop(query, key, value, out, lse, grad_out, grad_lse, fw_graph,
joint_graph, block_mask, scale, kernel_options, score_mod_other_buffers, mask_mod_other_buffers)
-> (grad_query, grad_key, grad_value, grads of score_mod_other_buffers)``

``block_mask`` is the tuple made by ``block_mask_tuple``: ``(Q_LEN, KV_LEN, kv_num_blocks,
kv_indices, full_kv_num_blocks, full_kv_indices, q_num_blocks, q_indices, full_q_num_blocks,
full_q_indices, Q_BLOCK_SIZE, KV_BLOCK_SIZE, mask_mod)``; the tensors are all None for "no
mask". The mods take their captured tensors as trailing arguments (``score_mod(score, b, h,
q_idx, kv_idx, *score_mod_other_buffers)``), so one traced graph serves any tensor values.

Implementations (one per dispatch key): dense (the eager backend choice: the fused kernel on
CUDA, else the chunked math path), fake tensors (shapes only), make_fx tracing (the mods become
FX subgraph modules of the traced graph), functionalization (which, inside Inductor's trace,
emits the chunked decomposition of lowering/cpu.py instead), and autograd (the backward HOP,
whose dense implementation recomputes through the math path chunk by chunk).
"""
from __future__ import annotations

import contextlib
from typing import Callable, Optional

import torch

from . import compat
from .block_mask import BlockMask
from .mods import TensorIndexMode, noop_mask
from .reference import math_attention

DispatchKey = compat.dispatch_key()
HigherOrderOperator = compat.higher_order_operator_class()

# positions inside the block_mask tuple
BM_TENSORS = slice(2, 10)
BM_MASK_MOD = 12


def identity_score(score, b, h, q_idx, kv_idx):
    return score


def block_mask_tuple(block_mask: Optional[BlockMask], q_len, kv_len) -> tuple:
    """The HOP's view of a BlockMask (or of "no mask")."""
    if block_mask is None:
        return (q_len, kv_len, None, None, None, None, None, None, None, None, 1, 1, noop_mask)
    return (q_len, kv_len, *block_mask.as_tuple(), *block_mask.BLOCK_SIZE, block_mask.mask_mod)


def _with_buffers(fn: Callable, buffers: tuple) -> Callable:
    if not buffers:
        return fn

    def bound(*args):
        return fn(*args, *buffers)

    bound.__name__ = getattr(fn, "__name__", "mod")
    return bound


def _as_block_mask(bm: tuple, mask_mod_buffers: tuple, opts: Optional[dict] = None) -> Optional[BlockMask]:
    if bm[2] is None:
        return None
    out = BlockMask((bm[0], bm[1]), *bm[BM_TENSORS], (bm[10], bm[11]), _with_buffers(bm[BM_MASK_MOD], mask_mod_buffers))
    # what tracing knew of the lists (attention.traced_block_mask_facts): no device read per call
    opts = opts or {}
    out._runs_kv, out._runs_q = bool(opts.get("_KV_RUNS")), bool(opts.get("_Q_RUNS"))
    out._union_kv, out._union_q = bool(opts.get("_KV_UNION")), bool(opts.get("_Q_UNION"))
    out.full_from_mask_mod = bool(opts.get("_FULL_FROM_MASK_MOD"))
    return out


def _stats_dtype(query: torch.Tensor) -> torch.dtype:
    return torch.float64 if query.dtype == torch.float64 else torch.float32


# ---- the operators -----------------------------------------------------------------------------
class FlexAttentionHOP(HigherOrderOperator):
    def __init__(self):
        super().__init__("inductor_flex_attention")

    def __call__(self, query, key, value, score_mod, block_mask, scale, kernel_options,
                 score_mod_other_buffers=(), mask_mod_other_buffers=()):
        _check_buffers(score_mod_other_buffers, "score_mod")
        _check_buffers(mask_mod_other_buffers, "mask_mod")
        return super().__call__(query, key, value, score_mod, block_mask, scale, kernel_options,
                                tuple(score_mod_other_buffers), tuple(mask_mod_other_buffers))


class FlexAttentionBackwardHOP(HigherOrderOperator):
    def __init__(self):
        super().__init__("inductor_flex_attention_backward")

    def __call__(self, query, key, value, out, lse, grad_out, grad_lse, fw_graph, joint_graph, block_mask,
                 scale, kernel_options, score_mod_other_buffers=(), mask_mod_other_buffers=()):
        return super().__call__(query, key, value, out, lse, grad_out, grad_lse, fw_graph, joint_graph,
                                block_mask, scale, kernel_options, tuple(score_mod_other_buffers),
                                tuple(mask_mod_other_buffers))


def _check_buffers(buffers, kind: str) -> None:
    for b in buffers:
        if not isinstance(b, (torch.Tensor, torch.SymInt, int, float)):
            raise TypeError(f"{kind} captures a {type(b).__name__}; only tensors and numbers can be captured")


flex_attention_hop = FlexAttentionHOP()
flex_attention_backward_hop = FlexAttentionBackwardHOP()


# ---- dense implementations ---------------------------------------------------------------------
def dense_forward(query, key, value, score_mod, block_mask, scale, kernel_options, score_bufs, mask_bufs):
    # the eager rule of the HOP (backends eager / aot_eager): the same backend choice as an eager
    # call, so CUDA tensors run the fused kernel with the traced mods printed into it
    sm = None if score_mod is identity_score else _with_buffers(score_mod, score_bufs)
    bm = _as_block_mask(block_mask, mask_bufs, kernel_options)
    opts = dict(kernel_options or {})
    opts.setdefault("BACKEND", "AUTO")
    with torch.no_grad():
        from .attention import _choose_backend

        if _choose_backend(opts, query, sm, bm) != "MATH":
            from .kernel import kernel_attention
            from .mods import FlexModError

            try:
                return kernel_attention(query, key, value, sm, bm, scale, opts)
            except FlexModError as e:
                if opts["BACKEND"] != "AUTO" or "not supported by the Triton kernel" not in str(e):
                    raise
        return math_attention(query, key, value, sm, bm, scale)


def dense_backward(query, key, value, out, lse, grad_out, grad_lse, fw_graph, joint_graph, block_mask, scale,
                   kernel_options, score_bufs, mask_bufs):
    # the same choice as the forward: the fused backward kernels where the forward ran the kernel
    sm = None if fw_graph is identity_score else _with_buffers(fw_graph, score_bufs)
    bm = _as_block_mask(block_mask, mask_bufs, kernel_options)
    opts = dict(kernel_options or {})
    opts.setdefault("BACKEND", "AUTO")
    from .attention import _choose_backend

    if _choose_backend(opts, query, sm, bm) != "MATH":
        from .backward import kernel_backward
        from .mods import FlexModError

        try:
            with compat.above_autograd():  # tracing the score_mod's joint graph needs autograd
                dq, dk, dv, dbufs = kernel_backward(query, key, value, out, lse, grad_out, grad_lse, sm, bm,
                                                    scale, opts, score_bufs)
            return dq, dk, dv, tuple(dbufs)
        except FlexModError as e:
            if opts["BACKEND"] != "AUTO" or "not supported by the Triton kernel" not in str(e):
                raise
    with compat.above_autograd(), torch.enable_grad():
        q, k, v = (t.detach().requires_grad_(True) for t in (query, key, value))
        bufs = tuple(b.detach().requires_grad_(True) if _differentiable(b) else b for b in score_bufs)
        o, l, _ = math_attention(q, k, v, _with_buffers(fw_graph, bufs), _as_block_mask(block_mask, mask_bufs), scale)
        outs, grads = [o], [grad_out]
        if grad_lse is not None:
            outs.append(l)
            grads.append(grad_lse.to(l.dtype))
        wrt = [q, k, v] + [b for b in bufs if _differentiable(b)]
        res = torch.autograd.grad(outs, wrt, grads, allow_unused=True)
    dq, dk, dv = (torch.zeros_like(t) if g is None else g for t, g in zip((query, key, value), res[:3]))
    it = iter(res[3:])
    dbufs = []
    for b in score_bufs:
        if _differentiable(b):
            g = next(it)
            dbufs.append(torch.zeros_like(b) if g is None else g)
        else:
            dbufs.append(None)
    return dq, dk, dv, tuple(dbufs)


def _differentiable(b) -> bool:
    return isinstance(b, torch.Tensor) and b.dtype.is_floating_point


flex_attention_hop.py_impl(DispatchKey.CompositeExplicitAutograd)(dense_forward)
flex_attention_backward_hop.py_impl(DispatchKey.CompositeExplicitAutograd)(dense_backward)


# ---- fake tensors ------------------------------------------------------------------------------
@flex_attention_hop.py_impl(compat.fake_tensor_mode_class())
def _forward_fake(mode, query, key, value, score_mod, block_mask, scale, kernel_options, score_bufs, mask_bufs):
    with mode:
        return forward_meta(query, key, value)


def forward_meta(query, key, value):
    B, Hq, Lq, _ = query.shape
    out = query.new_empty(B, Hq, Lq, value.shape[-1])
    lse = query.new_empty(B, Hq, Lq, dtype=_stats_dtype(query))
    return out, lse, torch.empty_like(lse)


@flex_attention_backward_hop.py_impl(compat.fake_tensor_mode_class())
def _backward_fake(mode, query, key, value, out, lse, grad_out, grad_lse, fw_graph, joint_graph, block_mask, scale,
                   kernel_options, score_bufs, mask_bufs):
    with mode:
        return backward_meta(query, key, value, score_bufs)


def backward_meta(query, key, value, score_bufs):
    dbufs = tuple(torch.empty_like(b) if _differentiable(b) else None for b in score_bufs)
    return torch.empty_like(query), torch.empty_like(key), torch.empty_like(value), dbufs


# ---- make_fx tracing: the mods become subgraph modules ----------------------------------------
def _index_args(query, with_score: bool):
    idx = [query.new_zeros((), dtype=torch.int32) for _ in range(4)]
    if with_score:
        return [query.new_zeros((), dtype=_stats_dtype(query))] + idx
    return idx


def _trace_mod(mode, fn, example_args, prefix: str):
    if isinstance(fn, torch.fx.GraphModule) and getattr(fn, "_inductor_flex_traced", False):
        gm = fn
    else:
        with TensorIndexMode():
            gm = compat.reenter_make_fx(fn)(*example_args)
        gm._inductor_flex_traced = True
    name = compat.unique_graph_name(mode, prefix)
    mode.tracer.root.register_module(name, gm)
    return gm


def joint_function(fw_graph: Callable) -> Callable:
    """The score_mod's vector-Jacobian product: (score, b, h, q, kv, grad_score, *bufs) ->
    (grad_score_in, *grads of the floating-point bufs). Fused backward kernels inline it."""

    def joint(score, b, h, m, n, grad_score, *bufs):
        with torch.enable_grad():
            s = score.detach().requires_grad_(True)
            diff = [x.detach().requires_grad_(True) if _differentiable(x) else x for x in bufs]
            y = fw_graph(s, b, h, m, n, *diff)
            wrt = [s] + [x for x in diff if _differentiable(x)]
            grads = torch.autograd.grad(y, wrt, grad_score, allow_unused=True)
        return tuple(torch.zeros_like(w) if g is None else g for w, g in zip(wrt, grads))

    return joint


def _maybe_trace_joint(score_mod, query, score_bufs):
    # Only a make_fx trace (AOTAutograd) needs the joint as a graph. It is traced here, above the
    # Autograd key (the backward HOP's trace runs below it, where autograd cannot record), as a
    # separate trace on fresh fake tensors of the same fake mode, outside functionalization.
    if not compat.under_make_fx():
        return None
    fake_mode = compat.detect_fake_mode((query, *score_bufs))
    with compat.disable_current_modes():
        with fake_mode:
            # four distinct index tensors: one object for all would make the trace read n for m
            scalars = [torch.zeros((), dtype=_stats_dtype(query))] + [torch.zeros((), dtype=torch.int32) for _ in range(4)]
            bufs = [torch.empty_strided(b.shape, b.stride(), dtype=b.dtype) if isinstance(b, torch.Tensor) else b
                    for b in score_bufs]
            args = scalars + [torch.zeros((), dtype=_stats_dtype(query))] + bufs
        with TensorIndexMode():
            gm = compat.make_fx(joint_function(score_mod), tracing_mode="fake")(*args)
    gm._inductor_flex_traced = True
    return gm


def _proxy_call(mode, hop, args, out):
    proxy = mode.tracer.create_proxy("call_function", hop, compat.proxies_of(mode, args), {}, name=hop._name)
    return compat.track_tensor_tree(out, proxy, mode.tracer)


@flex_attention_hop.py_impl(compat.proxy_mode_class())
def _forward_trace(mode, query, key, value, score_mod, block_mask, scale, kernel_options, score_bufs, mask_bufs):
    s_args = _index_args(query, True) + list(score_bufs)
    m_args = _index_args(query, False) + list(mask_bufs)
    score_gm = _trace_mod(mode, score_mod, s_args, "flex_score_mod")
    mask_gm = _trace_mod(mode, block_mask[BM_MASK_MOD], m_args, "flex_mask_mod")
    bm = (*block_mask[:BM_MASK_MOD], mask_gm)
    out = flex_attention_hop(query, key, value, score_gm, bm, scale, kernel_options, score_bufs, mask_bufs)
    return _proxy_call(mode, flex_attention_hop,
                       (query, key, value, score_gm, bm, scale, kernel_options, score_bufs, mask_bufs), out)


@flex_attention_backward_hop.py_impl(compat.proxy_mode_class())
def _backward_trace(mode, query, key, value, out, lse, grad_out, grad_lse, fw_graph, joint_graph, block_mask, scale,
                    kernel_options, score_bufs, mask_bufs):
    s_args = _index_args(query, True) + list(score_bufs)
    fw_gm = _trace_mod(mode, fw_graph, s_args, "flex_fw_graph")
    joint_gm = None
    if joint_graph is not None:
        j_args = _index_args(query, True) + [query.new_zeros((), dtype=_stats_dtype(query))] + list(score_bufs)
        joint_gm = _trace_mod(mode, joint_graph, j_args, "flex_joint_graph")
    m_args = _index_args(query, False) + list(mask_bufs)
    mask_gm = _trace_mod(mode, block_mask[BM_MASK_MOD], m_args, "flex_mask_graph")
    bm = (*block_mask[:BM_MASK_MOD], mask_gm)
    args = (query, key, value, out, lse, grad_out, grad_lse, fw_gm, joint_gm, bm, scale, kernel_options,
            score_bufs, mask_bufs)
    res = flex_attention_backward_hop(*args)
    return _proxy_call(mode, flex_attention_backward_hop, args, res)


# ---- functionalization -------------------------------------------------------------------------
def decompose_here() -> bool:
    """Whether the running trace replaces the HOP by the chunked decomposition: Inductor's AOT
    trace (lowering/forward.py puts the HOPs in Inductor's decomposition table). Decomposing
    here, above the make_fx rule, keeps the emitted code functionalized."""
    return flex_attention_hop in compat.current_decomposition_table()


def _functional_mode(ctx):
    # the Python functionalization mode is popped while a HOP rule runs; code we emit here must
    # run under it again (C++ functionalization has no mode object and needs nothing)
    mode = getattr(ctx, "mode", None)
    return mode if mode is not None else contextlib.nullcontext()


@flex_attention_hop.py_functionalize_impl
def _forward_functionalize(ctx, query, key, value, score_mod, block_mask, scale, kernel_options, score_bufs,
                           mask_bufs):
    from inductor_flex.lowering import template

    if decompose_here():
        from inductor_flex.lowering.decode import try_decode_forward

        # short queries: the split-KV decode kernel as one op (lowering/decode.py)
        with _functional_mode(ctx):
            res = try_decode_forward(query, key, value, score_mod, block_mask, scale, kernel_options, score_bufs,
                                     mask_bufs)
        if res is not None:
            return res
    if decompose_here() and not template.takes(query, key, value, score_mod, block_mask, kernel_options,
                                               score_bufs, mask_bufs):
        # (a call the template takes keeps the HOP node: Inductor lowers it, lowering/template.py)
        from inductor_flex.lowering.cpu import chunked_forward
        from inductor_flex.lowering.kernel_op import try_kernel_forward

        with _functional_mode(ctx):
            res = try_kernel_forward(query, key, value, score_mod, block_mask, scale, kernel_options, score_bufs,
                                     mask_bufs)
        if res is not None:
            return res
        with _functional_mode(ctx), TensorIndexMode():
            return chunked_forward(query, key, value, score_mod, block_mask, scale, score_bufs, mask_bufs)
    q, k, v = ctx.unwrap_tensors((query, key, value))
    bm = ctx.unwrap_tensors(block_mask[:BM_MASK_MOD])
    sb, mb = ctx.unwrap_tensors(score_bufs), ctx.unwrap_tensors(mask_bufs)
    sm = ctx.functionalize(score_mod)
    mm = ctx.functionalize(block_mask[BM_MASK_MOD])
    with ctx.redispatch_to_next():
        res = flex_attention_hop(q, k, v, sm, (*bm, mm), scale, kernel_options, tuple(sb), tuple(mb))
    return ctx.wrap_tensors(res)


@flex_attention_backward_hop.py_functionalize_impl
def _backward_functionalize(ctx, query, key, value, out, lse, grad_out, grad_lse, fw_graph, joint_graph, block_mask,
                            scale, kernel_options, score_bufs, mask_bufs):
    from inductor_flex.lowering import backward as backward_template

    # (a call the backward template takes keeps the HOP node: Inductor lowers it, lowering/backward.py)
    if decompose_here() and not backward_template.takes(query, key, value, fw_graph, joint_graph, block_mask,
                                                        kernel_options, score_bufs, mask_bufs):
        from inductor_flex.lowering.cpu import chunked_backward
        from inductor_flex.lowering.kernel_op import try_kernel_backward

        with _functional_mode(ctx):
            res = try_kernel_backward(query, key, value, out, lse, grad_out, grad_lse, fw_graph, block_mask, scale,
                                      kernel_options, score_bufs, mask_bufs)
        if res is not None:
            return res
        # the backward HOP was dispatched below autograd; the chunks differentiate themselves
        with _functional_mode(ctx), compat.above_autograd(), torch.enable_grad(), TensorIndexMode():
            return chunked_backward(query, key, value, out, lse, grad_out, grad_lse, fw_graph, block_mask, scale,
                                    score_bufs, mask_bufs)
    tensors = ctx.unwrap_tensors((query, key, value, out, lse, grad_out, grad_lse))
    bm = ctx.unwrap_tensors(block_mask[:BM_MASK_MOD])
    sb, mb = ctx.unwrap_tensors(score_bufs), ctx.unwrap_tensors(mask_bufs)
    fw = ctx.functionalize(fw_graph)
    joint = ctx.functionalize(joint_graph) if joint_graph is not None else None
    mm = ctx.functionalize(block_mask[BM_MASK_MOD])
    with ctx.redispatch_to_next():
        res = flex_attention_backward_hop(*tensors, fw, joint, (*bm, mm), scale, kernel_options, tuple(sb), tuple(mb))
    return ctx.wrap_tensors(res)


# ---- autograd ----------------------------------------------------------------------------------
# backward HOP kernel_options key: for each score_mod captured value, whether its gradient is used
SCORE_BUF_GRADS = "_SCORE_BUF_GRADS"


class _FlexAttentionAutograd(torch.autograd.Function):
    @staticmethod
    def forward(ctx, query, key, value, score_mod, joint_graph, block_mask, scale, kernel_options, n_score_bufs, *bufs):
        score_bufs, mask_bufs = bufs[:n_score_bufs], bufs[n_score_bufs:]
        with compat.below_autograd():
            out, lse, mx = flex_attention_hop(query, key, value, score_mod, block_mask, scale, kernel_options,
                                              score_bufs, mask_bufs)
        ctx.fw_graph, ctx.joint_graph = score_mod, joint_graph
        ctx.block_mask_static = tuple(None if isinstance(x, torch.Tensor) else x for x in block_mask)
        ctx.bm_tensor_pos = [i for i, x in enumerate(block_mask) if isinstance(x, torch.Tensor)]
        ctx.scale, ctx.kernel_options, ctx.n_score_bufs = scale, kernel_options, n_score_bufs
        bm_tensors = [block_mask[i] for i in ctx.bm_tensor_pos]
        ctx.n_bm = len(bm_tensors)
        ctx.set_materialize_grads(False)
        # captured values may be SymInts (e.g. a sequence length under dynamic shapes): keep those on ctx
        ctx.bufs_static = [None if isinstance(b, torch.Tensor) else b for b in bufs]
        ctx.save_for_backward(query, key, value, out, lse, *bm_tensors, *(b for b in bufs if isinstance(b, torch.Tensor)))
        ctx.mark_non_differentiable(mx)
        return out, lse, mx

    @staticmethod
    def backward(ctx, grad_out, grad_lse, grad_max):
        saved = ctx.saved_tensors
        query, key, value, out, lse = saved[:5]
        bm_tensors = list(saved[5:5 + ctx.n_bm])
        it = iter(saved[5 + ctx.n_bm:])
        bufs = tuple(next(it) if b is None else b for b in ctx.bufs_static)
        score_bufs, mask_bufs = bufs[:ctx.n_score_bufs], bufs[ctx.n_score_bufs:]
        bm = list(ctx.block_mask_static)
        for i, t in zip(ctx.bm_tensor_pos, bm_tensors):
            bm[i] = t
        bm = tuple(bm)
        if grad_out is None:
            grad_out = torch.zeros_like(out)
        # which captured score_mod tensors want a gradient: a backward that sums none of them can be
        # Inductor's template (lowering/backward.py)
        wanted = tuple(bool(ctx.needs_input_grad[9 + i]) for i in range(ctx.n_score_bufs))
        options = {**(ctx.kernel_options or {}), SCORE_BUF_GRADS: wanted}
        dq, dk, dv, dbufs = flex_attention_backward_hop(
            query, key, value, out, lse, grad_out, grad_lse, ctx.fw_graph, ctx.joint_graph, bm, ctx.scale, options,
            score_bufs, mask_bufs)
        grads_bufs = list(dbufs) + [None] * len(mask_bufs)
        return (dq, dk, dv, None, None, None, None, None, None, *grads_bufs)


@flex_attention_hop.py_impl(DispatchKey.Autograd)
def _forward_autograd(query, key, value, score_mod, block_mask, scale, kernel_options, score_bufs, mask_bufs):
    tensors = (query, key, value, *score_bufs)
    if not torch.is_grad_enabled() or not any(isinstance(t, torch.Tensor) and t.requires_grad for t in tensors):
        with compat.below_autograd():
            return flex_attention_hop(query, key, value, score_mod, block_mask, scale, kernel_options,
                                      score_bufs, mask_bufs)
    joint = _maybe_trace_joint(score_mod, query, score_bufs)
    return _FlexAttentionAutograd.apply(query, key, value, score_mod, joint, block_mask, scale, kernel_options,
                                        len(score_bufs), *score_bufs, *mask_bufs)


@flex_attention_backward_hop.py_impl(DispatchKey.Autograd)
def _backward_autograd(*args):
    # double backward is not supported; the backward's own outputs are not differentiated
    with compat.below_autograd():
        return flex_attention_backward_hop(*args)
