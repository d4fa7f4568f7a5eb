"""score_mod / mask_mod plumbing shared by every path: signature checks, grid evaluation, errors.

A mod is written for one (b, h, q_idx, kv_idx) point on 0-d tensors. The math path and the
BlockMask builder evaluate it over whole index grids with nested ``torch.vmap``; vmap is also
what turns Python control flow on tensors (``if``, ``not``, ``.item()``) into an error we can
explain instead of a silently wrong trace.
"""
from __future__ import annotations

import functools
import weakref
import inspect
from typing import Callable, Optional

import torch

SCORE_MOD_ARGS = ("score", "b", "h", "q_idx", "kv_idx")
MASK_MOD_ARGS = ("b", "h", "q_idx", "kv_idx")
# attribute of a mod that inductor_flex builds around another and never changes afterwards (closure
# cells and globals fixed): the tuple of mods it wraps, so a plan key need not walk the wrapper
STATIC_MOD_DEPS = "_inductor_flex_wraps"


class FlexModError(TypeError):
    """A score_mod / mask_mod that cannot be used as written."""


def mod_name(fn: Callable) -> str:
    if isinstance(fn, functools.partial):
        return f"partial({mod_name(fn.func)})"
    return getattr(fn, "__name__", None) or type(fn).__name__


_ARITY_OK: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()


def check_arity(fn: Optional[Callable], kind: str) -> None:
    """Raise a FlexModError unless ``fn`` accepts exactly the arguments of a ``kind`` mod."""
    if fn is None:
        return
    try:
        if _ARITY_OK.get(fn) == (kind, getattr(fn, "__code__", None)):
            return  # inspect.signature costs more than a small kernel launch: check once per function
    except TypeError:
        pass
    _check_arity(fn, kind)
    try:
        _ARITY_OK[fn] = (kind, getattr(fn, "__code__", None))
    except TypeError:
        pass


def _check_arity(fn: Callable, kind: str) -> None:
    expected = SCORE_MOD_ARGS if kind == "score_mod" else MASK_MOD_ARGS
    if not callable(fn):
        raise FlexModError(f"{kind} must be a callable {kind}({', '.join(expected)}), got {type(fn).__name__}")
    try:
        sig = inspect.signature(fn)
    except (TypeError, ValueError):
        return  # builtins without signatures: let the call itself decide
    params = list(sig.parameters.values())
    if any(p.kind == p.VAR_POSITIONAL for p in params):
        return
    positional = [p for p in params if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    required = [p for p in positional if p.default is p.empty]
    if not (len(required) <= len(expected) <= len(positional)):
        got = ", ".join(p.name for p in positional)
        raise FlexModError(
            f"{kind} '{mod_name(fn)}' must take {len(expected)} arguments "
            f"({', '.join(expected)}), but its signature is ({got})"
        )


def explain_mod_error(fn: Callable, kind: str, err: Exception) -> Exception:
    """Turn an exception raised inside a user's mod into a FlexModError that says what to change."""
    msg = str(err)
    name = mod_name(fn)
    if "data-dependent control flow" in msg or "Boolean value of Tensor" in msg:
        return FlexModError(
            f"{kind} '{name}' uses Python control flow on a tensor (`if`, `not`, `and`/`or`, a "
            f"comparison used as a bool). Mods are traced over whole index grids: write it with "
            f"torch.where(cond, a, b) and the tensor operators ~, &, | instead."
        )
    if "_local_scalar_dense" in msg:
        return FlexModError(
            f"{kind} '{name}' turns a tensor into a Python value (`if`/`not`/`and`/`or` on a tensor, "
            f".item(), int(), float()). Write it with torch.where(cond, a, b) and ~, &, | instead."
        )
    if ".item()" in msg or "item()" in msg:
        return FlexModError(
            f"{kind} '{name}' calls .item() (or int()/float()) on a tensor. Keep values as tensors; "
            f"use torch.where(cond, a, b) for choices."
        )
    return FlexModError(f"{kind} '{name}' failed when evaluated on index tensors: {type(err).__name__}: {msg}")


def _nested_vmap(fn: Callable, n_leading: int) -> Callable:
    """vmap ``fn(*prefix, b, h, q, kv)`` over kv, then q, then h, then b (innermost first)."""
    out = fn
    for pos in (3, 2, 1, 0):
        dims = [None] * (n_leading + 4)
        dims[n_leading + pos] = 0
        if n_leading:  # the score tensor is batched along every index dimension
            dims[0] = 0
        out = torch.vmap(out, in_dims=tuple(dims), out_dims=0)
    return out


def _check_result(fn: Callable, kind: str, res, expected_shape) -> torch.Tensor:
    if not isinstance(res, torch.Tensor):
        raise FlexModError(f"{kind} '{mod_name(fn)}' must return a tensor, got {type(res).__name__}")
    if tuple(res.shape) != tuple(expected_shape):
        raise FlexModError(
            f"{kind} '{mod_name(fn)}' must return a 0-d tensor per (b, h, q_idx, kv_idx) point; "
            f"it returned shape {tuple(res.shape[len(expected_shape):]) or tuple(res.shape)} per point"
        )
    if kind == "mask_mod" and res.dtype != torch.bool:
        raise FlexModError(f"mask_mod '{mod_name(fn)}' must return a bool tensor, got {res.dtype}")
    if kind == "score_mod" and not res.dtype.is_floating_point:
        raise FlexModError(f"score_mod '{mod_name(fn)}' must return a floating-point score, got {res.dtype}")
    return res


def eval_mask_grid(mask_mod: Callable, b: torch.Tensor, h: torch.Tensor, q: torch.Tensor, kv: torch.Tensor) -> torch.Tensor:
    """mask_mod over the grid b × h × q × kv (1-D index tensors) -> bool tensor (B, H, Q, KV)."""
    try:
        res = _nested_vmap(mask_mod, 0)(b, h, q, kv)
    except FlexModError:
        raise
    except Exception as e:  # noqa: BLE001 - any failure inside user code gets explained
        raise explain_mod_error(mask_mod, "mask_mod", e) from e
    return _check_result(mask_mod, "mask_mod", res, (b.numel(), h.numel(), q.numel(), kv.numel()))


def eval_mask_blocks(mask_mod: Callable, b: torch.Tensor, h: torch.Tensor, q: torch.Tensor, kv: torch.Tensor) -> torch.Tensor:
    """mask_mod over P separate tiles: b, h (P,), q (P, Q), kv (P, KV) -> bool tensor (P, Q, KV)."""
    grid = torch.vmap(torch.vmap(torch.vmap(mask_mod, in_dims=(None, None, None, 0)), in_dims=(None, None, 0, None)))
    try:
        res = grid(b, h, q, kv)
    except FlexModError:
        raise
    except Exception as e:  # noqa: BLE001
        raise explain_mod_error(mask_mod, "mask_mod", e) from e
    return _check_result(mask_mod, "mask_mod", res, (b.numel(), q.shape[1], kv.shape[1]))


def eval_score_grid(score_mod: Callable, score: torch.Tensor, b, h, q, kv) -> torch.Tensor:
    """score_mod over the grid; ``score`` is (B, H, Q, KV)."""
    try:
        res = _nested_vmap(score_mod, 1)(score, b, h, q, kv)
    except FlexModError:
        raise
    except Exception as e:  # noqa: BLE001
        raise explain_mod_error(score_mod, "score_mod", e) from e
    return _check_result(score_mod, "score_mod", res, score.shape)


def noop_mask(b, h, q_idx, kv_idx):
    """Attend everywhere."""
    return q_idx.new_ones((), dtype=torch.bool)


setattr(noop_mask, STATIC_MOD_DEPS, ())  # wraps nothing, reads only torch: no need to walk it


def _identity_score(score, b, h, q_idx, kv_idx):
    return score


def and_masks(*mask_mods: Callable) -> Callable:
    """A mask_mod that is true where every given mask_mod is true."""
    for m in mask_mods:
        check_arity(m, "mask_mod")

    def and_mask(b, h, q_idx, kv_idx):
        result = q_idx.new_ones((), dtype=torch.bool)
        for m in mask_mods:
            result = result & m(b, h, q_idx, kv_idx)
        return result

    and_mask.__name__ = "and_masks(" + ", ".join(mod_name(m) for m in mask_mods) + ")"
    return and_mask


def or_masks(*mask_mods: Callable) -> Callable:
    """A mask_mod that is true where any given mask_mod is true."""
    for m in mask_mods:
        check_arity(m, "mask_mod")

    def or_mask(b, h, q_idx, kv_idx):
        result = q_idx.new_zeros((), dtype=torch.bool)
        for m in mask_mods:
            result = result | m(b, h, q_idx, kv_idx)
        return result

    or_mask.__name__ = "or_masks(" + ", ".join(mod_name(m) for m in mask_mods) + ")"
    return or_mask


class TensorIndexMode(torch.overrides.TorchFunctionMode):
    """Route ``t[i, j]`` with 0-d tensor indices to ``aten.index`` while tracing a mod.

    Plain ``__getitem__`` turns a 0-d integer tensor into a Python int (``.item()``), which a
    tracer cannot follow; ``aten.index`` keeps the index symbolic, so ``bias[h, q_idx - kv_idx]``
    becomes one gather the kernel printer understands.
    """

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is torch.Tensor.__getitem__:
            base, index = args
            items = index if isinstance(index, tuple) else (index,)
            if any(isinstance(i, torch.Tensor) for i in items) and all(
                isinstance(i, (torch.Tensor, int)) and not isinstance(i, bool) for i in items
            ):
                idx = [
                    i if isinstance(i, torch.Tensor) else torch.full((), i, dtype=torch.int64, device=base.device)
                    for i in items
                ]
                return torch.ops.aten.index.Tensor(base, idx)
        return func(*args, **kwargs)
