"""Eager kernel path: print the mods, render the template, load it, pick a config, launch.

On CUDA tensors this is what ``flex_attention`` runs without torch.compile. On CPU tensors the
same rendered module is loaded in Triton's interpreter (BACKEND "TRITON"), which is how CI tests
the templates. Rendered modules are cached by their source, so mods that print the same (e.g. one
closure over different tensor values) share one compiled kernel.
"""
from __future__ import annotations

import functools
import hashlib
import importlib.util
import logging
import math
import os
import re
import sys
import tempfile
import threading
import types
import weakref
from typing import Callable, Dict, List, Optional, Tuple

import torch

from .block_mask import (
    FINE_BLOCK, PINNED_TILES, BlockMask, _from_maps, _refined_maps, block_runs, create_block_mask, refinable,
    refinement_pays, union_run,
)
from . import compat, gluon_forward
from .launch import launch as launch_kernel
from .mods import FlexModError, TensorIndexMode, explain_mod_error, mod_name, noop_mask
from .printer import HELPERS, PrintedMod, identity_mod, print_mod
from .validation import use_fast_tanh

from inductor_flex.lowering.configs import (
    Config, autotune_pays, filter_warp_specialize, forward_configs, head_pad, user_config,
)
from inductor_flex.templates import render

log = logging.getLogger("inductor_flex")

_lock = threading.Lock()
_modules: Dict[Tuple[str, bool], object] = {}
_modules_by_source: Dict[Tuple[int, bool], tuple] = {}  # (id(source), interpret) -> (source, module)
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


_printed: "weakref.WeakKeyDictionary[Callable, dict]" = weakref.WeakKeyDictionary()
_SCALARS = (int, float, bool, str, type(None), torch.dtype)


def _constant(v) -> Optional[tuple]:
    """A list / tuple (nested) of scalars by value, else None. Lists are keyed by their contents at
    this call: a mod may index one with a Python int and bake the element into the kernel."""
    if isinstance(v, (list, tuple)) and len(v) <= 4096:
        out = []
        for x in v:
            if isinstance(x, _SCALARS):
                out.append(x)
            else:
                sub = _constant(x)
                if sub is None:
                    return None
                out.append(sub)
        return (type(v).__name__, tuple(out))
    return None


_NOT_PLAIN = object()


def _value_key(v):
    """A scalar itself, a list / tuple of scalars by _constant, else _NOT_PLAIN."""
    if isinstance(v, _SCALARS):
        return v
    key = _constant(v)
    return _NOT_PLAIN if key is None else key


def _fingerprint(fn, depth: int = 0, seen=None, opaque_ok: bool = False) -> Optional[tuple]:
    """(scalars, tensors) everything ``fn`` can read: its closure cells, the globals its code names,
    and the same of the functions among them. None when something opaque is reachable (an object
    whose attributes might hold tensors), in which case the mod must be run to see what it reads;
    with opaque_ok such an object adds the constants held by its attributes that any code of the
    walk names instead (the key of a print found by running the mod: a helper may read cfg.scale
    off an object the mod hands it)."""
    if seen is not None:
        return _fingerprint_walk(fn, depth, seen, opaque_ok)
    # (the walked objects stay referenced until the walk ends: a bound method got from an attribute
    # is a new object, and a freed one's id could come back for another)
    seen = {_NAMES: set(), _OPAQUE: []}
    out = _fingerprint_walk(fn, depth, seen, opaque_ok)
    if out is None or not seen[_OPAQUE]:
        return out
    keys = _opaque_keys(seen[_OPAQUE], sorted(seen[_NAMES]))
    return None if keys is None else ((*out[0], ("opaque", keys)), out[1])


_NAMES, _OPAQUE = object(), object()  # (seen's entries: every name a walked code reads, the opaque objects)


def _opaque_keys(objs: list, names: list, depth: int = 0) -> Optional[tuple]:
    """The numbers (and lists of numbers) held by the opaque objects' attributes of these names, and
    by the objects those attributes hold, a few levels down; None when reading one raises."""
    keys = []
    for obj in objs:
        attrs = []
        for name in names:
            try:
                v = getattr(obj, name, None)
            except Exception:  # noqa: BLE001 - a property that raises: no key, the mod is reprinted
                return None
            if v is None or isinstance(v, (torch.Tensor, type(torch))) or callable(v):
                continue  # tensors are found by running the mod; functions are walked or torch's
            key = _value_key(v)
            if key is _NOT_PLAIN:
                if depth >= 2:
                    continue
                key = _opaque_keys([v], names, depth + 1)
                if key is None:
                    return None
            attrs.append((name, key))
        keys.append((id(obj), tuple(attrs)))
    return tuple(keys)


def _fingerprint_walk(fn, depth: int, seen: dict, opaque_ok: bool) -> Optional[tuple]:
    # (a method by its function and instance: self.a calling self.b calling self.a ends here)
    ident = (id(fn.__func__), id(fn.__self__)) if isinstance(fn, types.MethodType) else id(fn)
    if ident in seen:
        return (), ()
    seen[ident] = fn
    if isinstance(fn, functools.partial) and depth <= 6:
        inner = _fingerprint(fn.func, depth + 1, seen, opaque_ok)
        if inner is None:
            return None
        scalars, tensors = list(inner[0]), list(inner[1])
        for name, v in list(enumerate(fn.args)) + sorted(fn.keywords.items()):
            sub = _fingerprint_value(v, depth, seen, opaque_ok)
            if sub is None or sub is _UNWALKED:
                return None
            scalars.append((name, sub[0]))
            tensors.extend(sub[1])
        return tuple(scalars), tuple(tensors)
    owner = getattr(fn, "__self__", None)
    if owner is not None:
        return _fingerprint_method(fn, owner, depth, seen, opaque_ok)
    call = _call_method(fn)
    if call is not None:  # a callable object: its __call__, a method of it
        return _fingerprint_method(call, fn, depth, seen, opaque_ok)
    code = getattr(fn, "__code__", None)
    if code is None or depth > 6:
        return None
    values = []
    for c in fn.__closure__ or ():
        try:
            values.append(c.cell_contents)
        except ValueError:
            values.append(None)
    glb = getattr(fn, "__globals__", {})
    codes = [code] + [c for c in code.co_consts if hasattr(c, "co_names")]
    for co in codes:
        seen[_NAMES].update(co.co_names)
    for co in codes:
        for name in co.co_names:
            if name in glb and not isinstance(glb[name], type(torch)):
                values.append(glb[name])
    return _fingerprint_values([(None, v) for v in values], depth, seen, opaque_ok)


def _fingerprint_values(named, depth: int, seen: dict, opaque_ok: bool) -> Optional[tuple]:
    """(scalars, tensors) of the (name, value) pairs a mod's code reaches (closure cells and globals
    unnamed, attributes of self by name)."""
    scalars, tensors = [], []
    for name, v in named:
        sub = _fingerprint_value(v, depth, seen, opaque_ok)
        if sub is None:
            return None
        if sub is not _UNWALKED:
            scalars.append(sub[0] if name is None else (name, sub[0]))
            tensors.extend(sub[1])
        elif not isinstance(v, type) and torch_callable(v):
            continue  # torch's own functions hold no tensors of the caller's (classes may: not exempt)
        elif opaque_ok:  # keyed at the end of the walk by every name its codes read (_opaque_keys)
            seen[_OPAQUE].append(v)
            scalars.append(("obj", name, id(v)))
        else:
            return None
    return tuple(scalars), tuple(tensors)


def torch_callable(v) -> bool:
    """One of torch's functions or classes (no tensors of the caller's behind a function of it)."""
    return callable(v) and (getattr(v, "__module__", None) or "").startswith("torch")


def _call_method(obj):
    """The bound __call__ of an instance whose class defines it in Python, else None."""
    if isinstance(obj, (type, types.FunctionType, types.MethodType, functools.partial)):
        return None
    call = getattr(type(obj), "__call__", None)
    return getattr(obj, "__call__") if isinstance(call, types.FunctionType) else None


_SELF_LOADS = {"LOAD_FAST", "LOAD_FAST_CHECK", "LOAD_FAST_BORROW", "LOAD_DEREF", "LOAD_CLOSURE"}
_ATTR_LOADS = {"LOAD_ATTR", "LOAD_METHOD"}
_self_attributes_seen: Dict[object, Optional[tuple]] = {}


def _self_attributes(code) -> Optional[tuple]:
    """The attribute names a method's code (nested functions included) reads directly off its first
    argument (``self.x``), or None when ``self`` is used any other way: passed on, stored, or read
    through ``getattr``, so that what it reaches cannot be told from the code."""
    hit = _self_attributes_seen.get(code, False)
    if hit is not False:
        return hit
    import dis

    names: Dict[str, None] = {}
    self_name = code.co_varnames[0] if code.co_argcount else None
    todo, ok = [code], self_name is not None
    while todo and ok:
        co = todo.pop()
        todo += [c for c in co.co_consts if hasattr(c, "co_code")]
        ins = list(dis.get_instructions(co))
        for i, op in enumerate(ins):
            loads_self = ((op.opname in _SELF_LOADS and op.argval == self_name)
                          or (op.opname in ("LOAD_FAST_LOAD_FAST", "LOAD_FAST_BORROW_LOAD_FAST_BORROW")
                              and self_name in tuple(op.argval)))
            if not loads_self:
                continue
            if op.opname == "LOAD_CLOSURE":
                continue  # a nested function's cell for self: that function's own reads are checked
            if isinstance(op.argval, tuple) and op.argval[-1] != self_name:
                ok = False  # (self, then another local: self is an argument of what follows)
                break
            nxt = ins[i + 1] if i + 1 < len(ins) else None
            if nxt is None or nxt.opname not in _ATTR_LOADS:
                ok = False
                break
            names[nxt.argval] = None
    out = tuple(names) if ok else None
    if len(_self_attributes_seen) > 4096:
        _self_attributes_seen.clear()
    _self_attributes_seen[code] = out
    return out


def _fingerprint_method(fn, owner, depth: int, seen: dict, opaque_ok: bool) -> Optional[tuple]:
    """_fingerprint of a bound method (a module's ``self.score_mod``): its function's, and the
    attributes of ``self`` its code names (a learned bias, a cap) walked as closure cells are. None
    when one of them is an object that might hold tensors (``self.cfg.scale``: run the mod)."""
    func = getattr(fn, "__func__", None)
    code = getattr(func, "__code__", None)
    if code is None or depth > 6 or isinstance(owner, type(torch)):
        return None
    inner = _fingerprint(func, depth + 1, seen, opaque_ok)
    if inner is None:
        return None
    names = _self_attributes(code)
    if names is None:  # self goes elsewhere (hooks(self, ...), getattr(self, name)): unknown reach
        return None
    try:
        named = [(n, getattr(owner, n, None)) for n in names]
    except Exception:  # noqa: BLE001 - a property that raises: run the mod instead
        return None
    attrs = _fingerprint_values(named, depth, seen, opaque_ok)
    if attrs is None:
        return None
    return ("self", type(owner).__qualname__, *inner[0], *attrs[0]), (*inner[1], *attrs[1])


_UNWALKED = object()


def _fingerprint_value(v, depth: int, seen: dict, opaque_ok: bool):
    """(key, tensors) of one value a mod reaches: a tensor, a scalar (or list of them), a function
    (walked by _fingerprint), or a list / tuple of these: the mods a combinator closes over
    (and_masks / or_masks hold a tuple of them), so a composed mask keeps the fast path. None when
    something opaque is reachable through it; _UNWALKED for any other value (the caller decides)."""
    if isinstance(v, torch.Tensor):
        return "tensor", (v,)  # (the marker keeps its place: a tensor and a function may swap)
    if (key := _value_key(v)) is not _NOT_PLAIN:
        return key, ()
    if (callable(v) and hasattr(v, "__code__")) or isinstance(v, functools.partial):
        sub = _fingerprint(v, depth + 1, seen, opaque_ok)
        return None if sub is None else ((getattr(v, "__code__", None), sub[0]), sub[1])
    if isinstance(v, (list, tuple)) and len(v) <= 64 and depth <= 6:
        keys, tensors = [type(v).__name__], []
        for x in v:
            sub = _fingerprint_value(x, depth + 1, seen, opaque_ok)
            if sub is None or sub is _UNWALKED:
                return None
            keys.append(sub[0])
            tensors.extend(sub[1])
        return tuple(keys), tuple(tensors)
    return _UNWALKED


def _printed_mod(fn: Optional[Callable], kind: str, device: torch.device, fast_tanh: bool) -> PrintedMod:
    if fn is None or fn is noop_mask:
        return identity_mod(kind)
    # fast path: nothing the mod can reach has changed since it was printed, so neither has what it reads
    fp = _fingerprint(fn)
    if fp is not None:
        try:
            fast = _printed.setdefault(fn, {}).setdefault("fingerprints", {})
        except TypeError:
            fast = {}
        fkey = (kind, device.type, fast_tanh, fp[0], tuple(id(t) for t in fp[1]))
        hit = fast.get(fkey)
        if hit is not None and all(r() is t for r, t in zip(hit[1], fp[1])):
            return hit[0]
        printed = _printed_mod_slow(fn, kind, device, fast_tanh)
        if len(fast) > 16:  # e.g. a fresh bias tensor every step: keep the cache small
            fast.clear()
        fast[fkey] = (printed, [weakref.ref(t) for t in fp[1]])
        return printed
    return _printed_mod_slow(fn, kind, device, fast_tanh)


_warned_unkeyed: set = set()


def _warn_unkeyed(fn: Callable, kind: str) -> None:
    what = getattr(fn, "__code__", None) or type(fn)
    if what in _warned_unkeyed:
        return
    _warned_unkeyed.add(what)
    import warnings

    warnings.warn(
        f"inductor_flex: {kind} '{mod_name(fn)}' reaches objects its code does not name (an nn.Module given as the "
        f"mod hands self to its hooks; a method passing self on): it is traced again at every eager call, which "
        f"costs milliseconds of host time. Pass a plain function or a method such as module.forward.",
        stacklevel=4)


def _printed_mod_slow(fn: Callable, kind: str, device: torch.device, fast_tanh: bool) -> PrintedMod:
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
    # keyed by every constant the mod can reach (closures, globals, helpers, lists, attributes it
    # names): a print bakes them in
    reach = _fingerprint(fn, opaque_ok=True)
    key = (kind, device.type, fast_tanh, reach[0] if reach is not None else None, getattr(fn, "__code__", None))
    try:
        per_fn = _printed.setdefault(fn, {})
    except TypeError:  # not weak-referenceable: no caching
        per_fn = {}
    cached = per_fn.get(key)
    same_tensors = cached is not None and len(cached.tensors) <= len(live) and all(
        any(c is t for t in live) for c in cached.tensors)
    if same_tensors and reach is not None:
        return cached
    if reach is None:
        _warn_unkeyed(fn, kind)
    printed = print_mod(fn, kind, device, fast_tanh)
    # what a mod reaches unseen (an nn.Module called as the mod passes self to its hooks) may hold
    # the numbers a print bakes in: printed again at every call, the cached print kept while equal
    if same_tensors and printed.source == cached.source and len(printed.tensors) == len(cached.tensors) and all(
            a is b for a, b in zip(printed.tensors, cached.tensors)):
        return cached
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
    # plans keep their source string: a hit by identity skips hashing it (~10-20 us a call)
    hit = _modules_by_source.get((id(source), interpret))
    if hit is not None and hit[0] is source:
        return hit[1]
    digest = hashlib.sha256(source.encode()).hexdigest()[:24]
    key = (digest, interpret)
    with _lock:
        mod = _modules.get(key)
        if mod is None:
            mod = _modules[key] = _import_source(source, digest, interpret)
        if len(_modules_by_source) > 512:
            _modules_by_source.clear()
        _modules_by_source[(id(source), interpret)] = (source, mod)
    return mod


def _import_source(source: str, digest: str, interpret: bool):
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
    return mod


def interpreter_enabled() -> bool:
    """Whether @triton.jit builds interpreted functions in this process (TRITON_INTERPRET=1)."""
    from triton import knobs

    if not knobs.runtime.interpret:
        return False
    import triton.language as tl

    # triton.language's own @jit helpers (tl.zeros, ...) were built when triton was first imported;
    # set later, TRITON_INTERPRET would interpret our kernels but not them
    if type(getattr(tl, "zeros", None)).__name__ == "JITFunction":
        raise RuntimeError(
            "TRITON_INTERPRET=1 was set after triton had been imported, so Triton's interpreter cannot run "
            "kernels in this process; set it before the first import of triton or inductor_flex (e.g. "
            "`TRITON_INTERPRET=1 python script.py`)"
        )
    return True


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
_config_cache: Dict[tuple, list] = {}
_rendered: Dict[tuple, tuple] = {}
# (printed mods, dtype, device, head dims) -> the first layout a plan was made for
_first_layout: Dict[tuple, tuple] = {}


# shorter sequences keep the generic kernels: with lengths as constexprs a short dense loop's trip
# count became a constant below the pipeline depth, and Triton 3.6 computed wrong outputs and dQ on
# the H100 (L=64, GQA 4/2, 2026-11-26); at 512 every candidate tile walks at least 4 blocks
SPECIALIZE_MIN_LEN = 512
# and calls with less work than this many visited (query, key) pairs: the specialized launches
# measured ~170 us more host time per eager fwd+bwd step (document S=1024, same kernel times), which
# outweighs their kernel gain in short steps (document S=4096 B=4: f+b 162 -> 106 TFLOP/s); a dense
# S=4096, B=4, H=16 call visits 2^30 pairs and gained 4-10%
SPECIALIZE_MIN_WORK = 1 << 29


def _visited_pairs(block_mask: BlockMask, B: int, Hq: int) -> int:
    """(query, key) pairs the kernels walk: the mask's partial and full blocks x block area. The
    block count is read from the device once per BlockMask object (one sync) and kept on it."""
    q_bs, kv_bs = block_mask.BLOCK_SIZE
    blocks = block_mask.__dict__.get("_visited_blocks")
    if blocks is None:
        blocks = int(block_mask.kv_num_blocks.sum())
        if block_mask.full_kv_num_blocks is not None:
            blocks += int(block_mask.full_kv_num_blocks.sum())
        block_mask.__dict__["_visited_blocks"] = blocks
    Bm, Hm = block_mask.kv_num_blocks.shape[:2]
    return blocks * q_bs * kv_bs * (B // Bm) * (Hq // Hm)


def _specialize_layout(score: PrintedMod, mask: PrintedMod, query, key, value, block_mask, opts: dict) -> bool:
    """Whether this plan's kernels take strides, lengths and head counts as constexprs (compiled for
    one layout, as Inductor's kernels are). kernel_options SPECIALIZE_LAYOUT False: never; True: for
    any layout; by default for the first layout planned with these mods if the call visits at least
    SPECIALIZE_MIN_WORK pairs; never for sequences under SPECIALIZE_MIN_LEN. H100, bf16, D=128,
    S=4096, B=4, one run each: noop fwd 481 -> 529 TFLOP/s, f+b 415 -> 434; ALiBi fwd 441 -> 456,
    f+b 387 -> 405; strides alone gained nothing. Other layouts of the same mods take the generic
    kernels, so a workload of many lengths compiles two kernels, not one per length."""
    flag = opts.get("SPECIALIZE_LAYOUT")
    B, Hq, Lq, Lkv = query.shape[0], query.shape[1], query.shape[2], key.shape[2]
    if flag is False or min(Lq, Lkv) < SPECIALIZE_MIN_LEN:
        return False
    if flag:
        return True
    dense = block_mask.mask_mod is noop_mask  # every block (the no-BlockMask default): no count to read
    if (B * Hq * Lq * Lkv if dense else _visited_pairs(block_mask, B, Hq)) < SPECIALIZE_MIN_WORK:
        return False
    family = (id(score), id(mask), query.dtype, query.device, query.shape[-1], value.shape[-1])
    layout = (query.shape, key.shape, value.shape, query.stride(), key.stride(), value.stride(),
              block_mask.kv_num_blocks.shape, block_mask.kv_num_blocks.stride())
    if len(_first_layout) > 1024:
        _first_layout.clear()
    return _first_layout.setdefault(family, layout) == layout


def _default_block_mask(Lq: int, Lkv: int, device: torch.device) -> BlockMask:
    key = (Lq, Lkv, str(device))
    bm = _noop_masks.get(key)
    if bm is None:
        bm = compat.persistent_tensors(device, lambda: create_block_mask(
            noop_mask, None, None, Lq, Lkv, device=device, BLOCK_SIZE=128))
        if len(_noop_masks) > 64:
            _noop_masks.clear()
        _noop_masks[key] = bm
    return bm


class ForwardPlan:
    """Everything one forward launch needs, derived from the call's arguments."""

    # generic kernels unless __init__ decides otherwise; the shells lowering/kernel_op.py builds
    # keep this (one traced graph serves every length under dynamic shapes)
    specialized = False
    # 'dense' / 'causal' where the hand-scheduled Gluon kernel serves the calls (gluon_forward.py);
    # the shells keep None
    gluon = None
    gluon_source = None  # with a score_mod: the Gluon kernel's module with it as the hook

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
        self.fast_tanh = use_fast_tanh(opts, query.dtype, not self.interpret)
        self.block_mask = block_mask if block_mask is not None else _default_block_mask(
            query.shape[2], key.shape[2], self.device)
        self.score = _printed_mod(score_mod, "score_mod", self.device, self.fast_tanh)
        mm = self.block_mask.mask_mod if block_mask is not None else None
        self.mask = _printed_mod(mm, "mask_mod", self.device, False)
        fine = _refined(block_mask, self.mask, query.shape[0], query.shape[1], opts)
        # a refined mask is mask_mod evaluated now: re-plan when a captured tensor changes in place
        self.mask_versions = tuple(t._version for t in self.mask.tensors) if fine is not None else None
        if fine is not None:
            self.block_mask = fine
        self.has_score_mod = score_mod is not None
        self.score_mod, self.user_block_mask, self.opts = score_mod, block_mask, opts
        self.specialized = _specialize_layout(self.score, self.mask, query, key, value, self.block_mask, opts)
        self.source = self._render(query, value)
        B, Hq, Lq, E = query.shape
        Ev = value.shape[-1]
        self.scale = scale if scale is not None else 1.0 / math.sqrt(E)
        ckey = (E, Ev, query.dtype, self.block_mask.BLOCK_SIZE, str(self.device), self.interpret)
        self.candidates = _config_cache.get(ckey)
        if self.candidates is None:
            self.candidates = _config_cache[ckey] = forward_configs(
                E, Ev, query.dtype, self.block_mask.BLOCK_SIZE, self.device, self.interpret)
        # (ws_applies reads a BlockMask's indices once: only where a specialized candidate exists)
        self.candidates = filter_warp_specialize(
            self.candidates, opts, any(c.warp_specialize for c in self.candidates) and ws_applies(self))
        self.pinned = user_config(opts, self.candidates[0])
        if self.pinned is not None:
            q_bs, kv_bs = self.block_mask.BLOCK_SIZE
            if q_bs % self.pinned.BLOCK_M or kv_bs % self.pinned.BLOCK_N:
                raise ValueError(
                    f"kernel_options BLOCK_M={self.pinned.BLOCK_M}, BLOCK_N={self.pinned.BLOCK_N} must divide the "
                    f"BlockMask's BLOCK_SIZE {self.block_mask.BLOCK_SIZE}"
                )
        self.gluon = gluon_forward.plan_mode(self, query, key, value)

    def _render(self, query, value) -> str:
        sm, mm = self.score, self.mask
        key = (id(sm), id(mm), self.specialized)
        hit = _rendered.get(key)
        if hit is not None and hit[0] is sm and hit[1] is mm:
            return hit[2]
        source = self._render_uncached()
        if len(_rendered) > 256:
            _rendered.clear()
        _rendered[key] = (sm, mm, source)
        return source

    def _render_uncached(self) -> str:
        return render("flex_forward.py.jinja", **template_hooks(self.score, self.mask),
                      specialize_layout=self.specialized)


def _index_reads(mask: PrintedMod) -> set:
    body = mask.source.split("\n", 3)[-1]  # past the decorator, the signature and the name comment
    return set(re.findall(r"\b([bh])\b", body))


def mask_index_reads(mask_mod: Callable, device: torch.device) -> set:
    """Which of b, h the printed mask_mod reads (both when it cannot be printed)."""
    try:
        return _index_reads(_printed_mod(mask_mod, "mask_mod", device, False))
    except Exception:  # noqa: BLE001 - unprintable: the kernels never run it, refinement stays off
        return {"b", "h"}


def _refined(block_mask: Optional[BlockMask], mask: PrintedMod, B: int, Hq: int, opts: dict) -> Optional[BlockMask]:
    """The BlockMask on the 64 x 64 grid when that saves the kernels real work (kernel_options
    REFINE_BLOCK_MASK: None decides by area, True always, False never), else None.

    Packed documents are the case: at S=1024 with 8 causal documents the 128-blocks the kernels
    walk cover 2.5x the unmasked pairs, 64-blocks 1.7x. Causal and sliding-window masks gain 1.5 to
    6% of the area and keep the BlockMask's own blocks (and the 128-row tiles they allow)."""
    flag = opts.get("REFINE_BLOCK_MASK")
    if block_mask is None or flag is False:
        return None
    if flag and any(b % FINE_BLOCK for b in block_mask.BLOCK_SIZE):
        raise ValueError(f"kernel_options REFINE_BLOCK_MASK=True needs a BlockMask whose block sizes are multiples "
                         f"of {FINE_BLOCK}, got BLOCK_SIZE {block_mask.BLOCK_SIZE}")
    if not refinable(block_mask):
        return None
    if flag is None and not block_mask.separate_full_blocks:
        return None  # its maker asked for mask_mod on every block
    if flag is None and any(k in opts for k in PINNED_TILES):
        return None  # the user chose tiles for this BlockMask's block size
    reads = _index_reads(mask)
    if (block_mask.shape[0] != B and "b" in reads) or (block_mask.shape[1] != Hq and "h" in reads):
        return None  # broadcast over b or h while mask_mod reads it: one refinement cannot serve all
    if block_mask.refined is not None:  # create_block_mask found it pays
        return block_mask.refined
    partial, full = _refined_maps(block_mask, FINE_BLOCK, FINE_BLOCK)
    if flag is None and not refinement_pays(block_mask, partial, full):
        return None
    fine = _from_maps(partial, full, block_mask.seq_lengths, (FINE_BLOCK, FINE_BLOCK), block_mask.mask_mod)
    fine.full_from_mask_mod = block_mask.full_from_mask_mod
    return fine


def template_hooks(sm: PrintedMod, mm: PrintedMod) -> dict:
    """The hooks every template shares: the printed mods and their captured-tensor parameters."""
    plain = not sm.tensors and not sm.params and "return score" in sm.source
    return dict(
        inductor=False,
        description=f"score_mod={'none' if plain else sm.source.splitlines()[2].strip('# ')}",
        helpers=HELPERS,
        score_mod_source=sm.source,
        mask_mod_source=mm.source,
        mod_params="".join(p + ", " for p in sm.params + mm.params),
        mod_args="".join(p + ", " for p in sm.params + mm.params),
        score_mod_args=", ".join(sm.params),
        mask_mod_args=", ".join(mm.params),
    )


def _block_mask_args(bm: BlockMask, B: int, Hq: int, side: str = "kv"):
    """(num, indices, full_num, full_indices) broadcast to (B, Hq, ...): the kv-side lists (blocks
    each query block reads) or, with side="q", the q-side lists (blocks that read each kv block)."""
    if side == "q":
        num, idx, fnum, fidx = bm.q_num_blocks, bm.q_indices, bm.full_q_num_blocks, bm.full_q_indices
    else:
        num, idx, fnum, fidx = bm.kv_num_blocks, bm.kv_indices, bm.full_kv_num_blocks, bm.full_kv_indices
    rows = num.shape[-1]
    kv_num = num.expand(B, Hq, rows)
    kv_idx = idx.contiguous().expand(B, Hq, rows, idx.shape[-1])
    if fnum is not None:
        full_num = fnum.expand(B, Hq, rows)
        full_idx = fidx.contiguous().expand(B, Hq, rows, fidx.shape[-1])
    else:
        full_num = torch.zeros_like(num).expand(B, Hq, rows)
        full_idx = kv_idx
    if full_idx.stride()[:3] != kv_idx.stride()[:3]:
        full_idx = full_idx.contiguous()
        kv_idx = kv_idx.contiguous()
    if full_num.stride() != kv_num.stride():
        full_num = full_num.contiguous()
        kv_num = kv_num.contiguous()
    return kv_num, kv_idx, full_num, full_idx


_plans: Dict[tuple, tuple] = {}


def cached_plan(query, key, value, score_mod, block_mask, scale, opts) -> ForwardPlan:
    """A ForwardPlan, reused across calls with the same mods, BlockMask, shapes and strides while the
    mods still print to the same helpers (the eager path's per-call host cost is mostly planning)."""
    # a bound method (a module's self.score_mod) is a new object at every attribute access: keyed by
    # its function and instance, and found again by equality
    method = isinstance(score_mod, types.MethodType)
    sm_id = (id(score_mod.__func__), id(score_mod.__self__)) if method else id(score_mod)
    key_ = (query.shape, key.shape, value.shape, query.stride(), key.stride(), value.stride(), query.dtype,
            key.dtype, query.device, sm_id, id(block_mask), scale, tuple(sorted(opts.items())))
    hit = _plans.get(key_)
    if hit is not None:
        plan, sm_ref, bm_ref = hit
        fresh = plan.mask_versions is None or plan.mask_versions == tuple(t._version for t in plan.mask.tensors)
        sm = sm_ref() if sm_ref is not None else None
        same_mod = (sm == score_mod) if method else (sm is score_mod)
        if fresh and same_mod and (bm_ref() if bm_ref is not None else None) is block_mask:
            mm = block_mask.mask_mod if block_mask is not None else None
            if (_printed_mod(score_mod, "score_mod", plan.device, plan.fast_tanh) is plan.score
                    and _printed_mod(mm, "mask_mod", plan.device, False) is plan.mask):
                return plan
    plan = ForwardPlan(query, key, value, score_mod, block_mask, scale, opts)
    try:
        refs = ((weakref.WeakMethod if method else weakref.ref)(score_mod) if score_mod is not None else None,
                weakref.ref(block_mask) if block_mask is not None else None)
    except TypeError:
        return plan
    if len(_plans) > 64:  # plans hold their mods' tensors: keep few
        _plans.clear()
    _plans[key_] = (plan, *refs)
    return plan


def forward_launch(plan: ForwardPlan, query, key, value, out, lse, mx, cfg: Config):
    """(grid, positional args, constexpr kwargs) of one forward launch; the constexpr dict is kept
    by the plan for the next launch: copy it before changing it."""
    B, Hq, Lq, E = query.shape
    Hkv, Lkv, Ev = key.shape[1], key.shape[2], value.shape[-1]
    bm = plan.block_mask
    bm_args = plan.__dict__.setdefault("_bm_args", {})
    if (B, Hq) not in bm_args:
        bm_args[(B, Hq)] = _block_mask_args(bm, B, Hq)
    kv_num, kv_idx, full_num, full_idx = bm_args[(B, Hq)]
    q_bs, kv_bs = bm.BLOCK_SIZE
    dense = plan.user_block_mask is None  # no BlockMask: walk every kv block, no index loads
    log2e = 1.4426950408889634
    # without a score_mod the kernel folds scale * log2(e) into the softmax's exp2 argument, which
    # needs a positive scale; any other scale takes the score_mod path (an identity mod)
    has_score_mod = plan.has_score_mod or not plan.scale > 0
    qk_scale = plan.scale if has_score_mod else plan.scale * log2e
    mod_args = plan.score.args_for(plan.score.tensors) + plan.mask.args_for(plan.mask.tensors)
    # the warp-specialized loop reads Q, K and V through TMA as row matrices; otherwise (or where it
    # cannot build, also when pinned through kernel_options) the config runs unspecialized
    ws = (bool(cfg.warp_specialize) and not plan.interpret and ws_applies(plan)
          and query.dtype in (torch.float16, torch.bfloat16)
          and all(tma_eligible(t) and rows_layout(t) for t in (query, key, value)))
    if ws:
        compat.ensure_triton_allocator()
    # where mask_mod holds on the full blocks anyway (block_mask.full_from_mask_mod) and each row's
    # partial and full blocks are one run together, one loop walks that run: the specialized loop
    # with mask_mod on every tile (no branch on the tile there; a sliding window too), the plain one
    # where the lists are not runs each (documents: one loop instead of two short ones)
    mask_on_full = not dense and (plan_union_walk(plan) or (ws and full_blocks_from_mask_mod(plan)
                                                             and plan_union(plan)))
    args = (
        query, key, value, out, lse, mx, kv_num, kv_idx, full_num, full_idx,
        *query.stride(), *key.stride(), *value.stride(), *out.stride(),
        *kv_num.stride(), *kv_idx.stride()[:3],
        qk_scale, Lq, Lkv, Hq, Hq // Hkv,
        *mod_args,
    )
    # a float32 O from 16-bit inputs is the backward's (see _KernelForward): make it float32-exact
    split_p = out.dtype == torch.float32 and query.dtype != torch.float32
    tma = ws or use_tma(plan.opts, key, value)
    # the rest depends on the plan alone (per shapes, strides and dtypes): built once per variant
    memo = plan.__dict__.setdefault("_constexprs", {})
    constexprs = memo.get((cfg, ws, split_p, tma))
    if constexprs is None:
        constexprs = memo[(cfg, ws, split_p, tma)] = dict(
            HAS_SCORE_MOD=has_score_mod, QK_HEAD=E, V_HEAD=Ev, QK_PAD=head_pad(E), V_PAD=head_pad(Ev),
            BLOCK_M=cfg.BLOCK_M, BLOCK_N=cfg.BLOCK_N, SPARSE_Q=q_bs, SPARSE_KV=kv_bs,
            EVEN_M=Lq % cfg.BLOCK_M == 0, EVEN_N=Lkv % (cfg.BLOCK_N if dense else kv_bs) == 0,
            DOT_PRECISION="ieee" if query.dtype == torch.float32 else "tf32",
            DENSE=dense, HAS_FULL=True, SPLIT_P=split_p, USE_TMA=tma, WARP_SPECIALIZE=ws,
            # (Triton 3.6's Hopper warp specialization fails to build it: "PassManager::run failed")
            SEPARABLE=use_separable(plan.score, plan.opts, query.dtype) and not ws,
            RUNS=not dense and (plan_runs(plan) or mask_on_full),
            MASK_ON_FULL=mask_on_full,
        )
    grid = (triton_cdiv(Lq, cfg.BLOCK_M), B * Hq)
    return grid, args, constexprs


def use_separable(score: PrintedMod, opts: dict, dtype: torch.dtype) -> bool:
    """Whether the kernels take a separable score_mod as a * qk + key_bias, its row_bias folded into
    the row's lse (printer._SeparablePrinter). kernel_options SEPARABLE_SCORE_MOD; by default for
    16-bit inputs only: key_bias alone can be larger than the bias it is part of (ALiBi's
    slope * kv against slope * (kv - q)), so its float32 rounding, about 2^-24 of it, reaches
    ~1e-4 at positions in the thousands: far under a 16-bit P's rounding, not under float32's."""
    return score.separable and separable_wanted(opts, dtype)


def separable_wanted(opts: dict, dtype: torch.dtype) -> bool:
    """kernel_options SEPARABLE_SCORE_MOD, default: 16-bit inputs (see use_separable)."""
    flag = opts.get("SEPARABLE_SCORE_MOD")
    return dtype in (torch.float16, torch.bfloat16) if flag is None else bool(flag)


# USE_TMA's default: off. On the H100 (triton 3.6) the descriptor loads measured level at S=4096
# and 5-12% slower at S=1024, where each program's descriptor setup is a larger share
# (benchmarks/results/h100_2026-11-27_tma.md)
TMA_DEFAULT = False


def ws_applies(plan: ForwardPlan) -> bool:
    """Whether the warp-specialized forward can build for this plan: no captured tensors in the
    mods (Triton has no producer for a mod's pointer loads inside the loop), and either no
    BlockMask or one whose partial and full kv blocks are each one run (block_mask.block_runs), or
    together one run with full blocks from its mask_mod (block_mask.union_run: sliding windows):
    the kernel walks them in one loop with no index load per tile (Triton's Hopper pass rejects
    either, and a second specialized loop), on blocks the 128 x 128 tiles divide."""
    if plan.score.tensors:
        return False
    if plan.user_block_mask is None:
        return True
    if plan.mask.tensors:
        return False
    q_bs, kv_bs = plan.block_mask.BLOCK_SIZE
    return (q_bs % WS_TILE == 0 and kv_bs % WS_TILE == 0
            and (plan_runs(plan) or (full_blocks_from_mask_mod(plan) and plan_union(plan))))


# the warp-specialized config's tile (lowering/configs.py _FWD_WS_CANDIDATES)
WS_TILE = 128


def full_blocks_from_mask_mod(plan: ForwardPlan) -> bool:
    return plan.user_block_mask is not None and plan.block_mask.full_from_mask_mod


def plan_union(plan: ForwardPlan, side: str = "kv") -> bool:
    """Whether the plan's BlockMask rows of this side are one run of partial and full blocks
    together (block_mask.union_run); kernel_options KV_RUNS=False: never."""
    return _run_fact(plan, "_union_" + side, lambda bm: union_run(bm, side))


def plan_union_walk(plan: ForwardPlan, side: str = "kv") -> bool:
    """Whether the plain kernels walk this side's rows in one loop over the union of partial and
    full blocks (the templates' UNION, and the forward's MASK_ON_FULL without warp
    specialization): where the lists are not runs each (plan_runs takes those), are one run
    together, and full blocks came from mask_mod (packed documents, sliding windows)."""
    return (not plan_runs(plan, side) and full_blocks_from_mask_mod(plan) and plan_union(plan, side))


def plan_runs(plan: ForwardPlan, side: str = "kv") -> bool:
    """Whether the kernels walk the plan's BlockMask lists of this side as runs (the templates' RUNS:
    no index load per tile; block_mask.block_runs): the kv side for the forward and dQ, the q side
    for dK/dV. kernel_options KV_RUNS=False walks the index lists."""
    return _run_fact(plan, "_runs_" + side, lambda bm: block_runs(bm, side))


def _run_fact(plan: ForwardPlan, key: str, read) -> bool:
    # read(block_mask) once per plan; never without a user BlockMask or with KV_RUNS=False
    hit = plan.__dict__.get(key)
    if hit is None:
        hit = plan.__dict__[key] = bool(plan.user_block_mask is not None and plan.opts.get("KV_RUNS", True)
                                        and read(plan.block_mask))
    return hit


def rows_layout(t: torch.Tensor) -> bool:
    """Whether row m of head (b, h) of a [B, H, L, D] tensor sits at row (b * H + h) * L + m of one
    [B * H * L, D] matrix (strides permitting), with fewer than 2^31 rows (TMA coordinates are int32)."""
    B, H, L, _ = t.shape
    sb, sh, sl, _ = t.stride()
    return (B * H * L < 2 ** 31 and (H == 1 or sh == L * sl) and (B == 1 or sb == H * L * sl))


def tma_eligible(t: torch.Tensor) -> bool:
    """Whether a [B, H, L, D] tensor can be read through a TMA descriptor per (b, h): unit stride in
    D, 16-byte aligned base, row and head strides, at least 16 bytes per row."""
    el = t.element_size()
    return (t.stride(-1) == 1 and t.data_ptr() % 16 == 0 and t.shape[-1] * el >= 16
            and all((s * el) % 16 == 0 for s in t.stride()[:3]))


def use_tma(opts: dict, key: torch.Tensor, value: torch.Tensor) -> bool:
    want = opts.get("USE_TMA", TMA_DEFAULT)
    if not want:
        return False
    if not (tma_eligible(key) and tma_eligible(value)):
        log.info("inductor_flex: USE_TMA off for this call: K/V strides or alignment do not allow TMA")
        return False
    compat.ensure_triton_allocator()
    return True


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
        launch_kernel(module.flex_fwd_kernel, grid, args, constexprs, cfg.num_warps, cfg.num_stages, plan.interpret)

    if plan.gluon is not None and gluon_forward.launchable(query, key, value, out):
        caps = plan.score.args_for(plan.score.tensors) if plan.gluon_source is not None else ()
        gluon_forward.launch(query, key, value, out, lse, mx, plan.scale, plan.gluon == "causal",
                             plan.gluon_source, caps)
        plan.config = "gluon"
        return out, lse, mx
    cfg = plan.pinned or _pick_config(plan, launch, query, key, value)
    launch(cfg)
    plan.config = cfg
    return out, lse, mx


def triton_cdiv(a: int, b: int) -> int:
    return (a + b - 1) // b


def _bucket(n: int) -> int:
    return 1 << max(0, (n - 1).bit_length())


def fastest_config(candidates: List[Config], launch, kind: str) -> Tuple[Config, float]:
    """(config, ms) of the fastest candidate that runs. Each is timed (median of do_bench), then the
    best two again, alternately, three times, so that a GPU clock drifting while the candidates run
    one after another (a hot GPU slows down) does not pick the winner. (One H100 profile had the
    eager dQ tuner pick (128, 128, 8, 2), 1.37 ms in the step, where Inductor's picked (64, 64, 4, 2),
    1.28 ms: noop S=4096, h100_2026-11-26_profile_4096_noop_alibi_sliding_doc1024.txt.)"""
    import statistics

    import triton.testing

    times = {}
    for c in candidates:
        try:
            times[c] = triton.testing.do_bench(lambda: launch(c), warmup=5, rep=20, return_mode="median")
        except Exception as e:  # noqa: BLE001 - a config that fails to compile is just not chosen
            log.info("inductor_flex: %s config %s failed: %s", kind, c, e)
    if not times:
        raise RuntimeError(f"inductor_flex: no {kind} config could run; tried {candidates}")
    top = sorted(times, key=times.get)[:2]
    if len(top) == 2:
        again = {c: [] for c in top}
        for _ in range(3):
            for c in top:
                again[c].append(triton.testing.do_bench(lambda: launch(c), warmup=1, rep=10, return_mode="median"))
        times.update({c: statistics.median(v) for c, v in again.items()})
    best = min(top, key=times.get)
    return best, times[best]


def _pick_config(plan: ForwardPlan, launch, query, key, value) -> Config:
    B, Hq, Lq, E = query.shape
    if plan.interpret or len(plan.candidates) == 1 or not autotune_pays(B, Hq, Lq, key.shape[2]):
        return plan.candidates[0]
    tune_key = (plan.source, str(query.dtype), E, value.shape[-1], plan.block_mask.BLOCK_SIZE,
                _bucket(Lq), _bucket(key.shape[2]), _bucket(B * Hq), query.device.index, tuple(plan.candidates))
    cfg = _autotuned.get(tune_key)
    if cfg is not None:
        return cfg
    log.info("inductor_flex: autotuning %d forward configs for %s", len(plan.candidates), tune_key[1:])
    best, best_ms = fastest_config(plan.candidates, launch, "forward")
    log.info("inductor_flex: picked %s (%.3f ms)", best, best_ms)
    _autotuned[tune_key] = best
    return best


# ---- autograd: fused forward, fused backward --------------------------------------------------
class _KernelForward(torch.autograd.Function):
    @staticmethod
    def forward(ctx, plan, query, key, value, *captured):
        learned = any(t.requires_grad and t.is_floating_point() for t in captured[:len(plan.score.tensors)])
        if learned and query.dtype in (torch.float16, torch.bfloat16):
            # The backward's delta = rowsum(dO * O) from O rounded to 16 bits shifts every dS of a row
            # alike; a captured tensor's gradient sums dS over whole rows, so the shift does not
            # cancel and its error grew past the math reference's (bf16 ALiBi slopes: 0.86 vs 0.60).
            # The kernel writes O in float32 for the backward (SPLIT_P: P·V from P's 16-bit head and
            # residue; a float32 O from a rounded P was not enough), and the caller gets it rounded.
            B, Hq, Lq, _ = query.shape
            exact = torch.empty(B, Hq, Lq, value.shape[-1], dtype=torch.float32, device=query.device)
            exact, lse, mx = run_forward(plan, query, key, value, out=exact)
            out = exact.to(query.dtype)
        else:
            out, lse, mx = run_forward(plan, query, key, value)
            exact = out
        ctx.save_for_backward(query, key, value, exact, lse, *captured)
        ctx.plan = plan
        ctx.mark_non_differentiable(mx)
        # an unused output's gradient arrives as None, not as zeros filled on the device each step
        # (run_backward reads a missing grad_out as zeros and a missing grad_lse as none)
        ctx.set_materialize_grads(False)
        return out, lse, mx

    @staticmethod
    def backward(ctx, g_out, g_lse, g_mx):
        from .backward import BackwardPlan, run_backward

        query, key, value, out, lse, *captured = ctx.saved_tensors
        plan = ctx.plan
        n_score = len(plan.score.tensors)
        needs = ctx.needs_input_grad[4:]
        grad_caps = tuple(bool(n) and t.is_floating_point() for n, t in zip(needs[:n_score], captured[:n_score]))
        # one backward plan per forward plan and set of captured-tensor grads: a training loop's
        # steps reuse it (its render is cached too, but building it again is host time every step)
        bplans = plan.__dict__.setdefault("_bplans", {})
        bplan = bplans.get(grad_caps)
        if bplan is None:
            bplan = bplans[grad_caps] = BackwardPlan(plan, plan.score_mod, grad_caps, plan.opts)
        dq, dk, dv, cap_grads = run_backward(bplan, query, key, value, out, lse, g_out, g_lse, grad_caps)
        cap_grads = list(cap_grads) + [None] * (len(captured) - len(cap_grads))
        qkv = [g if need else None for g, need in zip((dq, dk, dv), ctx.needs_input_grad[1:4])]
        return (None, *qkv, *cap_grads)


def kernel_attention(query, key, value, score_mod, block_mask, scale, opts):
    if opts["BACKEND"] == "TRITON_DECODE" or query.shape[2] <= 16:
        from .decode import maybe_decode  # short queries without grad: split-KV decode kernel

        res = maybe_decode(query, key, value, score_mod, block_mask, scale, opts)
        if res is not None:
            return res
    plan = cached_plan(query, key, value, score_mod, block_mask, scale, opts)
    captured = plan.score.tensors + plan.mask.tensors
    needs_grad = torch.is_grad_enabled() and any(t.requires_grad for t in (query, key, value, *captured))
    if not needs_grad:
        return run_forward(plan, query, key, value)
    out, lse, mx = _KernelForward.apply(plan, query, key, value, *captured)
    return out, lse, mx


def kernel_source(query, key, value, score_mod=None, block_mask=None, scale=None, enable_gqa=False,
                  kernel_options=None) -> str:
    from .validation import validate_inputs, validate_kernel_options

    validate_inputs(query, key, value, block_mask, scale, enable_gqa)
    opts = validate_kernel_options(kernel_options)
    plan = ForwardPlan(query, key, value, score_mod, block_mask, scale, opts)
    if plan.gluon is not None and gluon_forward.reads_layout(query, key, value):
        return gluon_forward.source(plan.gluon, plan.gluon_source)  # the hand-scheduled kernel serves this call
    return plan.source
