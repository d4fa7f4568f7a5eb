"""The fused kernels as custom ops inside Inductor graphs.

``inductor_flex::flex_backward`` is the compiled backward wherever the forward ran a fused kernel;
``inductor_flex::flex_forward`` is the compiled forward where the eager path would run the kernel
but the Inductor-lowered template (lowering/template.py) does not take the call (CPU under the
interpreter with BACKEND "TRITON", mods that close over symbolic ints). The mods are printed into
the template at trace time (the subgraphs run on stand-in tensors shaped like their operands), so
the rendered Triton source is an argument of the op, visible in Inductor's output code, and the
captured tensors stay graph inputs. At run time the op loads that source (cached by content) and
launches it with the eager path's config choice and autotuning.
"""
import math
from typing import List, Optional, Tuple

import torch

from inductor_flex import compat
from inductor_flex.validation import use_fast_tanh
from .cpu import _operand

_CONFIG_KEYS = ("BLOCK_M", "BLOCK_N", "num_warps", "num_stages")

# Plain torch.library registration (schema + CPU/CUDA kernels + fake): the ops run once per compiled
# call, and torch.library.custom_op's Python wrappers (autograd and aliasing checks) cost ~150 us
# a call on top of the kernels (measured on CPU with the launches stubbed out).
_lib = torch.library.Library("inductor_flex", "DEF")
_lib.define(
    "flex_forward(Tensor query, Tensor key, Tensor value, Tensor? kv_num_blocks, Tensor? kv_indices, "
    "Tensor? full_kv_num_blocks, Tensor? full_kv_indices, Tensor[] score_tensors, Tensor[] mask_tensors, "
    "str source, bool has_score_mod, float? scale, int[] block_size, int[] pinned, bool fast_tanh) "
    "-> (Tensor, Tensor, Tensor)")
_lib.define(
    "flex_backward(Tensor query, Tensor key, Tensor value, Tensor out, Tensor lse, Tensor grad_out, "
    "Tensor? grad_lse, Tensor? kv_num_blocks, Tensor? kv_indices, Tensor? full_kv_num_blocks, "
    "Tensor? full_kv_indices, Tensor? q_num_blocks, Tensor? q_indices, Tensor? full_q_num_blocks, "
    "Tensor? full_q_indices, Tensor[] score_tensors, Tensor[] mask_tensors, str forward_source, "
    "str backward_source, bool has_score_mod, float? scale, int[] block_size, bool[] grad_caps, "
    "bool fast_tanh) -> Tensor[]")
# torch.tanh spelled so the template lowering can print it as tanh.approx.f32 (lowering/template.py
# swaps it in for aten.tanh under FAST_TANH); run outside a kernel it is the exact tanh
_lib.define("tanh_approx(Tensor x) -> Tensor")


def _register(name: str, kernel, fake) -> None:
    for key in ("CPU", "CUDA"):
        _lib.impl(name, kernel, key)
    torch.library.register_fake(f"inductor_flex::{name}", fake, lib=_lib)


def flex_forward(
    query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
    kv_num_blocks: Optional[torch.Tensor], kv_indices: Optional[torch.Tensor],
    full_kv_num_blocks: Optional[torch.Tensor], full_kv_indices: Optional[torch.Tensor],
    score_tensors: List[torch.Tensor], mask_tensors: List[torch.Tensor],
    source: str, has_score_mod: bool, scale: Optional[float], block_size: List[int], pinned: List[int],
    fast_tanh: bool,
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    from inductor_flex import gluon_forward
    from inductor_flex import kernel as K
    from inductor_flex.lowering.configs import Config, filter_warp_specialize, forward_configs

    # a call with no BlockMask and no captured tensors gets the same plan every time: build it once
    # (rebuilding it and its config list was host time each call, and the Gluon kernel's dense calls
    # are short enough for that to show: 540 against 601 TFLOP/s eager, S=4096)
    shell_key = None
    if kv_num_blocks is None and not score_tensors and not mask_tensors:
        shell_key = (source, has_score_mod, scale, tuple(pinned), fast_tanh, query.dtype, query.device,
                     query.shape, key.shape, value.shape, query.stride(), key.stride(), value.stride(),
                     K.interpreter_enabled())
        plan = _shells.get(shell_key)
        if plan is not None:
            return K.run_forward(plan, query, key, value)
    plan = _plan_shell(query, key, value, [kv_num_blocks, kv_indices, full_kv_num_blocks, full_kv_indices],
                       score_tensors, mask_tensors, source, has_score_mod, scale, block_size, fast_tanh)
    plan.candidates = filter_warp_specialize(
        forward_configs(query.shape[-1], value.shape[-1], query.dtype, plan.block_mask.BLOCK_SIZE, query.device,
                        plan.interpret), {}, K.ws_applies(plan))
    plan.pinned = Config(*pinned) if pinned else None
    # calls traced to this op for it (gluon_forward.serves_compiled) run the Gluon kernel
    plan.gluon = gluon_forward.plan_mode(plan, query, key, value)
    if shell_key is not None:
        if len(_shells) > 256:
            _shells.clear()
        _shells[shell_key] = plan
    return K.run_forward(plan, query, key, value)


_shells: dict = {}


def _plan_shell(query, key, value, bm_tensors, score_tensors, mask_tensors, source, has_score_mod, scale,
                block_size, fast_tanh):
    """A ForwardPlan holding what the launchers read, rebuilt from the op's arguments (the mods
    were printed at trace time; their source is an argument)."""
    from inductor_flex import gluon_forward
    from inductor_flex import kernel as K
    from inductor_flex.block_mask import BlockMask
    from inductor_flex.printer import PrintedMod, mask_index_sources

    Lq, Lkv = query.shape[2], key.shape[2]
    plan = K.ForwardPlan.__new__(K.ForwardPlan)
    plan.device = query.device
    plan.interpret = K.interpreter_enabled()
    plan.fast_tanh = fast_tanh
    if bm_tensors[0] is None:
        plan.block_mask = K._default_block_mask(Lq, Lkv, query.device)
    else:
        full = list(bm_tensors) + [None] * (8 - len(bm_tensors))
        plan.block_mask = BlockMask((Lq, Lkv), *full, tuple(block_size), None)
        # nothing known of its lists here, and no device read per call to learn it: index walks
        bm = plan.block_mask
        bm._runs_kv = bm._runs_q = bm._union_kv = bm._union_q = False
    # the printed score functions of the rendered source: what the Gluon forward's hook is made of
    printed = gluon_forward.printed_score(source) if has_score_mod else ""
    plan.score = PrintedMod("score_mod", printed, list(score_tensors), separable="def score_mod_parts(" in source)
    plan.mask = PrintedMod("mask_mod", "", list(mask_tensors), index_sources=mask_index_sources(source))
    plan.has_score_mod = has_score_mod
    plan.source = source
    plan.scale = scale if scale is not None else 1.0 / math.sqrt(query.shape[-1])
    # what an eager plan also carries (the DETERMINISTIC captured-gradient path reads score_mod; the
    # ops never take that path); user_block_mask None means "no BlockMask" to the launcher
    plan.score_mod, plan.opts = None, {}
    plan.user_block_mask = plan.block_mask if bm_tensors[0] is not None else None
    return plan


def flex_backward(
    query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, out: torch.Tensor, lse: torch.Tensor,
    grad_out: torch.Tensor, grad_lse: Optional[torch.Tensor],
    kv_num_blocks: Optional[torch.Tensor], kv_indices: Optional[torch.Tensor],
    full_kv_num_blocks: Optional[torch.Tensor], full_kv_indices: Optional[torch.Tensor],
    q_num_blocks: Optional[torch.Tensor], q_indices: Optional[torch.Tensor],
    full_q_num_blocks: Optional[torch.Tensor], full_q_indices: Optional[torch.Tensor],
    score_tensors: List[torch.Tensor], mask_tensors: List[torch.Tensor],
    forward_source: str, backward_source: str, has_score_mod: bool, scale: Optional[float],
    block_size: List[int], grad_caps: List[bool], fast_tanh: bool,
) -> List[torch.Tensor]:
    """The fused backward kernels (templates/flex_backward.py.jinja, rendered at trace time) ->
    [dq, dk, dv, grads of the score tensors flagged in grad_caps]."""
    from inductor_flex.backward import BackwardPlan, run_backward

    bm = [kv_num_blocks, kv_indices, full_kv_num_blocks, full_kv_indices, q_num_blocks, q_indices,
          full_q_num_blocks, full_q_indices]
    plan = _plan_shell(query, key, value, bm, score_tensors, mask_tensors, forward_source, has_score_mod, scale,
                       block_size, fast_tanh)
    bplan = BackwardPlan.__new__(BackwardPlan)
    bplan.fwd, bplan.source, bplan.opts = plan, backward_source, {}
    bplan.grad_caps = tuple(grad_caps) if has_score_mod else ()
    dq, dk, dv, caps = run_backward(bplan, query, key, value, out, lse, grad_out, grad_lse, bplan.grad_caps)
    return [dq, dk, dv] + [g for g, need in zip(caps, bplan.grad_caps) if need]


def _flex_backward_fake(query, key, value, out, lse, grad_out, grad_lse, kv_num_blocks, kv_indices, full_kv_num_blocks,
      full_kv_indices, q_num_blocks, q_indices, full_q_num_blocks, full_q_indices, score_tensors, mask_tensors,
      forward_source, backward_source, has_score_mod, scale, block_size, grad_caps, fast_tanh):
    grads = [torch.empty_like(query), torch.empty_like(key), torch.empty_like(value)]
    return grads + [torch.empty_like(t) for t, need in zip(score_tensors, grad_caps) if need and has_score_mod]


def _flex_forward_fake(query, key, value, kv_num_blocks, kv_indices, full_kv_num_blocks, full_kv_indices, score_tensors,
      mask_tensors, source, has_score_mod, scale, block_size, pinned, fast_tanh):
    from inductor_flex.hop import forward_meta

    out, lse, mx = forward_meta(query, key, value)
    return out.contiguous(), lse, mx


_register("flex_forward", flex_forward, _flex_forward_fake)
_register("tanh_approx", torch.tanh, torch.empty_like)
_register("flex_backward", flex_backward, _flex_backward_fake)


def _uses_kernel(query, key, value, block_mask, opts) -> bool:
    from inductor_flex.kernel import kernel_supports

    backend = opts.get("BACKEND", "AUTO")
    if backend == "MATH" or query.dtype == torch.float64:
        return False
    if kernel_supports(query.shape[-1], value.shape[-1], None) is not None:
        return False
    q_bs, kv_bs = block_mask[10], block_mask[11]
    if block_mask[2] is not None and (q_bs % 16 or kv_bs % 16):
        return False
    if query.device.type == "cuda":
        return True
    return backend in ("TRITON", "TRITON_DECODE") and query.device.type == "cpu"


def _hint(x) -> int:
    return x.node.hint if isinstance(x, torch.SymInt) else int(x)


def _stand_in(t: torch.Tensor) -> torch.Tensor:
    # zeros shaped like the operand: indices computed from them stay in range while printing
    return torch.zeros([_hint(s) for s in t.shape], dtype=t.dtype, device=t.device)


def _print(fn, kind: str, operands, device, fast_tanh: bool):
    """Print ``fn`` with its operands bound to stand-ins; None if the printed code would depend
    on a symbolic integer operand (it would be baked in as one value)."""
    from inductor_flex.printer import print_mod

    tensors = {i: _stand_in(t) for i, t in enumerate(operands) if isinstance(t, torch.Tensor)}

    def attempt(shift: int):
        bound_args = [tensors[i] if i in tensors else _hint(x) + shift for i, x in enumerate(operands)]

        def bound(*args):
            return fn(*args, *bound_args)

        bound.__name__ = kind
        printed = print_mod(bound, kind, device, fast_tanh)
        printed.bound = bound  # the backward prints its joint graph from the same function
        return printed

    printed = attempt(0)
    if len(tensors) < len(operands) and attempt(7).source != printed.source:
        return None
    order = [next(i for i, s in tensors.items() if s is t) for t in printed.tensors]
    return printed, order, printed.bound


def _print_mods(score_mod, block_mask, score_bufs, mask_bufs, device, fast_tanh, opts):
    """(score PrintedMod, its operand order, the bound score_mod, mask PrintedMod, its order), or None
    when the call must take the decomposition."""
    from inductor_flex.hop import identity_score
    from inductor_flex.mods import FlexModError
    from inductor_flex.printer import identity_mod

    try:
        if score_mod is identity_score:
            sm, s_order, s_fn = identity_mod("score_mod"), [], None
        else:
            res = _print(score_mod, "score_mod", score_bufs, device, fast_tanh)
            if res is None:
                return None
            sm, s_order, s_fn = res
        if block_mask[2] is None:
            mm, m_order = identity_mod("mask_mod"), []
        else:
            res = _print(block_mask[12], "mask_mod", mask_bufs, device, False)
            if res is None:
                return None
            mm, m_order, _ = res
    except FlexModError as e:
        if opts.get("BACKEND", "AUTO") != "AUTO" or "not supported by the Triton kernel" not in str(e):
            raise
        return None
    return sm, s_order, s_fn, mm, m_order


def _tensor_operands(bufs, device):
    """Symbolic numbers a mod closes over (a Python int under dynamic=True: the head count of the
    gallery's ALiBi) as 0-d tensors (cpu._operand): the printed kernel then reads the value at run
    time where printing it would bake one value in and send the call to the decomposition."""
    return tuple(_operand(b, device) for b in bufs)


def try_kernel_forward(query, key, value, score_mod, block_mask, scale, kernel_options, score_bufs, mask_bufs):
    """The custom-op call for this forward, or None when the call takes the decomposition
    (math backend, shapes the kernel does not take, symbolic values captured by the mods, or a
    mod the printer cannot translate under BACKEND "AUTO")."""
    from inductor_flex.gluon_forward import is_identity_score
    from inductor_flex.kernel import ForwardPlan

    opts = dict(kernel_options or {})
    if not _uses_kernel(query, key, value, block_mask, opts):
        return None
    fast_tanh = use_fast_tanh(opts, query.dtype, query.device.type == "cuda")
    device = query.device
    score_bufs, mask_bufs = _tensor_operands(score_bufs, device), _tensor_operands(mask_bufs, device)
    with compat.disable_current_modes():
        mods = _print_mods(score_mod, block_mask, score_bufs, mask_bufs, device, fast_tanh, opts)
        if mods is None:
            return None
        sm, s_order, _, mm, m_order = mods
        shell = ForwardPlan.__new__(ForwardPlan)
        shell.score, shell.mask = sm, mm
        source = ForwardPlan._render_uncached(shell)
    pinned = [int(opts[k]) for k in _CONFIG_KEYS] if all(k in opts for k in _CONFIG_KEYS) else []
    if any(k in opts for k in _CONFIG_KEYS) and not pinned:
        raise ValueError(f"under torch.compile, pin a kernel config with all of {_CONFIG_KEYS} (or none)")
    return torch.ops.inductor_flex.flex_forward(
        query, key, value, *block_mask[2:6], [score_bufs[i] for i in s_order], [mask_bufs[i] for i in m_order],
        source, not is_identity_score(score_mod), None if scale is None else float(scale),
        [int(block_mask[10]), int(block_mask[11])], pinned,
        fast_tanh,
    )


def try_kernel_backward(query, key, value, out, lse, grad_out, grad_lse, fw_graph, block_mask, scale,
                        kernel_options, score_bufs, mask_bufs):
    """The custom-op call of the fused backward kernels, or None when the backward takes the
    decomposition (as for the forward; also with DETERMINISTIC captured-tensor gradients, which the
    decomposition computes without atomics). Returns (dq, dk, dv, grads of score_bufs)."""
    from inductor_flex.backward import BackwardPlan
    from inductor_flex.hop import identity_score
    from inductor_flex.kernel import ForwardPlan
    from inductor_flex.printer import print_score_mod_backward

    opts = dict(kernel_options or {})
    if not _uses_kernel(query, key, value, block_mask, opts):
        return None
    score_bufs = _tensor_operands(score_bufs, query.device)
    mask_bufs = _tensor_operands(mask_bufs, query.device)
    floating = [isinstance(b, torch.Tensor) and b.dtype.is_floating_point for b in score_bufs]
    if opts.get("DETERMINISTIC", False) and any(floating):
        return None
    fast_tanh = use_fast_tanh(opts, query.dtype, query.device.type == "cuda")
    device = query.device
    has_score_mod = fw_graph is not identity_score
    with compat.disable_current_modes():
        mods = _print_mods(fw_graph, block_mask, score_bufs, mask_bufs, device, fast_tanh, opts)
        if mods is None:
            return None
        sm, s_order, s_fn, mm, m_order = mods
        grad_caps = tuple(floating[i] for i in s_order) if has_score_mod else ()
        fwd = ForwardPlan.__new__(ForwardPlan)
        fwd.score, fwd.mask, fwd.has_score_mod, fwd.fast_tanh, fwd.device = sm, mm, has_score_mod, fast_tanh, device
        forward_source = ForwardPlan._render_uncached(fwd)
        bplan = BackwardPlan.__new__(BackwardPlan)
        bplan.fwd, bplan.grad_caps = fwd, grad_caps
        if has_score_mod:
            # the backward HOP runs below autograd; tracing the joint graph needs it back
            with compat.above_autograd(), torch.enable_grad():
                bplan.bwd = print_score_mod_backward(s_fn, sm, device, grad_caps, fast_tanh)
        else:
            bplan.bwd = None
        backward_source = bplan._render()
    res = torch.ops.inductor_flex.flex_backward(
        query, key, value, out, lse, grad_out, grad_lse, *block_mask[2:10],
        [score_bufs[i] for i in s_order], [mask_bufs[i] for i in m_order], forward_source, backward_source,
        has_score_mod, None if scale is None else float(scale), [int(block_mask[10]), int(block_mask[11])],
        list(grad_caps), fast_tanh,
    )
    dq, dk, dv, caps = res[0], res[1], res[2], iter(res[3:])
    by_buf = {}
    for i, need in zip(s_order, grad_caps):
        if need:
            by_buf[i] = next(caps)
    dbufs = tuple((by_buf[i] if i in by_buf else torch.zeros_like(b)) if floating[i] else None
                  for i, b in enumerate(score_bufs))
    return dq, dk, dv, dbufs
