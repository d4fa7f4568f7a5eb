"""Eager kernel path: print the mods, render the template, load it, pick a config, launch.

On CUDA tensors this is what ``flex_attention`` runs without torch.compile. On CPU tensors the
same rendered module is loaded in Triton's interpreter (BACKEND "TRITON"), which is how CI tests
the templates. Rendered modules are cached by their source, so mods that print the same (e.g. one
closure over different tensor values) share one compiled kernel.
"""
from __future__ import annotations

import hashlib
import importlib.util
import logging
import math
import os
import sys
import tempfile
import threading
import weakref
from typing import Callable, Dict, List, Optional, Tuple

import torch

from .block_mask import BlockMask, create_block_mask
from .mods import FlexModError, TensorIndexMode, explain_mod_error, mod_name, noop_mask
from .printer import HELPERS, PrintedMod, identity_mod, print_mod
from .reference import math_attention

from inductor_flex.lowering.configs import Config, forward_configs, head_pad, user_config
from inductor_flex.templates import render

log = logging.getLogger("inductor_flex")

_lock = threading.Lock()
_modules: Dict[Tuple[str, bool], object] = {}
_autotuned: Dict[tuple, Config] = {}


# ---- mods -> printed helpers (cached per function object) ----------------------------------
class _CapturedTensors(TensorIndexMode):
    """Runs a mod once and records the tensors it reads that it did not create."""

    def __init__(self):
        super().__init__()
        self.seen: List[torch.Tensor] = []
        self.made: set = set()

    def __torch_function__(self, func, types, args=(), kwargs=None):
        for a in list(args) + list((kwargs or {}).values()):
            for t in (a if isinstance(a, (list, tuple)) else (a,)):
                if isinstance(t, torch.Tensor) and id(t) not in self.made and all(t is not s for s in self.seen):
                    self.seen.append(t)
        out = super().__torch_function__(func, types, args, kwargs)
        if isinstance(out, torch.Tensor):
            self.made.add(id(out))
        return out


def _closure_scalars(fn) -> tuple:
    cells = getattr(fn, "__closure__", None) or ()
    out = []
    for c in cells:
        try:
            v = c.cell_contents
        except ValueError:
            continue
        if isinstance(v, (int, float, bool, str)):
            out.append(v)
    return tuple(out)


_printed: "weakref.WeakKeyDictionary[Callable, dict]" = weakref.WeakKeyDictionary()


def _printed_mod(fn: Optional[Callable], kind: str, device: torch.device, fast_tanh: bool) -> PrintedMod:
    if fn is None or fn is noop_mask:
        return identity_mod(kind)
    # the tensors the mod reads right now; a cached print is reused only if they are the same objects
    idx = [torch.zeros((), dtype=torch.int32, device=device) for _ in range(4)]
    args = ([torch.zeros((), device=device)] if kind == "score_mod" else []) + idx
    rec = _CapturedTensors()
    inputs = {id(a) for a in args}
    try:
        with rec:
            fn(*args)
    except Exception as e:  # noqa: BLE001
        for t in rec.seen:
            if id(t) not in inputs and t.device.type != device.type:
                raise FlexModError(
                    f"{kind} '{mod_name(fn)}' captures a tensor on {t.device} but the inputs are on {device}; "
                    f"move the captured tensor to {device}"
                ) from e
        raise explain_mod_error(fn, kind, e) from e
    live = [t for t in rec.seen if id(t) not in inputs]
    key = (kind, device.type, fast_tanh, _closure_scalars(fn), getattr(fn, "__code__", None))
    try:
        per_fn = _printed.setdefault(fn, {})
    except TypeError:  # not weak-referenceable: no caching
        per_fn = {}
    cached = per_fn.get(key)
    if cached is not None and len(cached.tensors) <= len(live) and all(
        any(c is t for t in live) for c in cached.tensors
    ):
        return cached
    printed = print_mod(fn, kind, device, fast_tanh)
    per_fn[key] = printed
    return printed


# ---- module loading --------------------------------------------------------------------------
def _cache_dir() -> str:
    d = os.environ.get("INDUCTOR_FLEX_CACHE_DIR") or os.path.join(
        tempfile.gettempdir(), f"inductor_flex_{os.getuid() if hasattr(os, 'getuid') else 'user'}"
    )
    os.makedirs(d, exist_ok=True)
    return d


def load_module(source: str, interpret: bool):
    """Import rendered Triton source (from a file: Triton's JIT reads function source back)."""
    digest = hashlib.sha256(source.encode()).hexdigest()[:24]
    key = (digest, interpret)
    with _lock:
        mod = _modules.get(key)
        if mod is not None:
            return mod
        path = os.path.join(_cache_dir(), f"flex_{digest}.py")
        if not os.path.exists(path):
            tmp = f"{path}.{os.getpid()}.tmp"
            with open(tmp, "w") as f:
                f.write(source)
            os.replace(tmp, path)
        name = f"inductor_flex_kernel_{digest}_{'interp' if interpret else 'gpu'}"
        spec = importlib.util.spec_from_file_location(name, path)
        mod = importlib.util.module_from_spec(spec)
        sys.modules[name] = mod
        spec.loader.exec_module(mod)
        _modules[key] = mod
        return mod


def interpreter_enabled() -> bool:
    """Whether @triton.jit builds interpreted functions in this process (TRITON_INTERPRET=1)."""
    from triton import knobs

    return bool(knobs.runtime.interpret)


# ---- planning a call -------------------------------------------------------------------------
def kernel_supports(qk_head: int, v_head: Optional[int], block_mask: Optional[BlockMask]) -> Optional[str]:
    """None if the Triton kernel handles this call, else the reason it cannot."""
    for name, d in (("query/key head dim", qk_head), ("value head dim", v_head)):
        if d is not None and d > 256:
            return f"{name} {d} > 256"
    if block_mask is not None:
        q_bs, kv_bs = block_mask.BLOCK_SIZE
        if q_bs % 16 or kv_bs % 16:
            return f"BlockMask BLOCK_SIZE {block_mask.BLOCK_SIZE} is not a multiple of 16"
    return None


_noop_masks: Dict[tuple, BlockMask] = {}
_rendered: Dict[tuple, tuple] = {}


def _default_block_mask(Lq: int, Lkv: int, device: torch.device) -> BlockMask:
    key = (Lq, Lkv, str(device))
    bm = _noop_masks.get(key)
    if bm is None:
        bm = create_block_mask(noop_mask, None, None, Lq, Lkv, device=device, BLOCK_SIZE=128)
        if len(_noop_masks) > 64:
            _noop_masks.clear()
        _noop_masks[key] = bm
    return bm


class ForwardPlan:
    """Everything one forward launch needs, derived from the call's arguments."""

    def __init__(self, query, key, value, score_mod, block_mask, scale, opts):
        self.device = query.device
        self.interpret = interpreter_enabled()
        if query.dtype == torch.float64:
            raise TypeError("the Triton kernel supports float16, bfloat16 and float32 inputs; use BACKEND 'MATH' for float64")
        if self.device.type not in ("cuda", "cpu"):
            raise ValueError(f"the Triton kernel runs on CUDA tensors (or CPU under the interpreter), got {self.device}")
        reason = kernel_supports(query.shape[-1], value.shape[-1], block_mask)
        if reason is not None:
            raise ValueError(f"BACKEND 'TRITON' cannot run this call: {reason}")
        self.fast_tanh = bool(opts.get("FAST_TANH", False)) and not self.interpret
        self.block_mask = block_mask if block_mask is not None else _default_block_mask(
            query.shape[2], key.shape[2], self.device)
        self.score = _printed_mod(score_mod, "score_mod", self.device, self.fast_tanh)
        mm = self.block_mask.mask_mod if block_mask is not None else None
        self.mask = _printed_mod(mm, "mask_mod", self.device, False)
        self.has_score_mod = score_mod is not None
        self.source = self._render(query, value)
        B, Hq, Lq, E = query.shape
        Ev = value.shape[-1]
        self.scale = scale if scale is not None else 1.0 / math.sqrt(E)
        self.candidates = forward_configs(E, Ev, query.dtype, self.block_mask.BLOCK_SIZE, self.device, self.interpret)
        self.pinned = user_config(opts, self.candidates[0])
        if self.pinned is not None:
            q_bs, kv_bs = self.block_mask.BLOCK_SIZE
            if q_bs % self.pinned.BLOCK_M or kv_bs % self.pinned.BLOCK_N:
                raise ValueError(
                    f"kernel_options BLOCK_M={self.pinned.BLOCK_M}, BLOCK_N={self.pinned.BLOCK_N} must divide the "
                    f"BlockMask's BLOCK_SIZE {self.block_mask.BLOCK_SIZE}"
                )

    def _render(self, query, value) -> str:
        sm, mm = self.score, self.mask
        hit = _rendered.get((id(sm), id(mm)))
        if hit is not None and hit[0] is sm and hit[1] is mm:
            return hit[2]
        source = self._render_uncached()
        if len(_rendered) > 256:
            _rendered.clear()
        _rendered[(id(sm), id(mm))] = (sm, mm, source)
        return source

    def _render_uncached(self) -> str:
        sm, mm = self.score, self.mask
        desc = f"score_mod={sm.source.splitlines()[2].strip('# ') if sm.tensors or sm.params or 'return score' not in sm.source else 'none'}"
        return render(
            "flex_forward.py.jinja",
            description=desc,
            helpers=HELPERS,
            score_mod_source=sm.source,
            mask_mod_source=mm.source,
            mod_params="".join(p + ", " for p in sm.params + mm.params),
            mod_args="".join(p + ", " for p in sm.params + mm.params),
            score_mod_args=", ".join(sm.params),
            mask_mod_args=", ".join(mm.params),
        )


def _block_mask_args(bm: BlockMask, B: int, Hq: int):
    nq = bm.num_blocks[0]
    kv_num = bm.kv_num_blocks.expand(B, Hq, nq)
    kv_idx = bm.kv_indices.contiguous().expand(B, Hq, nq, bm.kv_indices.shape[-1])
    if bm.full_kv_num_blocks is not None:
        full_num = bm.full_kv_num_blocks.expand(B, Hq, nq)
        full_idx = bm.full_kv_indices.contiguous().expand(B, Hq, nq, bm.full_kv_indices.shape[-1])
    else:
        full_num = torch.zeros_like(bm.kv_num_blocks).expand(B, Hq, nq)
        full_idx = kv_idx
    if full_idx.stride()[:3] != kv_idx.stride()[:3]:
        full_idx = full_idx.contiguous()
        kv_idx = kv_idx.contiguous()
    if full_num.stride() != kv_num.stride():
        full_num = full_num.contiguous()
        kv_num = kv_num.contiguous()
    return kv_num, kv_idx, full_num, full_idx


def forward_launch(plan: ForwardPlan, query, key, value, out, lse, mx, cfg: Config):
    """(grid, positional args, constexpr kwargs) of one forward launch."""
    B, Hq, Lq, E = query.shape
    Hkv, Lkv, Ev = key.shape[1], key.shape[2], value.shape[-1]
    bm = plan.block_mask
    kv_num, kv_idx, full_num, full_idx = _block_mask_args(bm, B, Hq)
    q_bs, kv_bs = bm.BLOCK_SIZE
    log2e = 1.4426950408889634
    qk_scale = plan.scale if plan.has_score_mod else plan.scale * log2e
    mod_args = plan.score.args_for(plan.score.tensors) + plan.mask.args_for(plan.mask.tensors)
    args = (
        query, key, value, out, lse, mx, kv_num, kv_idx, full_num, full_idx,
        *query.stride(), *key.stride(), *value.stride(), *out.stride(),
        *kv_num.stride(), *kv_idx.stride()[:3],
        qk_scale, Lq, Lkv, Hq, Hq // Hkv,
        *mod_args,
    )
    constexprs = dict(
        HAS_SCORE_MOD=plan.has_score_mod, QK_HEAD=E, V_HEAD=Ev, QK_PAD=head_pad(E), V_PAD=head_pad(Ev),
        BLOCK_M=cfg.BLOCK_M, BLOCK_N=cfg.BLOCK_N, SPARSE_Q=q_bs, SPARSE_KV=kv_bs,
        EVEN_M=Lq % cfg.BLOCK_M == 0, EVEN_N=Lkv % kv_bs == 0,
        DOT_PRECISION="ieee" if query.dtype == torch.float32 else "tf32",
    )
    grid = (triton_cdiv(Lq, cfg.BLOCK_M), B * Hq)
    return grid, args, constexprs


def run_forward(plan: ForwardPlan, query, key, value, out=None):
    B, Hq, Lq, E = query.shape
    if query.device.type == "cpu" and not plan.interpret:
        raise RuntimeError(
            "BACKEND 'TRITON' on CPU tensors runs the kernel in Triton's interpreter: set the environment "
            "variable TRITON_INTERPRET=1 before triton is first imported (or use CUDA tensors)"
        )
    module = load_module(plan.source, plan.interpret)
    if out is None:
        out = torch.empty(B, Hq, Lq, value.shape[-1], dtype=query.dtype, device=query.device)
    lse = torch.empty(B, Hq, Lq, dtype=torch.float32, device=query.device)
    mx = torch.empty_like(lse)

    def launch(cfg: Config):
        grid, args, constexprs = forward_launch(plan, query, key, value, out, lse, mx, cfg)
        module.flex_fwd_kernel[grid](*args, **constexprs, num_warps=cfg.num_warps, num_stages=cfg.num_stages)

    cfg = plan.pinned or _pick_config(plan, launch, query, key, value)
    launch(cfg)
    plan.config = cfg
    return out, lse, mx


def triton_cdiv(a: int, b: int) -> int:
    return (a + b - 1) // b


def _bucket(n: int) -> int:
    return 1 << max(0, (n - 1).bit_length())


def _pick_config(plan: ForwardPlan, launch, query, key, value) -> Config:
    B, Hq, Lq, E = query.shape
    # small problems run in microseconds: autotuning them costs more than it can save
    if plan.interpret or len(plan.candidates) == 1 or B * Hq * Lq * key.shape[2] < (1 << 24):
        return plan.candidates[0]
    tune_key = (plan.source, str(query.dtype), E, value.shape[-1], plan.block_mask.BLOCK_SIZE,
                _bucket(Lq), _bucket(key.shape[2]), _bucket(B * Hq), query.device.index)
    cfg = _autotuned.get(tune_key)
    if cfg is not None:
        return cfg
    import triton.testing

    log.info("inductor_flex: autotuning %d forward configs for %s", len(plan.candidates), tune_key[1:])
    best, best_ms = None, float("inf")
    for c in plan.candidates:
        try:
            ms = triton.testing.do_bench(lambda: launch(c), warmup=5, rep=20)
        except Exception as e:  # noqa: BLE001 - a config that fails to compile is just not chosen
            log.info("inductor_flex: config %s failed: %s", c, e)
            continue
        if ms < best_ms:
            best, best_ms = c, ms
    if best is None:
        raise RuntimeError(f"inductor_flex: no forward config could run; tried {plan.candidates}")
    log.info("inductor_flex: picked %s (%.3f ms)", best, best_ms)
    _autotuned[tune_key] = best
    return best


# ---- autograd: fused forward, backward by chunked recompute until the backward kernels land ----
class _KernelForward(torch.autograd.Function):
    @staticmethod
    def forward(ctx, plan, score_mod, block_mask, scale, query, key, value, *captured):
        out, lse, mx = run_forward(plan, query, key, value)
        ctx.save_for_backward(query, key, value, *captured)
        ctx.mods = (score_mod, block_mask, scale)
        ctx.mark_non_differentiable(mx)
        return out, lse, mx

    @staticmethod
    def backward(ctx, g_out, g_lse, g_mx):
        query, key, value, *captured = ctx.saved_tensors
        score_mod, block_mask, scale = ctx.mods
        Hq, Hkv = query.shape[1], key.shape[1]
        with torch.enable_grad():
            q = query.detach().requires_grad_(ctx.needs_input_grad[4])
            k = key.detach().requires_grad_(ctx.needs_input_grad[5])
            v = value.detach().requires_grad_(ctx.needs_input_grad[6])
            out, lse, _ = math_attention(q, k, v, score_mod, block_mask, scale)
            wrt = [t for t, need in zip((q, k, v), ctx.needs_input_grad[4:7]) if need]
            cap = [t for t, need in zip(captured, ctx.needs_input_grad[7:]) if need]
            outs, grads = [out], [g_out]
            if g_lse is not None:
                outs.append(lse)
                grads.append(g_lse.to(lse.dtype))
            res = list(torch.autograd.grad(outs, wrt + cap, grads, allow_unused=True)) if wrt + cap else []
        it = iter(res)
        qkv = [next(it) if need else None for need in ctx.needs_input_grad[4:7]]
        caps = [next(it) if need else None for need in ctx.needs_input_grad[7:]]
        return (None, None, None, None, *qkv, *caps)


def kernel_attention(query, key, value, score_mod, block_mask, scale, opts):
    plan = ForwardPlan(query, key, value, score_mod, block_mask, scale, opts)
    captured = plan.score.tensors + plan.mask.tensors
    needs_grad = torch.is_grad_enabled() and any(t.requires_grad for t in (query, key, value, *captured))
    if not needs_grad:
        return run_forward(plan, query, key, value)
    out, lse, mx = _KernelForward.apply(plan, score_mod, block_mask, scale, query, key, value, *captured)
    return out, lse, mx


def kernel_source(query, key, value, score_mod=None, block_mask=None, scale=None, enable_gqa=False,
                  kernel_options=None) -> str:
    from .validation import validate_inputs, validate_kernel_options

    validate_inputs(query, key, value, block_mask, scale, enable_gqa)
    opts = validate_kernel_options(kernel_options)
    return ForwardPlan(query, key, value, score_mod, block_mask, scale, opts).source
