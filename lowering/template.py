"""The forward template lowered by Inductor itself (CUDA).

``templates/flex_forward.py.jinja`` is rendered twice here. The first pass, ours, fills its hooks
with Inductor's template calls instead of printed code: ``def_kernel``/``stride``/``size`` for the
signature and layouts, ``modification`` (the score_mod / mask_mod subgraphs, lowered by Inductor)
for the mods, ``store_output`` for the output. The second pass is Inductor's TritonTemplate, which
autotunes the block-size configs (``lowering/configs.py``: the eager path's candidates, plus a
wider grid under max-autotune) and puts
the chosen kernel into the graph's output code next to the model's other kernels.

Which calls come here is decided while AOTAutograd traces the HOP (``takes``): CUDA tensors that
the eager path would run on the Triton kernel, with mods our printer can translate (the same
pointwise subset Inductor lowers). Everything else keeps the custom-op / decomposition paths of
``lowering/kernel_op.py`` and ``lowering/cpu.py``.
"""
from __future__ import annotations

import math
from typing import Dict

import torch

from inductor_flex import compat
from inductor_flex.validation import use_fast_tanh
from inductor_flex.templates import render

from . import tuning_masks
from .index_wrap import wrap_negative_indices
from inductor_flex.joint_graph import prescale
from inductor_flex.printer import TANH_SERIES, TANH_SERIES_BELOW

from .configs import Config, autotune_pays, filter_warp_specialize, forward_configs, head_pad, wide_configs

# Off: every forward takes the custom op again (tests compare the two).
ENABLED = True
# Devices whose calls come here. CI adds "cpu" with Inductor's Triton CPU backend and runs the
# generated kernel in Triton's interpreter (tests/test_template_lowering.py).
DEVICES = ("cuda",)

_FWD_NAMES = ("Q", "K", "V", "LSE", "MAX")
_BM_NAMES = ("KV_NUM", "KV_IDX", "FULL_NUM", "FULL_IDX")
_templates: Dict[str, object] = {}


# ---- trace time: does this call take the template? ----------------------------------------------
def takes(query, key, value, score_mod, block_mask, kernel_options, score_bufs, mask_bufs,
          gluon_ok: bool = True) -> bool:
    """Whether Inductor lowers this call through the template (else the HOP's custom op or the
    decomposition). ``gluon_ok``: a dense call the Gluon forward serves goes to the custom op, which
    runs it (gluon_forward.serves_compiled); the backward asks with False (its kernels are these)."""
    from inductor_flex import gluon_forward
    from inductor_flex.kernel import interpreter_enabled

    from .kernel_op import _print_mods, _uses_kernel

    opts = dict(kernel_options or {})
    if not ENABLED or query.device.type not in DEVICES:
        return False
    if query.device.type == "cuda" and interpreter_enabled():
        return False
    if opts.get("BACKEND", "AUTO") not in ("AUTO", "TRITON"):
        return False
    if gluon_ok and gluon_forward.serves_compiled(query, key, value, score_mod, block_mask, opts, score_bufs):
        return False
    # (on the CI's CPU device the kernel is only ever the interpreter's: ask as BACKEND "TRITON")
    if not _uses_kernel(query, key, value, block_mask, {**opts, "BACKEND": "TRITON"}):
        return False
    if any(not isinstance(b, torch.Tensor) for b in (*score_bufs, *mask_bufs)):
        return False  # a captured symbolic int: the custom op / decomposition handle it
    with compat.disable_current_modes():
        return _print_mods(score_mod, block_mask, score_bufs, mask_bufs, query.device, False, opts) is not None


# ---- stage one: our hooks, filled with Inductor's template calls --------------------------------
def _mod_helper(name: str, number: int, with_score: bool, loads: bool, transposed: bool = False,
                with_grad: bool = False, guard: bool = True) -> str:
    """A @triton.jit helper whose body is subgraph ``number`` lowered by Inductor. ``transposed``:
    score tiles are (kv, q), as in the dK/dV kernel; ``with_grad``: the score_mod's joint graph,
    which also takes the gradient of the score_mod's output, zeroed where that is 0 unless
    ``guard`` is off (a derivative finite everywhere, joint_graph.derivative_is_bounded)."""
    params = "score, b, h, q_idx, kv_idx" if with_score else "b, h, q_idx, kv_idx"
    fixed = 'score="score", ' if with_score else ""
    if with_grad:
        params += ", grad_score"
        fixed += 'grad_score="grad_score", '
    shapes = ""
    if compat.modification_takes_shapes():
        tile, m, n = ('("BLOCK_N", "BLOCK_M")', '("1", "BLOCK_M")', '("BLOCK_N", "1")') if transposed else (
            '("BLOCK_M", "BLOCK_N")', '("BLOCK_M", "1")', '("1", "BLOCK_N")')
        shapes = ', input_shapes={' + (f'"score": {tile}, ' if with_score else "") + (
            f'"grad_score": {tile}, ' if with_grad else "") + f'"m": {m}, "n": {n}' + '}'
        shapes += ', input_dtypes={"b": "index", "h": "index", "m": "index", "n": "index"}'
    return (
        "@triton.jit\n"
        f"def {name}({params}, {{{{gen_argdefs()}}}}{', unused_grad_caps' if with_grad else ''}):\n"
        "    {{gen_defines() | indent_except_first(1)}}\n"
        + ("    # rows / columns past the end of a tile are discarded later; keep their indices in range\n"
           "    # because Inductor's loads of captured tensors are not masked\n"
           '    m = q_idx % {{size("Q", 2)}}\n'
           '    n = kv_idx % {{size("K", 2)}}\n' if loads else
           "    m = q_idx  # no captured tensors: nothing is loaded at these indices\n"
           "    n = kv_idx\n")
        +
        f'    {{{{modification(subgraph_number={number}, output_name="mod_out", {fixed}b="b", h="h", m="m", n="n"'
        f"{shapes}) | indent_except_first(1)}}}}\n"
        + ("    # linear in grad_score: 0 where it is 0 (masked, padded), even where the derivative is\n"
           "    # inf (sqrt at 0) and 0 * inf would give NaN\n"
           "    return tl.where(grad_score != 0.0, mod_out, 0.0)\n" if with_grad and guard else "    return mod_out\n")
    )


def separable_source(first: int, loads: bool, transposed: bool = False) -> str:
    """The SEPARABLE path's hooks (see lowering/separable.py) from subgraphs first, first + 1,
    first + 2 (coefficient, key bias, row bias), under the names the eager printer gives them. The
    graphs take the raw q·k (joint_graph.prescale), so the coefficient holds the scale already."""
    helpers = [_mod_helper(name, first + i, False, loads, transposed)
               for i, name in enumerate(("score_mod_coef", "score_mod_key", "score_mod_row_bias"))]
    return "\n\n" + "\n\n".join(helpers) + (
        "\n\n@triton.jit\n"
        "def score_mod_parts(qk_scale, b, h, kv_idx, {{gen_argdefs()}}):\n"
        "    return (score_mod_coef(b, h, 0, kv_idx, {{gen_argdefs()}}),\n"
        "            score_mod_key(b, h, 0, kv_idx, {{gen_argdefs()}}))\n"
        "\n\n@triton.jit\n"
        "def score_mod_row(b, h, q_idx, {{gen_argdefs()}}):\n"
        "    return score_mod_row_bias(b, h, q_idx, 0, {{gen_argdefs()}})\n")


def separable_subgraphs(score_gm, scale: float, opts: dict, dtype, idx, score_bufs):
    """[coefficient, key bias, row bias] subgraph buffers when the score_mod is separable and the
    kernel options / dtype take that form (kernel.separable_wanted); else []."""
    from inductor_flex.kernel import separable_wanted

    from . import separable

    if not separable_wanted(opts, dtype):
        return []
    parts = separable.split(prescale(score_gm, scale)[0])
    if parts is None:
        return []
    return [_subgraph_buffer(gm, [*idx, *score_bufs]) for gm in parts]


def _kernel_def(dense: bool, bm_strides, qk_scale: float) -> str:
    names = _FWD_NAMES if dense else _FWD_NAMES + _BM_NAMES
    lines = [
        "{{def_kernel(%s)}}" % ", ".join(f'"{n}"' for n in names),
        '    stride_qb, stride_qh, stride_qm, stride_qd = {{stride("Q")}}',
        '    stride_kb, stride_kh, stride_kn, stride_kd = {{stride("K")}}',
        '    stride_vb, stride_vh, stride_vn, stride_vd = {{stride("V")}}',
        f"    stride_nb, stride_nh, stride_nm = {bm_strides[0]}",
        f"    stride_ib, stride_ih, stride_im = {bm_strides[1]}",
        '    Q_LEN = {{size("Q", 2)}}',
        '    KV_LEN = {{size("K", 2)}}',
        '    HQ = {{size("Q", 1)}}',
        '    GQA_GROUP = {{size("Q", 1)}} // {{size("K", 1)}}',
        f"    qk_scale = {qk_scale!r}",
    ]
    if dense:  # the sparse branch is compiled out; its names still need a value
        lines += [f"    {n} = LSE" for n in _BM_NAMES]
    return "\n".join(lines)


def _bm_strides(nodes, dense: bool, names=("KV_NUM", "KV_IDX")):
    """The stride expressions of the (num, indices) BlockMask tensors; 0 along broadcast dims."""
    if dense:
        return "0, 0, 0", "0, 0, 0"
    out = []
    for name, node in zip(names, nodes):
        size = node.get_size()
        parts = ["0" if _is_one(size[d]) else f'{{{{stride("{name}", {d})}}}}' for d in range(3)]
        out.append(", ".join(parts))
    return tuple(out)


def _is_one(expr) -> bool:
    try:
        return int(expr) == 1
    except TypeError:
        return False


def _template(dense: bool, bm_strides, qk_scale: float, score_loads: bool, mask_loads: bool,
              mod_scale: float = 1.0, separable: bool = False):
    from inductor_flex.printer import HELPERS

    source = render(
        "flex_forward.py.jinja",
        inductor=True,
        mod_scale=repr(float(mod_scale)),
        description="score_mod / mask_mod lowered by Inductor",
        helpers=HELPERS,
        kernel_def=_kernel_def(dense, bm_strides, qk_scale),
        score_mod_source=_mod_helper("score_mod", 0, True, score_loads),
        mask_mod_source=_mod_helper("mask_mod", 1, False, mask_loads),
        separable_source=separable_source(2, score_loads) if separable else "",
        mod_params="{{gen_argdefs()}}, ",
        mod_args="{{gen_argdefs()}}, ",
        score_mod_args="{{gen_argdefs()}}",
        mask_mod_args="{{gen_argdefs()}}",
        store_output='{{store_output(("idx_b", "idx_h", "idx_m", "idx_d"), "acc", "o_mask"%s)}}' % (
            ', val_shape=("BLOCK_M", "V_PAD")' if compat.store_output_takes_shape() else ""),
    )
    return triton_template("inductor_flex_fwd", source, _grid)


def triton_template(prefix: str, source: str, grid):
    """Inductor's TritonTemplate for a stage-one ``source``, one per distinct source."""
    import hashlib

    digest = hashlib.sha256(source.encode()).hexdigest()[:12]
    tmpl = _templates.get(digest)
    if tmpl is None:
        _, _, SymbolicGridFn, _ = compat.inductor_template_api()
        tmpl = compat.new_triton_template(f"{prefix}_{digest}", SymbolicGridFn(grid), source)
        _templates[digest] = tmpl
    return tmpl


def _grid(batch, heads, q_len, v_head, meta, *, cdiv):
    return (cdiv(q_len, meta["BLOCK_M"]), batch * heads, 1)


# ---- the lowering ------------------------------------------------------------------------------
def sizes_autotune_pays(batch, heads, q_len, kv_len) -> bool:
    """configs.autotune_pays on Inductor sizes (their hints: no guard, only a config choice)."""
    return autotune_pays(*(compat.size_hint(d) for d in (batch, heads, q_len, kv_len)))


# the kernels' batch, head, row and column indices (never negative), as _placeholder names them
_INDEX_NAMES = ("b", "h", "m", "n")


def _placeholder_name(arg):
    try:
        return arg.get_name()
    except Exception:  # noqa: BLE001 - not a named buffer
        return None


def _placeholder(name: str, dtype: torch.dtype, device):
    ir = compat.inductor_ir()
    return ir.TensorBox.create(ir.InputBuffer(name=name, layout=ir.FixedLayout(device, dtype, [], [])))


def _subgraph_buffer(gm, args):
    """The subgraph's single output as the ComputedBuffer a template's modification() inlines, its
    gathers wrapping negative indices as PyTorch does (index_wrap.py)."""
    ir = compat.inductor_ir()
    index_args = [i for i, a in enumerate(args) if _placeholder_name(a) in _INDEX_NAMES]
    out = compat.lower_subgraph(wrap_negative_indices(gm, index_args), args)
    out = out[0] if isinstance(out, (list, tuple)) else out
    if not isinstance(out, ir.TensorBox) or not isinstance(out.data, ir.StorageBox):
        raise NotImplementedError(f"inductor_flex: a mod lowered to {type(out).__name__}, expected a pointwise value")
    return ir.ComputedBuffer(
        name=None,
        layout=ir.FlexibleLayout(device=out.data.get_device(), dtype=out.data.get_dtype(), size=out.data.get_size()),
        data=out.data.data,
    )


def _exp_tanh(gm, fast: bool = False):
    """``gm`` with aten.tanh in its exp form, exp(-2|x|) written as exp2(-2·log2(e)·|x|) (the Taylor
    series near 0, see _tanh_nodes), or with
    ``fast`` (kernel_options FAST_TANH, see validation.use_fast_tanh) as the hardware tanh.approx.f32
    where Inductor prints inline asm (compat.inductor_lowers_inline_asm).

    Inductor lowers tanh to libdevice.tanh (compiled softcap forward 212 TFLOP/s against 333 for the
    eager kernel's exp form, H100) and exp to the accurate libdevice.exp (28 sm_90 instructions
    against 13 for libdevice.exp2)."""
    aten = torch.ops.aten
    if not any(n.target is aten.tanh.default for n in gm.graph.nodes):
        return gm
    import copy

    approx = fast and compat.inductor_lowers_inline_asm()
    gm = copy.deepcopy(gm)
    g = gm.graph
    for node in [n for n in g.nodes if n.target is aten.tanh.default]:
        x = node.args[0]
        if approx:
            with g.inserting_before(node):
                out = g.call_function(torch.ops.inductor_flex.tanh_approx.default, (x,))
            node.replace_all_uses_with(out)
            g.erase_node(node)
            continue
        with g.inserting_before(node):
            out = _tanh_nodes(g, x)
        node.replace_all_uses_with(out)
        g.erase_node(node)
    gm.recompile()
    return gm


def _tanh_nodes(g, x):
    """The printer's _tanh as graph nodes: the exp form, and the Taylor series near 0 where its
    1 - e cancels."""
    aten = torch.ops.aten

    def op(target, *args):
        return g.call_function(target, args)

    a = op(aten.abs.default, x)
    e = op(aten.exp2.default, op(aten.mul.Tensor, a, -2.0 * 1.4426950408889634))
    t = op(aten.div.Tensor, op(aten.add.Tensor, op(aten.neg.default, e), 1.0), op(aten.add.Tensor, e, 1.0))
    t = op(aten.where.self, op(aten.lt.Scalar, x, 0.0), op(aten.neg.default, t), t)
    z = op(aten.mul.Tensor, x, x)
    poly = TANH_SERIES[-1]
    for c in reversed(TANH_SERIES[:-1]):
        poly = op(aten.add.Tensor, op(aten.mul.Tensor, z, poly), c)
    series = op(aten.add.Tensor, x, op(aten.mul.Tensor, op(aten.mul.Tensor, x, z), poly))
    return op(aten.where.self, op(aten.lt.Scalar, a, TANH_SERIES_BELOW), series, t)


def lower_tanh_approx(x):
    """inductor_flex::tanh_approx -> Hopper's tanh.approx.f32 (max rel. error ~2^-11)."""
    return compat.inductor_inline_asm_pointwise(x, "tanh.approx.f32 $0, $1;", "=f,f", torch.float32)


def _is_identity(gm) -> bool:
    nodes = list(gm.graph.nodes)
    first = next(n for n in nodes if n.op == "placeholder")
    out = next(n for n in nodes if n.op == "output")
    res = out.args[0]
    res = res[0] if isinstance(res, (list, tuple)) and len(res) == 1 else res
    return res is first


def _block_mask_inputs(block_mask, device, side: str = "kv"):
    """(num, idx, full_num, full_idx) of the kv side (the blocks each query block reads) or the q
    side (the query blocks that read each kv block) as contiguous buffers; the full ones zero
    when the BlockMask has none."""
    first = 2 if side == "kv" else 6
    num, idx, full_num, full_idx = block_mask[first:first + 4]
    has_full = full_num is not None
    if not has_full:
        full = compat.inductor_lowering(torch.ops.aten.full.default)
        full_num = full(list(num.get_size()), 0, dtype=torch.int32, device=device)
        full_idx = full(list(idx.get_size()[:3]) + [1], 0, dtype=torch.int32, device=device)
    nodes = [compat.inductor_ir().ExternKernel.require_contiguous(x) for x in (num, idx, full_num, full_idx)]
    return compat.inductor_realize(*nodes), has_full


def _example_inputs(tensors, offset: int):
    """{input position: make(node)} for Inductor's config benchmarks, from (num, idx, full_num,
    full_idx) example tensors that broadcast to the nodes' sizes."""
    def gen(t):
        def make(node):
            size = [compat.size_hint(s) for s in node.get_size()]
            return t.expand(size).contiguous().to(node.get_device())
        return make

    return {offset + i: gen(t) for i, t in enumerate(tensors)}


def _recorded_block_mask(tensors, nodes, offset: int = 5):
    """Example BlockMask tensors for Inductor's config benchmarks: the real ones Dynamo recorded
    (lowering/tuning_masks.py), where they fit the graph's shapes; else None."""
    if not tensors or tensors[0] is None:
        return None
    sizes = [[compat.size_hint(d) for d in n.get_size()] for n in nodes]
    if tensors[2] is None:  # no full blocks: the lowering's zero stand-ins
        tensors = (*tensors[:2], torch.zeros(sizes[2], dtype=torch.int32), torch.zeros(sizes[3], dtype=torch.int32))
    if any(list(t.shape) != size for t, size in zip(tensors, sizes)):
        return None  # e.g. a new length under dynamic shapes
    return _example_inputs(tensors, offset)


def _block_lists(blocks):
    """(num, idx) listing the True columns of each row of a (rows, cols) block map first."""
    return blocks.sum(-1).to(torch.int32), torch.argsort((~blocks).to(torch.int8), dim=-1, stable=True).to(torch.int32)


def _stand_in_block_mask(has_full: bool, nq: int, nk: int, side: str = "kv", offset: int = 5):
    """Example BlockMask tensors for Inductor's config benchmarks (the real ones are graph inputs,
    unknown at compile time): a causal block pattern, the diagonal block partial and the blocks
    left of it full. Causal-like masks (causal, document, sliding window, prefix-LM) are the common
    case, and a mask of all-partial blocks made the benchmarks pick configs that ran the causal
    forward 9% slower than the eager autotuner's pick (H200, S=4096, D=128). Its lists are runs, so
    kernels rendered to walk runs (RUNS) read them within bounds."""
    diag = torch.clamp(torch.arange(nq) * nk // nq, max=nk - 1)
    cols = torch.arange(nk)[None, :]
    partial, full = cols == diag[:, None], cols < diag[:, None]
    if not has_full:  # partial: every block up to the diagonal
        partial, full = partial | full, torch.zeros_like(full)
    if side == "q":
        partial, full = partial.T, full.T
    num, idx = _block_lists(partial)
    full_num, full_idx = _block_lists(full)
    return _example_inputs((num, idx, full_num, full_idx if has_full else full_idx[:, :1]), offset)


def _rows_matrix(node) -> bool:
    """Whether a [B, H, L, D] buffer is one contiguous [B·H·L, D] row matrix with 16-byte rows, as the
    warp-specialized loop reads Q, K and V through TMA (kernel.rows_layout, from the static layout:
    no guard is added)."""
    try:
        sv = compat.inductor_graph().sizevars
        B, H, L, D = node.get_size()
        sb, sh, sl, sd = node.get_stride()
        eq = sv.statically_known_equals
        return bool(eq(sd, 1) and eq(sl, D) and (eq(H, 1) or eq(sh, L * D)) and (eq(B, 1) or eq(sb, H * L * D))
                    and compat.known_multiple_of(D, 8)
                    and compat.size_hint(B) * compat.size_hint(H) * compat.size_hint(L) < 2 ** 31)
    except Exception:  # noqa: BLE001 - a layout not decided yet: the plain loop
        return False


def ws_applies(query, key, value, dense: bool, score_bufs, dtype, runs: bool = False, mask_bufs=(),
               sparse=(128, 128)) -> bool:
    """Whether the warp-specialized forward config can run: as kernel.ws_applies (no BlockMask, or
    one the loop can walk without index loads, ``runs``, on 128-multiple blocks with a mask_mod
    that captures no tensor; no captured tensors in the score_mod), 16-bit, on a Hopper GPU,
    Q/K/V each one row matrix."""
    from .configs import warp_specialize_supported

    masked_ok = runs and not mask_bufs and sparse[0] % 128 == 0 and sparse[1] % 128 == 0
    return ((dense or masked_ok) and not score_bufs and dtype in (torch.float16, torch.bfloat16)
            and warp_specialize_supported(query.get_device())
            and all(_rows_matrix(t) for t in (query, key, value)))


def lower_forward(query, key, value, score_mod, block_mask, scale, kernel_options, score_bufs, mask_bufs):
    """Inductor lowering of flex_attention_hop -> (out, lse, max_scores)."""
    ir = compat.inductor_ir()
    query, key, value = compat.inductor_realize(query, key, value)
    score_bufs = compat.inductor_realize(*score_bufs)
    mask_bufs = compat.inductor_realize(*mask_bufs)
    device, dtype = query.get_device(), query.get_dtype()
    B, Hq, Lq, E = query.get_size()
    Lkv = key.get_size()[2]
    Ev = value.get_size()[3]
    E, Ev = compat.static_int(E), compat.static_int(Ev)  # constexprs: a new head dim recompiles
    opts = dict(kernel_options or {})

    idx = [_placeholder(n, torch.int32, device) for n in ("b", "h", "m", "n")]
    fast_tanh = use_fast_tanh(opts, dtype, device.type == "cuda")
    mask_gm = block_mask[12].graph_module
    scale = 1.0 / math.sqrt(E) if scale is None else float(scale)
    # the template folds only a positive scale into exp2's factor (kernel.py); other scales go through
    # the (identity) score_mod
    has_score_mod = not _is_identity(score_mod.graph_module) or not scale > 0
    # the mod takes the raw q·k with the scale folded into its constants, and leaves a trailing
    # positive factor to the kernel's log2(e) factor (joint_graph.prescale: softcap's cap)
    score_gm, mod_scale = prescale(score_mod.graph_module, scale, strip_factor=True)
    score_gm = _exp_tanh(score_gm, fast_tanh)
    score_buf = _subgraph_buffer(score_gm, [_placeholder("score", torch.float32, device), *idx, *score_bufs])
    mask_buf = _subgraph_buffer(mask_gm, [*idx, *mask_bufs])
    parts = separable_subgraphs(score_mod.graph_module, scale, opts, dtype, idx, score_bufs) if has_score_mod else []

    dense = block_mask[2] is None
    inputs = [query, key, value]
    empty_strided = compat.inductor_lowering(torch.ops.aten.empty_strided.default)
    lse = empty_strided([B, Hq, Lq], None, dtype=torch.float32, device=device)
    mx = empty_strided([B, Hq, Lq], None, dtype=torch.float32, device=device)
    inputs += [lse, mx]
    gen = {}
    if dense:
        sparse = (128, 128)
        has_full, bm_nodes = False, []
    else:
        sparse = (compat.static_int(block_mask[10]), compat.static_int(block_mask[11]))
        bm_nodes, has_full = _block_mask_inputs(block_mask, device)
        nq, nk = (compat.size_hint(d) for d in bm_nodes[1].get_size()[-2:])
        recorded = tuning_masks.lookup(opts.get(tuning_masks.TUNE_KEY))
        gen = (_recorded_block_mask(recorded and recorded[:4], bm_nodes)
               or _stand_in_block_mask(has_full, nq, nk))
    inputs += bm_nodes

    qk_scale = scale if has_score_mod else scale * 1.4426950408889634
    tmpl = _template(dense, _bm_strides(bm_nodes[:2], dense), qk_scale, bool(score_bufs), bool(mask_bufs),
                     mod_scale, bool(parts))

    layout = ir.FixedLayout(device, dtype, [B, Hq, Lq, Ev], ir.FlexibleLayout.contiguous_strides([B, Hq, Lq, Ev]))
    configs = forward_configs(E, Ev, dtype, sparse, device, interpret=device.type == "cpu")
    pinned = [k for k in ("BLOCK_M", "BLOCK_N", "num_warps", "num_stages") if k in opts]
    # the BlockMask's lists are runs (known when traced: attention.traced_block_mask_facts)
    runs = not dense and bool(opts.get("_KV_RUNS"))
    # ... or, with full blocks from the mask_mod, one run together (what the specialized loop walks,
    # and the plain one where the lists are not runs each)
    union = not dense and bool(opts.get("_KV_UNION")) and bool(opts.get("_FULL_FROM_MASK_MOD"))
    ws_ok = ws_applies(query, key, value, dense, score_bufs, dtype, runs or union, mask_bufs, sparse)
    if not pinned and (ws_ok or "WARP_SPECIALIZE" in opts):
        # (before the one-config rule: kernel_options WARP_SPECIALIZE=True keeps only it). Where the
        # specialized loop does not apply, its candidate stays unless asked away and runs as a plain
        # 128 x 128 config, as in the benchmarks of the configs before it existed
        configs = filter_warp_specialize(configs, opts, ws_ok)
    if pinned:
        if len(pinned) < 4:
            raise ValueError("under torch.compile, pin a kernel config with all of BLOCK_M, BLOCK_N, num_warps and "
                             "num_stages (or none)")
        # (static_int: options held in a closure arrive as symbols under dynamic=True; they are
        # constexprs, so guard on their values)
        configs = [Config(*(compat.static_int(opts[k]) for k in ("BLOCK_M", "BLOCK_N", "num_warps", "num_stages")),
                          bool(opts.get("WARP_SPECIALIZE")))]
    elif not sizes_autotune_pays(B, Hq, Lq, Lkv):
        configs = configs[:1]  # Inductor benchmarks nothing for one choice
    elif compat.inductor_max_autotune():
        configs = configs + [c for c in wide_configs(E, Ev, dtype, sparse, device) if c not in configs]

    if ws_ok:
        # the specialized loop's device-side TMA descriptors need Triton's allocator (Inductor's
        # launcher sets one too, where it has the hook)
        compat.ensure_triton_allocator()
    choices, error = [], None
    for cfg in configs:
        ws = bool(cfg.warp_specialize) and ws_ok  # elsewhere the config runs the plain loop
        even_n = compat.known_multiple_of(Lkv, cfg.BLOCK_N if dense else sparse[1])
        error = tmpl.maybe_append_choice(
            choices,
            input_nodes=inputs,
            layout=layout,
            subgraphs=[score_buf, mask_buf, *parts],
            mutated_inputs=[lse, mx],
            call_sizes=[B, Hq, Lq, Ev],
            num_stages=cfg.num_stages,
            num_warps=cfg.num_warps,
            HAS_SCORE_MOD=has_score_mod, QK_HEAD=E, V_HEAD=Ev, QK_PAD=head_pad(E), V_PAD=head_pad(Ev),
            BLOCK_M=cfg.BLOCK_M, BLOCK_N=cfg.BLOCK_N, SPARSE_Q=sparse[0], SPARSE_KV=sparse[1],
            EVEN_M=compat.known_multiple_of(Lq, cfg.BLOCK_M), EVEN_N=even_n,
            DOT_PRECISION='"ieee"' if dtype == torch.float32 else '"tf32"', DENSE=dense, HAS_FULL=has_full,
            # (Triton 3.6 does not build the separable form in the specialized loop: kernel.forward_launch)
            SPLIT_P=False, USE_TMA=ws, WARP_SPECIALIZE=ws, SEPARABLE=bool(parts) and not ws,
            # one loop over the union run: the specialized one, or the plain one where the lists
            # are not runs each (kernel.forward_launch)
            RUNS=runs or union, MASK_ON_FULL=union and (ws or not runs),
        ) or error
    if not choices:
        raise RuntimeError(f"inductor_flex: no forward template config could be generated: {error}")
    out = compat.select_template("inductor_flex_forward", choices, inputs + list(score_bufs) + list(mask_bufs),
                                 layout, gen)
    return out, lse, mx
