"""Eager backward: print the score_mod's joint graph, render the backward template, launch it.

Given the forward's plan (its printed mods and BlockMask) and the saved out / lse, this runs
two kernels: dQ (one program per query tile and query head), which also computes
delta = rowsum(dO * O) - dLSE from its dO tile and stores it, then dK/dV (one program per kv tile
and kv head, looping over the query heads of its GQA group, so no atomics), which reads delta.
Gradients of tensors the score_mod captured (a bias table, ALiBi slopes, ...) are atomically
added in the dQ kernel, where each score is visited exactly once; with kernel_options
DETERMINISTIC=True they come from the chunked math path instead (bitwise reproducible, slower).
The same template source runs in Triton's interpreter on CPU.
"""
from __future__ import annotations

import logging
from typing import Dict, List, NamedTuple, Optional, Tuple

import torch

from .kernel import (
    _block_mask_args, fastest_config, load_module, plan_runs, plan_union_walk, template_hooks, triton_cdiv,
    use_separable,
)
from .launch import launch as launch_kernel
from .printer import PrintedMod, print_score_mod_backward
from .reference import math_attention

from inductor_flex.lowering.configs import Config, autotune_pays, backward_configs, head_pad
from inductor_flex.templates import render

log = logging.getLogger("inductor_flex")

_NO_SCORE_MOD_BWD = (
    "@triton.jit\ndef score_mod_bwd_scaled(qk, qk_scale, b, h, q_idx, kv_idx, grad, ACCUMULATE_CAPS: tl.constexpr):\n"
    "    return grad\n"
)
_rendered: Dict[tuple, tuple] = {}
_autotuned: Dict[tuple, Config] = {}


def _score_mod_bwd(plan, score_mod, grad_caps: Tuple[bool, ...]) -> Optional[PrintedMod]:
    if not plan.has_score_mod:
        return None
    sm = plan.score
    cache = sm.__dict__.setdefault("_bwd", {})
    key = (grad_caps, plan.fast_tanh)
    if key not in cache:
        cache[key] = print_score_mod_backward(score_mod, sm, plan.device, grad_caps, plan.fast_tanh)
    return cache[key]


class BackwardPlan:
    """The rendered backward module for one forward plan and one set of captured-tensor grads."""

    def __init__(self, plan, score_mod, grad_caps: Tuple[bool, ...], opts: dict):
        self.fwd = plan
        self.grad_caps = grad_caps if plan.has_score_mod else ()
        self.bwd = _score_mod_bwd(plan, score_mod, self.grad_caps)
        self.opts = opts
        # what a training loop's steps would otherwise rebuild every backward (host time on the
        # critical path of short steps): configs, tuned picks and constexpr dicts. The forward plan
        # is per shapes, strides and dtypes, so none of these depend on the call
        self.memo: Dict[tuple, object] = {}  # (plans built as shells, lowering/kernel_op.py: _memo)
        key = (id(plan.score), id(plan.mask), id(self.bwd), plan.specialized)
        hit = _rendered.get(key)
        if hit is not None and hit[0] is plan.score and hit[1] is plan.mask and hit[2] is self.bwd:
            self.source = hit[3]
        else:
            self.source = self._render()
            if len(_rendered) > 256:
                _rendered.clear()
            _rendered[key] = (plan.score, plan.mask, self.bwd, self.source)

    @property
    def grad_params(self) -> List[str]:
        return [p for p in (self.bwd.params if self.bwd else []) if p.startswith("SM_GRAD")]

    def _render(self) -> str:
        sm, mm = self.fwd.score, self.fwd.mask
        grads = self.grad_params
        hooks = template_hooks(sm, mm)
        hooks["description"] += f"; captured-tensor gradients: {len(grads)}"
        return render(
            "flex_backward.py.jinja",
            **hooks,
            score_mod_bwd_source=self.bwd.source if self.bwd else _NO_SCORE_MOD_BWD,
            grad_params="".join(p + ", " for p in grads),
            grad_args="".join(p + ", " for p in grads),
            score_bwd_args="".join(p + ", " for p in sm.params + grads),
            specialize_layout=self.fwd.specialized,
            linear_grad=bool(self.bwd and self.bwd.linear_grad),
        )


def _memo(bplan: BackwardPlan) -> dict:
    # BackwardPlan.memo, also for plans built without __init__ (lowering/kernel_op.py)
    return bplan.__dict__.setdefault("memo", {})


def _pinned(opts: dict, m: str, n: str, default: Config) -> Optional[Config]:
    if m not in opts and n not in opts:
        return None
    # validate_kernel_options keeps the backward's launch values apart (0: the default), so that
    # a forward-only "fwd_num_warps" does not reach these kernels
    warps = opts.get("_BWD_NUM_WARPS", opts.get("num_warps")) or default.num_warps
    stages = opts.get("_BWD_NUM_STAGES", opts.get("num_stages")) or default.num_stages
    return Config(opts.get(m, default.BLOCK_M), opts.get(n, default.BLOCK_N), warps, stages)


class Launch(NamedTuple):
    kernel: str
    grid: tuple
    args: tuple
    constexprs: dict
    num_warps: int
    num_stages: int


class BackwardCall:
    """The buffers and launch arguments of one backward: preprocess, dK/dV and dQ."""

    def __init__(self, bplan: BackwardPlan, query, key, value, out, lse, grad_out, grad_lse, fused_dq=False):
        plan = self.plan = bplan.fwd
        self.bplan = bplan
        self.q, self.k, self.v, self.out = query, key, value, out
        B, Hq, Lq, E = query.shape
        dev = query.device
        self.lse = lse.contiguous()
        self.grad_out = grad_out if grad_out is not None else torch.zeros_like(out, dtype=query.dtype)
        self.grad_lse = grad_lse.to(torch.float32).contiguous() if grad_lse is not None else None
        self.delta = torch.empty(B, Hq, Lq, dtype=torch.float32, device=dev)
        self.dq, self.dk, self.dv = torch.empty_like(query), torch.empty_like(key), torch.empty_like(value)
        self.fused_dq = fused_dq
        # FUSED_DQ: dQ accumulated by the dK/dV kernel in float32 (unscaled), padded head dim
        self.dq_acc = (torch.zeros(B, Hq, Lq, head_pad(E), dtype=torch.float32, device=dev) if fused_dq
                       else self.delta)
        grad_caps = bplan.grad_caps or (False,) * len(plan.score.tensors)
        self.cap_bufs = [torch.zeros(t.shape, dtype=torch.float32, device=dev) if need else None
                         for t, need in zip(plan.score.tensors, grad_caps)]
        bm = plan.block_mask
        # the broadcast index lists depend only on the plan and (B, Hq): built once per plan
        sides = plan.__dict__.setdefault("_bwd_bm_args", {})
        if (B, Hq) not in sides:
            sides[(B, Hq)] = (_block_mask_args(bm, B, Hq, side="q"), _block_mask_args(bm, B, Hq))
        self.q_side, self.kv_side = sides[(B, Hq)]
        self.mod_args = (plan.score.args_for(plan.score.tensors) + plan.mask.args_for(plan.mask.tensors)
                         + [b for b in self.cap_bufs if b is not None])
        self.scale = plan.scale
        self.qk_scale = plan.scale if plan.has_score_mod else plan.scale * 1.4426950408889634
        self.common = _memo(bplan).get(("common",))
        if self.common is None:
            q_bs, kv_bs = bm.BLOCK_SIZE
            self.common = _memo(bplan)[("common",)] = dict(
                HAS_SCORE_MOD=plan.has_score_mod, QK_HEAD=E, V_HEAD=value.shape[-1], QK_PAD=head_pad(E),
                V_PAD=head_pad(value.shape[-1]), SPARSE_Q=q_bs, SPARSE_KV=kv_bs,
                DOT_PRECISION="ieee" if query.dtype == torch.float32 else "tf32",
                # no BlockMask: walk every tile with no block-index loads (5-8% of the backward kernels'
                # time on the H100, noop and ALiBi S=4096 against Inductor's dense render)
                DENSE=plan.user_block_mask is None,
                SEPARABLE=plan.has_score_mod and use_separable(plan.score, plan.opts, query.dtype))

    def preprocess(self) -> Launch:
        B, Hq, Lq, _ = self.q.shape
        Ev = self.v.shape[-1]
        bm = 16 if self.plan.interpret else 64
        has = self.grad_lse is not None
        args = (self.out, self.grad_out, self.delta, self.grad_lse if has else self.delta,
                *self.out.stride(), *self.grad_out.stride(), Lq, Hq)
        consts = dict(V_HEAD=Ev, V_PAD=head_pad(Ev), BLOCK_M=bm, HAS_GRAD_LSE=has)
        return Launch("flex_bwd_preprocess", (triton_cdiv(Lq, bm), B * Hq), args, consts,
                      1 if self.plan.interpret else 4, 1)

    def dkdv(self, cfg: Config) -> Launch:
        q, k, v, g = self.q, self.k, self.v, self.grad_out
        B, Hq, Lq, _ = q.shape
        Hkv, Lkv = k.shape[1], k.shape[2]
        q_num, q_idx, fq_num, fq_idx = self.q_side
        args = (q, k, v, g, self.dk, self.dv, self.lse, self.delta, self.dq_acc, q_num, q_idx, fq_num, fq_idx,
                *q.stride(), *k.stride(), *v.stride(), *g.stride(), *self.dk.stride(), *self.dv.stride(),
                *q_num.stride(), *q_idx.stride()[:3],
                self.scale, self.qk_scale, Lq, Lkv, Hq, Hkv, Hq // Hkv, *self.mod_args)
        memo = _memo(self.bplan)
        consts = memo.get(("dkdv", cfg, self.fused_dq))
        if consts is None:
            # query tiles walk whole sparse blocks, which can reach past Lq: "even" means block-aligned
            q_step = cfg.BLOCK_M if self.common["DENSE"] else self.common["SPARSE_Q"]
            consts = memo[("dkdv", cfg, self.fused_dq)] = dict(
                BLOCK_M=cfg.BLOCK_M, BLOCK_N=cfg.BLOCK_N, EVEN_M=Lq % q_step == 0,
                EVEN_N=Lkv % cfg.BLOCK_N == 0, FUSED_DQ=self.fused_dq,
                RUNS=not self.common["DENSE"] and plan_runs(self.plan, "q"),
                UNION=not self.common["DENSE"] and plan_union_walk(self.plan, "q"), **self.common)
        return Launch("flex_bwd_dkdv", (triton_cdiv(Lkv, cfg.BLOCK_N), B * Hkv), args, consts,
                      cfg.num_warps, cfg.num_stages)

    def dq_launch(self, cfg: Config, grad_caps: bool) -> Launch:
        q, k, v, g = self.q, self.k, self.v, self.grad_out
        B, Hq, Lq, _ = q.shape
        Hkv, Lkv = k.shape[1], k.shape[2]
        kv_num, kv_idx, fkv_num, fkv_idx = self.kv_side
        has_glse = self.grad_lse is not None
        args = (q, k, v, g, self.dq, self.lse, self.delta, self.out, self.grad_lse if has_glse else self.delta,
                kv_num, kv_idx, fkv_num, fkv_idx,
                *q.stride(), *k.stride(), *v.stride(), *g.stride(), *self.dq.stride(), *self.out.stride(),
                *kv_num.stride(), *kv_idx.stride()[:3],
                self.scale, self.qk_scale, Lq, Lkv, Hq, Hq // Hkv, *self.mod_args)
        memo = _memo(self.bplan)
        consts = memo.get(("dq", cfg, grad_caps, self.fused_dq, has_glse))
        if consts is None:
            # FUSE_DELTA: this kernel computes delta (and runs before dK/dV); with FUSED_DQ the
            # preprocess kernel does, since dK/dV runs first
            consts = memo[("dq", cfg, grad_caps, self.fused_dq, has_glse)] = dict(
                GRAD_CAPS=grad_caps, FUSE_DELTA=not self.fused_dq, HAS_GRAD_LSE=has_glse,
                BLOCK_M=cfg.BLOCK_M, BLOCK_N=cfg.BLOCK_N, EVEN_M=Lq % cfg.BLOCK_M == 0,
                EVEN_N=Lkv % (cfg.BLOCK_N if self.common["DENSE"] else self.common["SPARSE_KV"]) == 0,
                RUNS=not self.common["DENSE"] and plan_runs(self.plan, "kv"),
                UNION=not self.common["DENSE"] and plan_union_walk(self.plan, "kv"), **self.common)
        return Launch("flex_bwd_dq", (triton_cdiv(Lq, cfg.BLOCK_M), B * Hq), args, consts,
                      cfg.num_warps, cfg.num_stages)

    def configs(self) -> Tuple[List[Config], List[Config]]:
        hit = _memo(self.bplan).get(("configs",))
        if hit is None:
            E, Ev = self.q.shape[-1], self.v.shape[-1]
            bs = self.plan.block_mask.BLOCK_SIZE
            hit = _memo(self.bplan)[("configs",)] = (
                backward_configs("dkdv", E, Ev, self.q.dtype, bs, self.plan.interpret),
                backward_configs("dq", E, Ev, self.q.dtype, bs, self.plan.interpret))
        return hit


def _run(module, launch: Launch):
    launch_kernel(getattr(module, launch.kernel), launch.grid, launch.args, launch.constexprs, launch.num_warps,
                  launch.num_stages)


def run_backward(bplan: BackwardPlan, query, key, value, out, lse, grad_out, grad_lse, captured_needs):
    """-> (dq, dk, dv, [grad of each captured score_mod tensor or None])."""
    plan = bplan.fwd
    module = load_module(bplan.source, plan.interpret)
    tensors = plan.score.tensors
    deterministic = bool(bplan.opts.get("DETERMINISTIC", False))
    want = [bool(n) for n in captured_needs[:len(tensors)]] + [False] * max(0, len(tensors) - len(captured_needs))
    any_caps = any(bplan.grad_caps)
    fused = bool(bplan.opts.get("FUSED_DQ", False))
    if fused and (deterministic or any_caps):
        raise ValueError("kernel_options FUSED_DQ accumulates dQ with atomics: it cannot be combined with "
                         "DETERMINISTIC, nor with gradients of captured tensors (they are taken in the dQ kernel)")
    call = BackwardCall(bplan, query, key, value, out, lse, grad_out, grad_lse, fused_dq=fused)
    dkdv_cands, dq_cands = call.configs()
    opts = bplan.opts
    q_bs, kv_bs = plan.block_mask.BLOCK_SIZE

    def check(name, cfg, m, n):
        if q_bs % cfg.BLOCK_M or kv_bs % cfg.BLOCK_N:
            raise ValueError(f"kernel_options {m}={cfg.BLOCK_M}, {n}={cfg.BLOCK_N} ({name} kernel) must divide the "
                             f"BlockMask's BLOCK_SIZE {plan.block_mask.BLOCK_SIZE}")

    def dkdv_config():
        cfg = _pinned(opts, "BLOCK_M1", "BLOCK_N1", dkdv_cands[0]) or _tune(
            bplan, "dkdv_fused_dq" if fused else "dkdv", dkdv_cands, lambda c: _run(module, call.dkdv(c)),
            query, key, value)
        check("dK/dV", cfg, "BLOCK_M1", "BLOCK_N1")
        return cfg

    if fused:
        _run(module, call.preprocess())
        dkdv_cfg = dkdv_config()
        call.dq_acc.zero_()  # autotuning may have run the dK/dV kernel already
        _run(module, call.dkdv(dkdv_cfg))
        call.dq.copy_(call.dq_acc[..., :query.shape[-1]] * plan.scale)
    else:
        # dQ first: it writes delta, which the dK/dV kernel (and its autotuning) reads
        dq_cfg = _pinned(opts, "BLOCK_M2", "BLOCK_N2", dq_cands[0])
        if dq_cfg is not None:
            check("dQ", dq_cfg, "BLOCK_M2", "BLOCK_N2")
        else:
            dq_cfg = _tune(bplan, "dq", dq_cands, lambda c: _run(module, call.dq_launch(c, False)), query, key, value)
        _run(module, call.dq_launch(dq_cfg, any_caps and not deterministic))
        _run(module, call.dkdv(dkdv_config()))

    if any_caps and deterministic:
        cap_grads = _captured_grads_math(plan, query, key, value, call.grad_out, grad_lse, want)
    else:
        cap_grads = [b.to(t.dtype) if (b is not None and w) else None for t, b, w in zip(tensors, call.cap_bufs, want)]
    return call.dq, call.dk, call.dv, cap_grads


def _captured_grads_math(plan, query, key, value, grad_out, grad_lse, want):
    """Captured-tensor gradients through the chunked math path (deterministic accumulation)."""
    tensors = plan.score.tensors
    wrt = [t for t, w in zip(tensors, want) if w]
    with torch.enable_grad():
        out, lse, _ = math_attention(query.detach(), key.detach(), value.detach(), plan.score_mod,
                                     plan.user_block_mask, plan.scale)
        outs, grads = [out], [grad_out]
        if grad_lse is not None:
            outs.append(lse)
            grads.append(grad_lse.to(lse.dtype))
        got = iter(torch.autograd.grad(outs, wrt, grads, allow_unused=True))
    return [next(got) if w else None for w in want]


def _tune(bplan: BackwardPlan, kind: str, candidates: List[Config], launch, query, key, value) -> Config:
    plan = bplan.fwd
    picked = _memo(bplan).get(("picked", kind))
    if picked is not None:
        return picked
    B, Hq, Lq, E = query.shape
    if plan.interpret or len(candidates) == 1 or not autotune_pays(B, Hq, Lq, key.shape[2]):
        return candidates[0]
    from .kernel import _bucket

    tune_key = (bplan.source, kind, str(query.dtype), E, value.shape[-1], plan.block_mask.BLOCK_SIZE,
                _bucket(Lq), _bucket(key.shape[2]), _bucket(B * Hq), query.device.index)
    cfg = _autotuned.get(tune_key)
    if cfg is None:
        best, best_ms = fastest_config(candidates, launch, f"backward {kind}")
        log.info("inductor_flex: backward %s picked %s (%.3f ms)", kind, best, best_ms)
        cfg = _autotuned[tune_key] = best
    _memo(bplan)[("picked", kind)] = cfg
    return cfg


def kernel_backward(query, key, value, out, lse, grad_out, grad_lse, score_mod, block_mask, scale, opts,
                    score_bufs=()):
    """The fused backward for callers holding the forward's inputs and outputs rather than an autograd
    context (the HOP's rules under torch.compile). ``score_mod`` reads ``score_bufs`` (the HOP's
    captured operands); returns (dq, dk, dv, [grad of each floating-point score_buf, else None])."""
    from .kernel import cached_plan

    plan = cached_plan(query, key, value, score_mod, block_mask, scale, opts)
    tensors = plan.score.tensors
    wanted = [any(t is b for b in score_bufs if isinstance(b, torch.Tensor) and b.dtype.is_floating_point)
              for t in tensors]
    grad_caps = tuple(wanted) if plan.has_score_mod else ()
    bplan = BackwardPlan(plan, score_mod, grad_caps, opts)
    dq, dk, dv, cap_grads = run_backward(bplan, query, key, value, out, lse, grad_out, grad_lse, grad_caps)
    dbufs = []
    for b in score_bufs:
        g = None
        if isinstance(b, torch.Tensor) and b.dtype.is_floating_point:
            g = next((cg for t, cg in zip(tensors, cap_grads) if t is b and cg is not None), None)
            g = torch.zeros_like(b) if g is None else g  # read by the mod only where it does not matter
        dbufs.append(g)
    return dq, dk, dv, dbufs
