"""Eager decode path: short queries against a long KV cache (templates/flex_decode.py.jinja).

A decode step is bound by reading K and V once, so the kernel packs the query heads of one GQA group
into one tile (each K/V tile is loaded once per group, not once per query head) and splits the kv
range of every (batch, group) into SPLIT shares, so that B * Hkv * SPLIT programs fill the GPU.
A second small kernel merges the shares by their logsumexp.

Decode steps are short (~100 us), so the per-call Python work matters: a DecodePlan (printed mods,
rendered module, tile config, split) is cached per (mods, shapes), keyed by a fingerprint of what
the mods close over. Closing over an ``offset`` tensor and updating it in place therefore serves
every position with one plan and one compiled kernel.
"""
from __future__ import annotations

import functools
import itertools
import logging
import math
import types
from typing import Callable, Dict, Optional, Tuple

import torch

from . import compat
from .block_mask import BlockMask
from .launch import launch as launch_kernel
from .mods import STATIC_MOD_DEPS
from .kernel import (
    _block_mask_args, _call_method, _constant, _default_block_mask, _fingerprint as _method_fingerprint,
    _printed_mod, interpreter_enabled, load_module,
    template_hooks, torch_callable, use_tma,
)
from .printer import PrintedMod
from .validation import use_fast_tanh

from inductor_flex.lowering.configs import head_pad, next_pow2
from inductor_flex.lowering.decode_configs import (
    DecodeConfig, decode_configs, decode_split, sm_count, split_candidates,
)
from inductor_flex.templates import render

log = logging.getLogger("inductor_flex")

# AUTO / TRITON take the decode kernel up to this many query rows (the forward kernel's
# 128-row tiles would be mostly padding below it)
DECODE_MAX_LQ = 16
# most rows (query heads x query positions) one program keeps in registers
MAX_ROWS = 128

_plans: Dict[tuple, "DecodePlan"] = {}
_interpret: list = []
_rendered: Dict[tuple, tuple] = {}
_tuned: Dict[tuple, Tuple[DecodeConfig, int]] = {}
_unkeyed = itertools.count()
# counters the tests read to prove that a new decode position reuses the plan and the module
stats = {"plans": 0, "plan_hits": 0, "renders": 0}


# ---- plan cache key: what a mod reads, without running it --------------------------------------
def _fingerprint(obj, depth: int = 0, objs: Optional[list] = None):
    """Hashable summary of a mod: the function, its closure values (tensors by identity, scalars by
    value, nested mods recursively) and the globals / attributes its code names."""
    if obj is None or isinstance(obj, (bool, int, float, str)):
        return obj
    if isinstance(obj, torch.Tensor):
        return ("tensor", id(obj))
    if depth > 4:
        return _object_entry(obj, objs)
    if isinstance(obj, (list, tuple)):
        const = _constant(obj)
        if const is not None:  # a list of constants by its contents: the print bakes them in
            return const
        if len(obj) <= 64:  # the mods a combinator holds (and_masks / or_masks)
            return ("seq", type(obj).__name__, tuple(_fingerprint(x, depth + 1, objs) for x in obj))
    deps = getattr(obj, STATIC_MOD_DEPS, None) if isinstance(obj, types.FunctionType) else None
    if deps is not None:
        # a mod marked fixed (paged.py's wrappers, noop_mask): itself, and the mods it wraps
        return ("static", obj, tuple(_fingerprint(d, depth + 1, objs) for d in deps))
    if isinstance(obj, types.MethodType) or _call_method(obj) is not None:
        # a module's self.score_mod, a callable object: what the forward's print cache walks (the
        # attributes of self its code names, the methods among them); where that meets an object
        # it cannot see through (an nn.Module's own __call__), a key of its own: planned per call
        fp = _method_fingerprint(obj)
        if fp is None:
            return ("unkeyed", next(_unkeyed))
        return ("method", fp[0], tuple(id(t) for t in fp[1]))
    if isinstance(obj, functools.partial):
        return ("partial", _fingerprint(obj.func, depth + 1, objs),
                tuple(_fingerprint(a, depth + 1, objs) for a in obj.args),
                tuple((k, _fingerprint(v, depth + 1, objs)) for k, v in sorted(obj.keywords.items())))
    code = getattr(obj, "__code__", None)
    if code is None:
        return _object_entry(obj, objs)
    parts: list = [obj]
    for cell in getattr(obj, "__closure__", None) or ():
        try:
            value = cell.cell_contents
        except ValueError:
            parts.append(("empty",))
            continue
        parts.append(_fingerprint(value, depth + 1, objs))
        if not isinstance(value, (torch.Tensor, types.FunctionType, bool, int, float, str)):
            parts.append(_attributes(value, code.co_names))
    glb = getattr(obj, "__globals__", {})
    for name in code.co_names:
        if name in glb:
            value = glb[name]
            parts.append(_fingerprint(value, depth + 1, objs) if isinstance(value, types.FunctionType)
                         else _object_entry(value, objs) if _is_object(value) else (name, id(value)))
            if not isinstance(value, types.ModuleType):
                # e.g. Holder.bias replaced by a new tensor
                parts.append(_attributes(value, code.co_names))
    return tuple(parts)


def _object_entry(obj, objs: Optional[list]) -> tuple:
    if objs is not None:
        objs.append(obj)
    return ("obj", id(obj))


def _plan_key(mod):
    """_fingerprint of a mod; where it meets an object (keyed there by the attributes the mod's own
    code names), also the print cache's key, which holds the numbers behind every name any code of
    the walk reads (a helper reading cfg.scale off an object the mod hands it), or a key of its own
    (planned per call) where that cannot be had."""
    objs: list = []
    fp = _fingerprint(mod, 0, objs)
    if not objs:
        return fp
    reach = _method_fingerprint(mod, opaque_ok=True)
    if reach is None:
        return ("unkeyed", next(_unkeyed))
    return (fp, reach[0], tuple(id(t) for t in reach[1]))


def _is_object(v) -> bool:
    """Whether a global a mod names may hold numbers a helper reads off it (a user's object or
    class), as opposed to a number, tensor, function, module or one of torch's callables."""
    if v is None or isinstance(v, (bool, int, float, str, torch.Tensor, torch.dtype, types.FunctionType,
                                   types.ModuleType, functools.partial)):
        return False
    if isinstance(v, (list, tuple)):
        return _constant(v) is None
    return not torch_callable(v)


def _attributes(obj, names) -> tuple:
    return tuple(id(getattr(obj, n, None)) for n in names)


# ---- support --------------------------------------------------------------------------------------
def decode_supports(query, key, value, block_size: Optional[tuple]) -> Optional[str]:
    """None if the decode kernel handles this call, else the reason it cannot. block_size: the
    BlockMask's (q, kv) BLOCK_SIZE, None without a BlockMask."""
    for name, d in (("query/key head dim", query.shape[-1]), ("value head dim", value.shape[-1])):
        if d > 256:
            return f"{name} {d} > 256"
    Lq = query.shape[2]
    q_bs = block_size[0] if block_size is not None else 128
    if block_size is not None and block_size[1] % 16:
        return f"BlockMask kv BLOCK_SIZE {block_size[1]} is not a multiple of 16"
    if Lq > q_bs:
        return f"query length {Lq} spans more than one BlockMask q block ({q_bs})"
    if Lq > MAX_ROWS:
        return f"query length {Lq} > {MAX_ROWS}"
    return None


def _block_size(block_mask: Optional[BlockMask]) -> Optional[tuple]:
    return block_mask.BLOCK_SIZE if block_mask is not None else None


def _heads_per_program(group: int, Lq: int, mask_heads: int) -> int:
    """Query heads packed in one program: the whole GQA group when the BlockMask is shared by all
    heads (one row of kv blocks serves the tile), as many as fit in MAX_ROWS rows."""
    if mask_heads != 1:
        return 1
    best = 1
    for d in range(1, group + 1):
        if group % d == 0 and d * Lq <= MAX_ROWS:
            best = d
    return best


class DecodePlan:
    """Everything a decode launch needs that does not change from one step to the next."""

    def __init__(self, query, key, value, score: PrintedMod, mask: PrintedMod, has_score_mod: bool, block_size,
                 mask_heads: int, opts: dict, dense: bool = False, source: Optional[str] = None):
        """score / mask: the printed mods (their tensors are the ones launches pass); source: the
        rendered module when the caller rendered it already (the compiled op renders at trace time)."""
        self.device = query.device
        self.interpret = interpreter_enabled()
        if query.dtype == torch.float64:
            raise TypeError("the Triton decode kernel supports float16, bfloat16 and float32 inputs; "
                            "use BACKEND 'MATH' for float64")
        if self.device.type not in ("cuda", "cpu"):
            raise ValueError(
                f"the Triton kernel runs on CUDA tensors (or CPU under the interpreter), got {self.device}")
        self.score, self.mask, self.has_score_mod = score, mask, has_score_mod
        self.source = source if source is not None else self._render()
        B, Hq, Lq, E = query.shape
        Hkv, Lkv, Ev = key.shape[1], key.shape[2], value.shape[-1]
        self.group = Hq // Hkv
        self.heads = _heads_per_program(self.group, Lq, mask_heads)
        self.block_m = max(16, next_pow2(self.heads * Lq))
        self.sparse_kv = block_size[1]
        self.candidates = decode_configs(E, Ev, query.dtype, self.sparse_kv, self.device, self.interpret)
        self.pinned = _pinned_config(opts, self.candidates[0], self.sparse_kv)
        self.pinned_split = opts.get("SPLIT_KV")
        # kernel_options USE_TMA (off by default); whether a launch's K/V allow it is checked per launch
        self.want_tma = bool(opts.get("USE_TMA", False))
        self.programs = B * Hq // self.heads
        self.sms = sm_count(self.device) if self.device.type == "cuda" else 132
        self.constexprs = dict(
            HAS_SCORE_MOD=self.has_score_mod, QK_HEAD=E, V_HEAD=Ev, QK_PAD=head_pad(E), V_PAD=head_pad(Ev),
            HEADS=self.heads, BLOCK_M=self.block_m, SPARSE_KV=self.sparse_kv, EVEN_N=Lkv % self.sparse_kv == 0,
            DOT_PRECISION="ieee" if query.dtype == torch.float32 else "tf32", DENSE=dense,
        )
        self.counters: Dict[int, torch.Tensor] = {}  # per stream, see _counter
        self.spare_counters: list = []
        self.parts: Dict[tuple, torch.Tensor] = {}  # per (stream, split), see _buffers
        self.module = None
        self.config: Optional[DecodeConfig] = None
        self.split: Optional[int] = None
        self.kv_blocks: Optional[int] = None
        self.mask_args = None

    def _render(self) -> str:
        sm, mm = self.score, self.mask
        hit = _rendered.get((id(sm), id(mm)))
        if hit is not None and hit[0] is sm and hit[1] is mm:
            return hit[2]
        stats["renders"] += 1
        source = render("flex_decode.py.jinja", **template_hooks(sm, mm))
        if len(_rendered) > 256:
            _rendered.clear()
        _rendered[(id(sm), id(mm))] = (sm, mm, source)
        return source

    def default_split(self, kv_blocks: int, cfg: DecodeConfig) -> int:
        tiles = kv_blocks * (self.sparse_kv // cfg.BLOCK_N)
        if self.pinned_split is not None:
            return max(1, min(self.pinned_split, tiles))
        return decode_split(self.programs, tiles, self.sms)


def _pinned_config(opts, default: DecodeConfig, kv_block: int) -> Optional[DecodeConfig]:
    if not any(k in opts for k in ("BLOCK_N", "num_warps", "num_stages")):
        return None
    cfg = DecodeConfig(opts.get("BLOCK_N", default.BLOCK_N), opts.get("num_warps", default.num_warps),
                       opts.get("num_stages", default.num_stages))
    if kv_block % cfg.BLOCK_N:
        raise ValueError(f"kernel_options BLOCK_N={cfg.BLOCK_N} must divide the BlockMask's kv block size {kv_block}")
    return cfg


def _interpreting() -> bool:
    # fixed for the process: @triton.jit picks the interpreter when the module is imported
    if not _interpret:
        _interpret.append(interpreter_enabled())
    return _interpret[0]


def get_plan(query, key, value, score_mod, block_mask: Optional[BlockMask], opts) -> DecodePlan:
    mask_mod = block_mask.mask_mod if block_mask is not None else None
    block_size = block_mask.BLOCK_SIZE if block_mask is not None else (128, 128)
    mask_heads = block_mask.kv_num_blocks.shape[1] if block_mask is not None else 1
    k = (
        _plan_key(score_mod), _plan_key(mask_mod), tuple(query.shape), tuple(key.shape),
        tuple(value.shape), query.dtype, query.device, block_size, mask_heads, _interpreting(),
        tuple(sorted(opts.items())), block_mask is None,
    )
    plan = _plans.get(k)
    if plan is not None:
        stats["plan_hits"] += 1
        return plan
    fast_tanh = use_fast_tanh(opts, query.dtype, not interpreter_enabled())
    score = _printed_mod(score_mod, "score_mod", query.device, fast_tanh)
    mask = _printed_mod(mask_mod, "mask_mod", query.device, False)
    # without a BlockMask the kernel walks the kv range densely (no block-index loads)
    plan = DecodePlan(query, key, value, score, mask, score_mod is not None, block_size, mask_heads, opts,
                      dense=block_mask is None)
    stats["plans"] += 1
    if len(_plans) > 256:
        _plans.clear()
    _plans[k] = plan
    return plan


# ---- launching ------------------------------------------------------------------------------------
def _mask_args(plan: DecodePlan, bm: BlockMask, B: int, Hq: int):
    # a decode loop (or a benchmark) passes the same BlockMask again and again: keep its launch views
    tensors = (bm.kv_num_blocks, bm.kv_indices, bm.full_kv_num_blocks, bm.full_kv_indices)
    hit = plan.mask_args
    if hit is not None and hit[0] is bm and hit[1] == (B, Hq) and all(a is b for a, b in zip(hit[2], tensors)):
        return hit[3]
    args = _block_mask_args(bm, B, Hq)
    plan.mask_args = (bm, (B, Hq), tensors, args)
    return args


def _launch(plan: DecodePlan, module, query, key, value, bm: BlockMask, scale: float, cfg: DecodeConfig,
            split: int, out, lse, mx, part):
    B, Hq, Lq, E = query.shape
    Hkv, Lkv, Ev = key.shape[1], key.shape[2], value.shape[-1]
    kv_num, kv_idx, full_num, full_idx = _mask_args(plan, bm, B, Hq)
    qk_scale = scale if plan.has_score_mod else scale * 1.4426950408889634
    mod_args = plan.score.args_for(plan.score.tensors) + plan.mask.args_for(plan.mask.tensors)
    rows = B * Hq * Lq
    merge = split > 1
    counter = _counter(plan, query) if merge else lse
    args = (
        query, key, value, out, lse, mx, part if merge else lse, counter,
        kv_num, kv_idx, full_num, full_idx,
        *query.stride(), *key.stride(), *value.stride(), *out.stride(),
        kv_num.stride(0), kv_num.stride(1), kv_idx.stride(0), kv_idx.stride(1),
        qk_scale, Lq, Lkv, Hq, Hq // Hkv, split, rows * split * Ev, rows * split * (Ev + 1),
        *mod_args,
    )
    launch_kernel(module.flex_decode_kernel, (split, plan.programs), args,
                  dict(plan.constexprs, BLOCK_N=cfg.BLOCK_N, MERGE=merge, USE_TMA=plan.want_tma and use_tma(
                      {"USE_TMA": True}, key, value)), cfg.num_warps, cfg.num_stages,
                  plan.interpret)


# zeroed counter rows a plan allocates at once, one per stream it meets (the default stream, side
# streams), so a new stream takes one without allocating or zeroing
_COUNTER_ROWS = 4


def _counter(plan: DecodePlan, query) -> torch.Tensor:
    """Per-group arrival counters of the in-kernel merge. The last share of a group resets its
    counter, so a zeroed row serves every launch on one stream; each stream gets its own row
    (launches on two streams may overlap)."""
    if query.device.type != "cuda":
        return torch.zeros(plan.programs, dtype=torch.int32, device=query.device)
    if torch.cuda.is_current_stream_capturing():
        # every captured launch gets its own counters, zeroed inside the graph: two graphs of one
        # plan may replay at once on two streams (with the memset node a graph measured 2.555 TB/s
        # at the benchmark shape, without it 2.557-2.562)
        return torch.zeros(plan.programs, dtype=torch.int32, device=query.device)
    stream = compat.raw_stream(query.device)
    counter = plan.counters.get(stream)
    if counter is None:
        if not plan.spare_counters:
            plan.spare_counters = list(compat.persistent_tensors(query.device, lambda: torch.zeros(
                _COUNTER_ROWS, plan.programs, dtype=torch.int32, device=query.device)))
        counter = plan.counters[stream] = plan.spare_counters.pop()
    return counter


# largest merge scratch (float32 elements) a plan keeps per stream; a step that needs more is long
# enough for an allocation not to matter
_MAX_KEPT_SCRATCH = 1 << 22


def _buffers(query, value, split: int, plan: Optional[DecodePlan] = None):
    B, Hq, Lq, _ = query.shape
    Ev = value.shape[-1]
    out = torch.empty(B, Hq, Lq, Ev, dtype=query.dtype, device=query.device)
    lse = torch.empty(B, Hq, Lq, dtype=torch.float32, device=query.device)
    mx = torch.empty(B, Hq, Lq, dtype=torch.float32, device=query.device)
    if split == 1:
        return out, lse, mx, None

    # the shares' outputs, lse and max in one allocation: scratch only the kernel reads, so given
    # the plan one buffer per stream serves every launch (launches on one stream run in order) and
    # a short step saves an allocation; inside a CUDA-graph capture each launch gets its own
    numel = B * Hq * Lq * split * (Ev + 2)

    def make():
        return torch.empty(numel, dtype=torch.float32, device=query.device)

    if (plan is None or numel > _MAX_KEPT_SCRATCH or query.device.type != "cuda"
            or torch.cuda.is_current_stream_capturing()):
        return out, lse, mx, make()
    key = (compat.raw_stream(query.device), split)
    part = plan.parts.get(key)
    if part is None:
        part = plan.parts[key] = compat.persistent_tensors(query.device, make)
    return out, lse, mx, part


def run_decode(plan: DecodePlan, query, key, value, block_mask: BlockMask, scale: float):
    if query.device.type == "cpu" and not plan.interpret:
        raise RuntimeError(
            "the Triton decode kernel on CPU tensors runs in Triton's interpreter: set the environment "
            "variable TRITON_INTERPRET=1 before triton is first imported (or use CUDA tensors)"
        )
    if plan.module is None:
        plan.module = load_module(plan.source, plan.interpret)
    kv_blocks = block_mask.num_blocks[1]
    if plan.config is None or plan.kv_blocks != kv_blocks:
        plan.config, plan.split = _pick(plan, query, key, value, block_mask, scale)
        plan.kv_blocks = kv_blocks
    out, lse, mx, part = _buffers(query, value, plan.split, plan)
    _launch(plan, plan.module, query, key, value, block_mask, scale, plan.config, plan.split, out, lse, mx, part)
    return out, lse, mx


def _bucket(n: int) -> int:
    return 1 << max(0, (n - 1).bit_length())


def _pick(plan: DecodePlan, query, key, value, bm: BlockMask, scale: float) -> Tuple[DecodeConfig, int]:
    kv_blocks = bm.num_blocks[1]
    cfg = plan.pinned or plan.candidates[0]
    split = plan.default_split(kv_blocks, cfg)
    B, Hq, Lq, _ = query.shape
    small = B * Hq * Lq * key.shape[2] < (1 << 20)
    capturing = query.device.type == "cuda" and torch.cuda.is_current_stream_capturing()
    if plan.interpret or small or capturing or (plan.pinned and plan.pinned_split):
        return cfg, split
    tune_key = (plan.source, str(query.dtype), tuple(query.shape), tuple(key.shape[1:2]), value.shape[-1],
                _bucket(key.shape[2]), plan.heads, bm.BLOCK_SIZE, query.device.index,
                plan.pinned, plan.pinned_split, plan.constexprs["DENSE"])
    hit = _tuned.get(tune_key)
    if hit is not None:
        return hit
    import triton.testing

    module = plan.module
    configs = [plan.pinned] if plan.pinned else plan.candidates
    tiles = kv_blocks * (plan.sparse_kv // min(c.BLOCK_N for c in configs))

    def bench(c: DecodeConfig, s: int) -> float:
        out, lse, mx, part = _buffers(query, value, s)

        def launch():
            _launch(plan, module, query, key, value, bm, scale, c, s, out, lse, mx, part)

        try:
            launch()  # compiles; a config that does not fit fails here
            # timed as a CUDA graph: a step is ~100 us, and eager timing would add the launch's
            # host time (and its noise) to every candidate
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                launch()
            return triton.testing.do_bench(graph.replay, warmup=5, rep=25, return_mode="median")
        except Exception as e:  # noqa: BLE001 - a config that fails to compile is just not chosen
            log.info("inductor_flex: decode config %s split %d failed: %s", c, s, e)
            return float("inf")

    # every config at the default split and at the most shares that still fit one wave of
    # programs (the best config differs between the two), then the split counts around the winner
    fill = max(1, min(split, plan.sms // plan.programs))
    timings = {(c, s): bench(c, s) for c in configs for s in dict.fromkeys((split, fill))}
    best_cfg = min(timings, key=timings.get)[0]
    splits = [plan.pinned_split] if plan.pinned_split else split_candidates(split, tiles, plan.programs, plan.sms)
    for s in splits:
        if (best_cfg, s) not in timings:
            timings[(best_cfg, s)] = bench(best_cfg, s)
    best = min(timings, key=timings.get)
    if timings[best] == float("inf"):
        raise RuntimeError(f"inductor_flex: no decode config could run; tried {sorted(timings)}")
    log.info("inductor_flex: decode picked %s split=%d (%.3f ms)", best[0], best[1], timings[best])
    _tuned[tune_key] = best
    return best


# ---- entry points ---------------------------------------------------------------------------------
def decode_attention(query, key, value, score_mod: Optional[Callable], block_mask: Optional[BlockMask],
                     scale: Optional[float], opts: dict):
    """(out, lse, max_scores) of one decode step; inputs are assumed validated (flex_attention does)."""
    reason = decode_supports(query, key, value, _block_size(block_mask))
    if reason is not None:
        raise ValueError(f"BACKEND 'TRITON_DECODE' cannot run this call: {reason}")
    bm = block_mask if block_mask is not None else _default_block_mask(query.shape[2], key.shape[2], query.device)
    plan = get_plan(query, key, value, score_mod, block_mask, opts)
    scale = scale if scale is not None else 1.0 / math.sqrt(query.shape[-1])
    return run_decode(plan, query, key, value, bm, scale)


def maybe_decode(query, key, value, score_mod, block_mask, scale, opts):
    """The decode kernel's result, or None when the forward kernel should run this call instead.

    BACKEND 'TRITON_DECODE' always decodes (and raises where it cannot); AUTO / TRITON decode short
    queries that need no gradient (the decode kernel has no backward)."""
    forced = opts.get("BACKEND") == "TRITON_DECODE"
    if not forced and (query.shape[2] > DECODE_MAX_LQ or opts.get("FORCE_USE_FLEX_ATTENTION")):
        return None
    grad = torch.is_grad_enabled()
    if grad and any(t.requires_grad for t in (query, key, value)):
        if forced:
            raise ValueError("BACKEND 'TRITON_DECODE' has no backward: run it under torch.no_grad() or use "
                             "BACKEND 'TRITON' when gradients are needed")
        return None
    if not forced and decode_supports(query, key, value, _block_size(block_mask)) is not None:
        return None
    if forced:
        reason = decode_supports(query, key, value, _block_size(block_mask))
        if reason is not None:
            raise ValueError(f"BACKEND 'TRITON_DECODE' cannot run this call: {reason}")
    plan = get_plan(query, key, value, score_mod, block_mask, opts)
    if grad and any(t.requires_grad for t in plan.score.tensors + plan.mask.tensors):
        if forced:
            raise ValueError("BACKEND 'TRITON_DECODE' has no backward (a captured tensor requires grad): run it "
                             "under torch.no_grad() or use BACKEND 'TRITON'")
        return None
    bm = block_mask if block_mask is not None else _default_block_mask(query.shape[2], key.shape[2], query.device)
    scale = scale if scale is not None else 1.0 / math.sqrt(query.shape[-1])
    return run_decode(plan, query, key, value, bm, scale)
