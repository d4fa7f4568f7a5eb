"""The backward template lowered by Inductor itself (CUDA).

``templates/flex_backward.py.jinja`` is rendered once per kernel, as the forward is in
``lowering/template.py``: the dK/dV kernel (its output dK, dV written as a mutated input) and the
dQ kernel. Their hooks hold Inductor's template calls: the score_mod, the mask_mod and the
score_mod's joint graph (``modification`` of subgraphs 0, 1, 2), strides and sizes of the graph's
buffers, and ``store_output`` for dK / dQ. The dQ kernel runs first and also writes
delta = rowsum(dO · O) - dLSE (a mutated input) for the dK/dV kernel, as on the eager path. Both
kernels' block sizes are picked by Inductor's template benchmarks from the eager autotuner's
candidates (``lowering/configs.py``).

Which backward calls come here is decided while AOTAutograd traces the backward HOP (``takes``):
the calls the forward template takes where no floating-point tensor captured by the score_mod
needs a gradient (the autograd rule names those that do, ``hop.SCORE_BUF_GRADS``; their
gradients, summed by atomics, stay with the custom op of ``lowering/kernel_op.py``) and without
the FUSED_DQ / pinned-config options of the eager kernels.
"""
from __future__ import annotations

import math

import torch

from inductor_flex import compat
from inductor_flex.validation import use_fast_tanh
from inductor_flex.hop import SCORE_BUF_GRADS
from inductor_flex.joint_graph import derivative_is_bounded, fold_constant_factors, prescale
from inductor_flex.templates import render

from . import template as fwd
from . import tuning_masks
from .configs import backward_configs, head_pad

ENABLED = True
_PINNED = ("BLOCK_M1", "BLOCK_N1", "BLOCK_M2", "BLOCK_N2", "FUSED_DQ")
_DKDV_BM = ("Q_NUM", "Q_IDX", "FULL_Q_NUM", "FULL_Q_IDX")
_DQ_BM = ("KV_NUM", "KV_IDX", "FULL_NUM", "FULL_IDX")

_SCALARS = [
    '    Q_LEN = {{size("Q", 2)}}',
    '    KV_LEN = {{size("K", 2)}}',
    '    HQ = {{size("Q", 1)}}',
    '    HKV = {{size("K", 1)}}',
    '    GQA_GROUP = {{size("Q", 1)}} // {{size("K", 1)}}',
]
_STRIDES = [
    '    stride_qb, stride_qh, stride_qm, stride_qd = {{stride("Q")}}',
    '    stride_kb, stride_kh, stride_kn, stride_kd = {{stride("K")}}',
    '    stride_vb, stride_vh, stride_vn, stride_vd = {{stride("V")}}',
    '    stride_dob, stride_doh, stride_dom, stride_dod = {{stride("DO")}}',
]


# ---- trace time: does this backward call take the template? ---------------------------------------
def takes(query, key, value, fw_graph, joint_graph, block_mask, kernel_options, score_bufs, mask_bufs) -> bool:
    opts = dict(kernel_options or {})
    if not ENABLED or joint_graph is None or any(k in opts for k in _PINNED):
        return False
    wanted = opts.get(SCORE_BUF_GRADS, (True,) * len(score_bufs))
    if any(isinstance(b, torch.Tensor) and b.dtype.is_floating_point and w for b, w in zip(score_bufs, wanted)):
        return False  # a captured tensor's gradient to sum: the custom op's atomics
    return fwd.takes(query, key, value, fw_graph, block_mask, kernel_options, score_bufs, mask_bufs, gluon_ok=False)


# ---- stage one: our hooks, filled with Inductor's template calls --------------------------------
def _kernel_def(kernel: str, dense: bool, bm_strides, scale: float, qk_scale: float, grad_lse: bool = False) -> str:
    if kernel == "dkdv":
        names = ["Q", "K", "V", "DO", "LSE", "DELTA", "DV"] + ([] if dense else list(_DKDV_BM))
        strides = _STRIDES + ['    stride_dvb, stride_dvh, stride_dvn, stride_dvd = {{stride("DV")}}',
                              f"    stride_nb, stride_nh, stride_nn = {bm_strides[0]}",
                              f"    stride_ib, stride_ih, stride_in = {bm_strides[1]}",
                              "    DQ_ACC = DELTA  # FUSED_DQ is off: never written"]
        bm_names = _DKDV_BM
    else:
        # DELTA: written by this kernel (FUSE_DELTA), a mutated input; GRAD_LSE only with an lse gradient
        names = (["Q", "K", "V", "DO", "LSE", "DELTA", "OUT"] + (["GRAD_LSE"] if grad_lse else [])
                 + ([] if dense else list(_DQ_BM)))
        strides = _STRIDES + ['    stride_ob, stride_oh, stride_om, stride_od = {{stride("OUT")}}',
                              f"    stride_nb, stride_nh, stride_nm = {bm_strides[0]}",
                              f"    stride_ib, stride_ih, stride_im = {bm_strides[1]}"]
        if not grad_lse:
            strides.append("    GRAD_LSE = DELTA  # HAS_GRAD_LSE is off: never read")
        bm_names = _DQ_BM
    lines = ["{{def_kernel(%s)}}" % ", ".join(f'"{n}"' for n in names)] + strides + _SCALARS + [
        f"    scale = {scale!r}",
        f"    qk_scale = {qk_scale!r}",
    ]
    if dense:  # the sparse branch is compiled out; its names still need a value
        lines += [f"    {n} = LSE" for n in bm_names]
    return "\n".join(lines)


def _store(transposed: bool) -> str:
    rows, val, mask, tile = ("idx_n", "dk", "dk_mask", "BLOCK_N") if transposed else ("idx_m", "dq", "dq_mask", "BLOCK_M")
    shape = f', val_shape=("{tile}", "QK_PAD")' if compat.store_output_takes_shape() else ""
    return '{{store_output(("idx_b", "idx_h", "%s", "idx_d"), "%s", "%s"%s)}}' % (rows, val, mask, shape)


_NO_JOINT = ("@triton.jit\n"
             "def score_mod_bwd(score, b, h, q_idx, kv_idx, grad_score, GRAD_CAPS):\n"
             "    return grad_score  # no score_mod: never called\n")


def _template(kernel: str, dense: bool, bm_strides, scale: float, qk_scale: float, has_score_mod: bool,
              score_loads: bool, mask_loads: bool, guard: bool = True, mod_scale: float = 1.0,
              grad_lse: bool = False, separable: bool = False):
    from inductor_flex.printer import HELPERS

    transposed = kernel == "dkdv"
    argdefs = "{{gen_argdefs()}}, "
    source = render(
        "flex_backward.py.jinja",
        inductor=True,
        mod_scale=repr(float(mod_scale)),
        kernel=kernel,
        description="score_mod, mask_mod and the score_mod's joint graph lowered by Inductor",
        helpers=HELPERS,
        kernel_def=_kernel_def(kernel, dense, bm_strides, scale, qk_scale, grad_lse),
        score_mod_source=fwd._mod_helper("score_mod", 0, True, score_loads, transposed),
        mask_mod_source=fwd._mod_helper("mask_mod", 1, False, mask_loads, transposed),
        score_mod_bwd_source=(fwd._mod_helper("score_mod_bwd", 2, True, score_loads, transposed, with_grad=True,
                                                guard=guard)
                              if has_score_mod else _NO_JOINT),
        # subgraphs 3-5 follow the joint graph (2)
        separable_source=fwd.separable_source(3, score_loads, transposed) if separable else "",
        mod_params=argdefs,
        mod_args=argdefs,
        grad_params="",
        grad_args="",
        score_mod_args="{{gen_argdefs()}}",
        mask_mod_args="{{gen_argdefs()}}",
        score_bwd_args=argdefs if has_score_mod else "",
        store_output=_store(transposed),
        linear_grad=has_score_mod and not guard,
    )
    return fwd.triton_template(f"inductor_flex_bwd_{kernel}", source, _GRIDS[kernel])


def _dkdv_grid(batch, heads, kv_len, head_dim, meta, *, cdiv):
    return (cdiv(kv_len, meta["BLOCK_N"]), batch * heads, 1)


def _dq_grid(batch, heads, q_len, head_dim, meta, *, cdiv):
    return (cdiv(q_len, meta["BLOCK_M"]), batch * heads, 1)


_GRIDS = {"dkdv": _dkdv_grid, "dq": _dq_grid}


# ---- the lowering ------------------------------------------------------------------------------
def _score_grad_only(gm):
    """The joint graph with its captured-tensor gradients dropped (none is used here, see takes):
    only the score's gradient, a pointwise value the template can inline."""
    import copy

    out = next(n for n in gm.graph.nodes if n.op == "output")
    if len(out.args[0]) == 1:
        return gm
    gm = copy.deepcopy(gm)
    out = next(n for n in gm.graph.nodes if n.op == "output")
    out.args = ((out.args[0][0],),)
    for node in reversed(list(gm.graph.nodes)):  # (the in-place index_put_ of a gradient counts as impure)
        if node.op not in ("placeholder", "output") and not node.users:
            gm.graph.erase_node(node)
    gm.recompile()
    return gm


def lower_backward(query, key, value, out, lse, grad_out, grad_lse, fw_graph, joint_graph, block_mask, scale,
                   kernel_options, score_bufs, mask_bufs):
    """Inductor lowering of flex_attention_backward_hop -> (dq, dk, dv, grads of score_bufs)."""
    ir = compat.inductor_ir()
    empty_strided = compat.inductor_lowering(torch.ops.aten.empty_strided.default)
    require = ir.ExternKernel.require_contiguous
    query, key, value, grad_out, out = compat.inductor_realize(query, key, value, grad_out, out)
    (lse,) = compat.inductor_realize(require(lse))
    if grad_lse is not None:
        f32 = compat.inductor_lowering(torch.ops.prims.convert_element_type.default)
        (grad_lse,) = compat.inductor_realize(require(f32(grad_lse, torch.float32)))
    score_bufs = compat.inductor_realize(*score_bufs)
    mask_bufs = compat.inductor_realize(*mask_bufs)
    device, dtype = query.get_device(), query.get_dtype()
    B, Hq, Lq, E = query.get_size()
    Hkv, Lkv = key.get_size()[1], key.get_size()[2]
    Ev = value.get_size()[3]
    E, Ev = compat.static_int(E), compat.static_int(Ev)
    opts = dict(kernel_options or {})

    idx = [fwd._placeholder(n, torch.int32, device) for n in ("b", "h", "m", "n")]
    fast_tanh = use_fast_tanh(opts, dtype, device.type == "cuda")
    has_score_mod = not fwd._is_identity(fw_graph.graph_module)
    scale = 1.0 / math.sqrt(E) if scale is None else float(scale)
    # the mods take the raw q·k, as in the forward (joint_graph.prescale)
    score_gm, mod_scale = prescale(fw_graph.graph_module, scale, strip_factor=True)
    score_gm = fwd._exp_tanh(score_gm, fast_tanh)
    score_ph = fwd._placeholder("score", torch.float32, device)
    subgraphs = [fwd._subgraph_buffer(score_gm, [score_ph, *idx, *score_bufs]),
                 fwd._subgraph_buffer(block_mask[12].graph_module, [*idx, *mask_bufs])]
    guard = True
    if has_score_mod:
        grad_ph = fwd._placeholder("grad_score", torch.float32, device)
        joint_gm = fold_constant_factors(_score_grad_only(joint_graph.graph_module))
        guard = not derivative_is_bounded(joint_gm)
        joint_gm, _ = prescale(joint_gm, scale)
        subgraphs.append(fwd._subgraph_buffer(fwd._exp_tanh(joint_gm, fast_tanh),
                                              [score_ph, *idx, grad_ph, *score_bufs]))
    parts = fwd.separable_subgraphs(fw_graph.graph_module, scale, opts, dtype, idx, score_bufs) if has_score_mod else []
    subgraphs += parts

    dense = block_mask[2] is None
    if dense:
        sparse, kv_side, q_side, has_full = (128, 128), [], [], False
    else:
        sparse = (compat.static_int(block_mask[10]), compat.static_int(block_mask[11]))
        kv_side, has_full = fwd._block_mask_inputs(block_mask, device, "kv")
        q_side, _ = fwd._block_mask_inputs(block_mask, device, "q")
        nq, nk = (compat.size_hint(d) for d in kv_side[1].get_size()[-2:])
        recorded = tuning_masks.lookup(opts.get(tuning_masks.TUNE_KEY)) or (None,) * 8

    qk_scale = scale if has_score_mod else scale * 1.4426950408889634
    common = dict(HAS_SCORE_MOD=has_score_mod, QK_HEAD=E, V_HEAD=Ev, QK_PAD=head_pad(E), V_PAD=head_pad(Ev),
                  SPARSE_Q=sparse[0], SPARSE_KV=sparse[1], DENSE=dense, SEPARABLE=bool(parts),
                  DOT_PRECISION='"ieee"' if dtype == torch.float32 else '"tf32"')
    interpret = device.type == "cpu"
    # the eager rule: small problems take each kernel's first candidate, without benchmarks
    first_only = not fwd.sizes_autotune_pays(B, Hq, Lq, Lkv)
    loads = (bool(score_bufs), bool(mask_bufs))
    extra = list(score_bufs) + list(mask_bufs)

    # dQ first, one program per query tile of a query head: it also writes delta = rowsum(dO · O) -
    # dLSE (a mutated input) from the dO tile it holds, for the dK/dV kernel below
    delta = empty_strided([B, Hq, Lq], None, dtype=torch.float32, device=device)
    inputs = [query, key, value, grad_out, lse, delta, out] + ([grad_lse] if grad_lse is not None else []) + kv_side
    tmpl = _template("dq", dense, fwd._bm_strides(kv_side[:2], dense), scale, qk_scale, has_score_mod, *loads, guard,
                     mod_scale, grad_lse=grad_lse is not None, separable=bool(parts))
    layout = ir.FixedLayout(device, dtype, [B, Hq, Lq, E], ir.FlexibleLayout.contiguous_strides([B, Hq, Lq, E]))
    at = len(inputs) - len(kv_side)  # where the BlockMask inputs start
    gen = {} if dense else (fwd._recorded_block_mask(recorded[:4], kv_side, offset=at)
                            or fwd._stand_in_block_mask(has_full, nq, nk, side="kv", offset=at))
    choices, error = [], None
    for cfg in backward_configs("dq", E, Ev, dtype, sparse, interpret)[:1 if first_only else None]:
        error = tmpl.maybe_append_choice(
            choices, input_nodes=inputs, layout=layout, subgraphs=subgraphs, mutated_inputs=[delta],
            call_sizes=[B, Hq, Lq, E], num_stages=cfg.num_stages, num_warps=cfg.num_warps,
            BLOCK_M=cfg.BLOCK_M, BLOCK_N=cfg.BLOCK_N, GRAD_CAPS=False, FUSE_DELTA=True,
            HAS_GRAD_LSE=grad_lse is not None,
            EVEN_M=compat.known_multiple_of(Lq, cfg.BLOCK_M),
            EVEN_N=compat.known_multiple_of(Lkv, cfg.BLOCK_N if dense else sparse[1]), **common,
            # a query block's kv blocks are runs (known when traced: attention.traced_block_mask_facts),
            # or one run together, walked in one loop (kernel.plan_union_walk)
            RUNS=not dense and bool(opts.get("_KV_RUNS")), UNION=_union_walk(dense, opts, "KV"),
        ) or error
    if not choices:
        raise RuntimeError(f"inductor_flex: no dQ template config could be generated: {error}")
    dq = compat.select_template("inductor_flex_backward_dq", choices, inputs + extra, layout, gen)

    # dK (the template's output) and dV (a mutated input), one program per kv tile of a kv head
    dv = empty_strided(list(value.get_size()), None, dtype=dtype, device=device)
    inputs = [query, key, value, grad_out, lse, delta, dv] + q_side
    tmpl = _template("dkdv", dense, fwd._bm_strides(q_side[:2], dense, ("Q_NUM", "Q_IDX")), scale, qk_scale,
                     has_score_mod, *loads, guard, mod_scale, separable=bool(parts))
    layout = ir.FixedLayout(device, dtype, [B, Hkv, Lkv, E], ir.FlexibleLayout.contiguous_strides([B, Hkv, Lkv, E]))
    gen = {} if dense else (fwd._recorded_block_mask(recorded[4:8], q_side, offset=7)
                            or fwd._stand_in_block_mask(has_full, nq, nk, side="q", offset=7))
    choices, error = [], None
    for cfg in backward_configs("dkdv", E, Ev, dtype, sparse, interpret)[:1 if first_only else None]:
        # query tiles walk whole sparse blocks, which can reach past Lq: "even" means block-aligned
        error = tmpl.maybe_append_choice(
            choices, input_nodes=inputs, layout=layout, subgraphs=subgraphs, mutated_inputs=[dv],
            call_sizes=[B, Hkv, Lkv, E], num_stages=cfg.num_stages, num_warps=cfg.num_warps,
            BLOCK_M=cfg.BLOCK_M, BLOCK_N=cfg.BLOCK_N, FUSED_DQ=False,
            EVEN_M=compat.known_multiple_of(Lq, cfg.BLOCK_M if dense else sparse[0]),
            EVEN_N=compat.known_multiple_of(Lkv, cfg.BLOCK_N), **common,
            # a kv block's query blocks are runs, or one run together
            RUNS=not dense and bool(opts.get("_Q_RUNS")), UNION=_union_walk(dense, opts, "Q"),
        ) or error
    if not choices:
        raise RuntimeError(f"inductor_flex: no dK/dV template config could be generated: {error}")
    dk = compat.select_template("inductor_flex_backward_dkdv", choices, inputs + extra, layout, gen)
    return dq, dk, dv, tuple(None for _ in score_bufs)  # (takes: no captured-tensor gradient is used)


def _union_walk(dense: bool, opts: dict, side: str) -> bool:
    """The traced form of kernel.plan_union_walk: this side's lists are no runs each, but one run
    together, with full blocks from mask_mod."""
    return (not dense and not opts.get(f"_{side}_RUNS") and bool(opts.get(f"_{side}_UNION"))
            and bool(opts.get("_FULL_FROM_MASK_MOD")))
