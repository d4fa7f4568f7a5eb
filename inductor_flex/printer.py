"""FX -> Triton printer: turns a score_mod / mask_mod into a ``@triton.jit`` helper function.

The eager path and the Triton interpreter fill the template's hooks with these helpers. A mod is
traced with ``make_fx`` on 0-d tensors (its captured tensors become graph constants); each aten
node becomes one line of Triton. Inside the kernel ``q_idx`` is a (BLOCK_M, 1) column,
``kv_idx`` a (1, BLOCK_N) row and ``score`` a (BLOCK_M, BLOCK_N) tile, so elementwise code
broadcasts exactly as the scalar code would have. Captured tensors become pointer arguments with
their sizes and strides; every gather wraps negative indices like PyTorch and masks the rest, so a
padded row or column can never read out of bounds.
"""
from __future__ import annotations

import math
import re
import weakref
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional, Tuple

import torch
from torch.fx.experimental.proxy_tensor import make_fx

from .joint_graph import derivative_is_bounded, fold_constant_factors
from .mods import FlexModError, TensorIndexMode, explain_mod_error, mod_name

aten = torch.ops.aten
prims = torch.ops.prims

TL_DTYPES = {
    torch.float16: "tl.float16", torch.bfloat16: "tl.bfloat16", torch.float32: "tl.float32",
    torch.float64: "tl.float64", torch.int8: "tl.int8", torch.int16: "tl.int16", torch.int32: "tl.int32",
    torch.int64: "tl.int64", torch.uint8: "tl.uint8", torch.bool: "tl.int1",
}

# tanh's exp form loses precision near 0 (see _tanh); below this |x| it is the Taylor series
# x + x^3 (c3 + x^2 (c5 + ...)) to x^17, whose truncation there is under 0.1 ulp (shared with
# lowering/template.py)
TANH_SERIES_BELOW = 0.55
TANH_SERIES = (-1 / 3, 2 / 15, -17 / 315, 62 / 2835, -1382 / 155925, 21844 / 6081075,
               -929569 / 638512875, 6404582 / 10854718875)
# expm1 and log1p likewise near 0: under |x| = 0.5, x + x^2 (1/2! + x (1/3! + ...)) to x^9, and
# 2 atanh(s) = 2 (s + s^3 (1/3 + s^2 (1/5 + ...))) to s^15 with s = x / (2 + x), for -0.5 < x < 1
# (|s| < 1/3)
EXPM1_SERIES = tuple(1 / math.factorial(k) for k in range(2, 10))
LOG1P_SERIES = tuple(1 / k for k in range(3, 17, 2))


def _horner(var: str, coeffs) -> str:
    inner = repr(coeffs[-1])
    for c in reversed(coeffs[:-1]):
        inner = f"({c!r} + {var} * {inner})"
    return inner


# Shared helpers the printed code may call; they go once at the top of the rendered module.
HELPERS = '''
@triton.jit
def _floordiv(a, b):
    # Python floor division whatever the backend's integer division rounds to
    q = a // b
    r = a - q * b
    return tl.where((r != 0) & ((r < 0) != (b < 0)), q - 1, q)


@triton.jit
def _pymod(a, b):
    # Python remainder: the sign follows the divisor
    r = a % b
    return tl.where((r != 0) & ((r < 0) != (b < 0)), r + b, r)


@triton.jit
def _pow(x, y):
    # torch.pow for a float base and a tensor exponent: |x| ** y through exp2 / log2, then the sign
    # an odd integer y gives a negative x, NaN for a negative x and a non-integer y, and x ** 0 = 1
    r = tl.exp2(tl.log2(tl.abs(x)) * y)
    whole = y == tl.floor(y)
    odd = whole & (tl.floor(y * 0.5) * 2.0 != y)
    r = tl.where((x < 0) & odd, -r, r)
    r = tl.where((x < 0) & ~whole, float("nan"), r)
    return tl.where(y == 0, 1.0, r)


@triton.jit
def _tanh(x):
    # exact to a few ulp and runs everywhere (libdevice is unavailable in the interpreter); an
    # FMA-only Newton reciprocal instead of the division measured slower on the H100 (softcap fwd
    # 255 vs 303 TFLOP/s), and so did x * (1 / c) for x / c (280 vs 303, one run each)
    a = tl.abs(x)
    e = tl.exp(-2.0 * a)
    t = (1.0 - e) / (1.0 + e)
    # near 0, 1 - e cancels (relative error ~eps/|x|) and the error of e is magnified, which a
    # gradient through tanh(x) - x(1 - tanh^2) magnifies again: the Taylor series there
    z = x * x
    p = x + x * z * @TANH_SERIES@
    return tl.where(a < @TANH_SERIES_BELOW@, p, tl.where(x < 0, -t, t))


@triton.jit
def _expm1(x):
    # exp(x) - 1 cancels near 0 (~eps/|x| relative): the series there
    p = x + x * x * @EXPM1_SERIES@
    return tl.where(tl.abs(x) < 0.5, p, tl.exp(x) - 1.0)


@triton.jit
def _log1p(x):
    # log(1 + x) loses x's low bits in 1 + x near 0: 2 atanh(x / (2 + x)) as a series there
    s = x / (2.0 + x)
    z = s * s
    p = 2.0 * s + 2.0 * s * z * @LOG1P_SERIES@
    return tl.where((x > -0.5) & (x < 1.0), p, tl.log(1.0 + x))


@triton.jit
def _tanh_approx(x):
    # Hopper's MUFU tanh (max rel. error ~2^-11): kernel_options FAST_TANH, the 16-bit default
    return tl.inline_asm_elementwise("tanh.approx.f32 $0, $1;", "=f,f", [x], dtype=tl.float32,
                                     is_pure=True, pack=1)
'''.replace("@TANH_SERIES@", _horner("z", TANH_SERIES)).replace("@TANH_SERIES_BELOW@", repr(TANH_SERIES_BELOW)) \
    .replace("@EXPM1_SERIES@", _horner("x", EXPM1_SERIES)).replace("@LOG1P_SERIES@", _horner("z", LOG1P_SERIES))


@dataclass
class Value:
    """A printed expression, its torch dtype and the tile axes it varies along ('m', 'n')."""

    code: str
    dtype: torch.dtype
    axes: frozenset = frozenset()
    # for integer values: the same number as a float32 expression over the index vectors, so a
    # (BLOCK_M, BLOCK_N) int->float conversion (a quarter-rate instruction) is never needed;
    # exact while the integers stay below 2**24
    fcode: Optional[str] = None
    # the captured tensor this value was loaded from, as is (a mask_mod's gather source)
    loaded_from: Optional[int] = None


@dataclass
class TensorView:
    """A captured tensor with some leading dims already indexed (not yet loaded)."""

    arg: int
    dims: List[int]  # remaining dims of the original tensor
    offset: str
    mask: Optional[str]
    axes: frozenset
    dtype: torch.dtype


@dataclass
class _Constant:
    """A graph constant not yet used: a literal if the mod created it, else a captured tensor."""

    tensor: torch.Tensor


@dataclass
class _GradBuf:
    """A zero-initialised gradient buffer of a captured tensor plus the scatter-adds into it.

    The joint graph builds a captured tensor's gradient as ``new_zeros(shape)`` followed by
    ``index_put(..., accumulate=True)``; in the kernel each of those becomes an atomic add into
    the gradient buffer, so repeated indices and several reads of one tensor just add up."""

    shape: tuple
    pending: list  # [(index Values, value Value)]


@dataclass
class PrintedMod:
    name: str  # helper function name in the rendered module
    source: str  # the @triton.jit helper
    tensors: List[torch.Tensor] = field(default_factory=list)  # captured tensors, in argument order
    params: List[str] = field(default_factory=list)  # their kernel parameters (pointer, sizes, strides)
    uses_fast_tanh: bool = False
    # score_mod_bwd only: d score = grad * (a factor finite wherever the score is); see joint_graph.py
    linear_grad: bool = False
    # score_mod only: the source also has score_mod_parts / score_mod_row (_SeparablePrinter)
    separable: bool = False
    # mask_mod only: captured tensors whose values index other captured tensors, ascending; each
    # has a trailing parameter {prefix}{i}_nonneg (index_flag_params), 1 where the tensor holds no
    # negative value, so the kernel skips PyTorch's negative-index wrap of its values
    index_sources: List[int] = field(default_factory=list)

    def args_for(self, tensors: List[torch.Tensor]) -> list:
        out: list = []
        for t in tensors:
            out.append(t)
            out.extend(t.shape)
            out.extend(t.stride())
        for i in self.index_sources:
            out.append(nonneg_flag(tensors[i]))
        return out


# id(tensor) -> (weak ref, (version, data_ptr), holds no negative value): one device read per
# in-place version; an entry leaves with its tensor
_NONNEG: Dict[int, tuple] = {}


def nonneg_flag(t: torch.Tensor) -> int:
    """1 if the captured tensor holds no negative value, else 0. Integer arguments equal to 1 are
    constants to Triton, so with 1 the kernel's negative-index wrap of the tensor's values folds
    away (a select per gathered value: 6-12% of the eager document kernels' time on the H200,
    benchmarks/mask_print_probe.py); with 0 the wrap runs. Read once per in-place version of the
    tensor (a device read); where it cannot be read (a CUDA graph capture, tracing), 0."""
    if not t.is_floating_point() and t.dtype != torch.bool and not t.dtype.is_signed:
        return 1  # unsigned
    key = (t._version, t.data_ptr())
    hit = _NONNEG.get(id(t))
    if hit is not None and hit[0]() is t and hit[1] == key:
        return hit[2]
    try:
        if t.device.type == "cuda" and torch.cuda.is_current_stream_capturing():
            return 0
        ok = int(t.numel() == 0 or bool((t >= 0).all()))
    except Exception:  # noqa: BLE001 - a fake or meta tensor while tracing: keep the wrap
        return 0
    i = id(t)
    _NONNEG[i] = (weakref.ref(t, lambda _, i=i: _NONNEG.pop(i, None)), key, ok)
    return ok


def index_flag_params(prefix: str, sources: List[int]) -> List[str]:
    return [f"{prefix}{i}_nonneg" for i in sources]


def mask_index_sources(source: str) -> List[int]:
    """A rendered kernel's mask_mod index flags (PrintedMod.index_sources), for a plan built from
    the source alone (the compiled ops of lowering/kernel_op.py and lowering/decode.py)."""
    return sorted({int(i) for i in re.findall(r"\bMM_CAP(\d+)_nonneg\b", source)})


def _lit(v) -> Value:
    if isinstance(v, bool):
        return Value(repr(v), torch.bool)
    if isinstance(v, int):
        return Value(repr(v), torch.int64)
    if isinstance(v, float):
        if math.isnan(v):
            return Value('float("nan")', torch.float32)
        if math.isinf(v):
            return Value('float("inf")' if v > 0 else 'float("-inf")', torch.float32)
        return Value(repr(v), torch.float32)
    raise TypeError(v)


_BINARY = {
    aten.add.Tensor: "+", aten.add.Scalar: "+", aten.sub.Tensor: "-", aten.sub.Scalar: "-",
    aten.mul.Tensor: "*", aten.mul.Scalar: "*",
    aten.eq.Tensor: "==", aten.eq.Scalar: "==", aten.ne.Tensor: "!=", aten.ne.Scalar: "!=",
    aten.lt.Tensor: "<", aten.lt.Scalar: "<", aten.le.Tensor: "<=", aten.le.Scalar: "<=",
    aten.gt.Tensor: ">", aten.gt.Scalar: ">", aten.ge.Tensor: ">=", aten.ge.Scalar: ">=",
    aten.bitwise_and.Tensor: "&", aten.bitwise_and.Scalar: "&", aten.bitwise_or.Tensor: "|",
    aten.bitwise_or.Scalar: "|", aten.bitwise_xor.Tensor: "^", aten.bitwise_xor.Scalar: "^",
    aten.logical_and.default: "&", aten.logical_or.default: "|", aten.logical_xor.default: "^",
}
_FLOAT_UNARY = {
    aten.exp.default: "tl.exp({})", aten.exp2.default: "tl.exp2({})", aten.log.default: "tl.log({})",
    aten.log2.default: "tl.log2({})", aten.sin.default: "tl.sin({})", aten.cos.default: "tl.cos({})",
    aten.sqrt.default: "tl.sqrt({})", aten.rsqrt.default: "tl.rsqrt({})", aten.sigmoid.default: "tl.sigmoid({})",
    aten.tanh.default: "_tanh({})", aten.floor.default: "tl.floor({})", aten.ceil.default: "tl.ceil({})",
    aten.reciprocal.default: "(1.0 / {})", aten.log1p.default: "_log1p({})",
    aten.expm1.default: "_expm1({})", aten.erf.default: "tl.erf({})",
}
_ALIASES = {
    aten.clone.default, aten.alias.default, aten.detach.default, aten.lift_fresh_copy.default,
    aten.view.default, aten._unsafe_view.default, aten.expand.default, aten.unsqueeze.default,
    aten.squeeze.default, aten.squeeze.dim, aten.reshape.default, aten.contiguous.default,
}
_CONSTANT_LIKE = {
    aten.ones_like.default: 1, aten.zeros_like.default: 0, aten.new_ones.default: 1, aten.new_zeros.default: 0,
}


_SCALE_OPS = (aten.mul.Tensor, aten.mul.Scalar, aten.div.Tensor, aten.div.Scalar)


def _positive_literal(v, nonzero_only: bool = False) -> bool:
    """A finite Python number that can be folded into a positive scale (any nonzero one when
    ``nonzero_only``: it multiplies the scale before the mod, not after the max)."""
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
        return False
    return v != 0 if nonzero_only else v > 0


def _is_float(dt: torch.dtype) -> bool:
    return dt.is_floating_point


def _promote(a: torch.dtype, b: torch.dtype) -> torch.dtype:
    return torch.promote_types(a, b)


class _Printer:
    def __init__(self, gm: torch.fx.GraphModule, kind: str, fn: Callable, prefix: str, fast_tanh: bool):
        self.gm = gm
        self.kind = kind
        self.fn = fn
        self.prefix = prefix
        self.fast_tanh = fast_tanh
        self.lines: List[str] = []
        self.cse: Dict[tuple, str] = {}
        self.env: Dict[torch.fx.Node, object] = {}
        self.tensors: List[torch.Tensor] = []
        self.params: List[str] = []
        self.counter = 0
        self.used_fast_tanh = False
        self.index_sources: List[int] = []  # mask_mod: see PrintedMod.index_sources

    # -- helpers ------------------------------------------------------------------------------
    def fail(self, what: str) -> FlexModError:
        return FlexModError(
            f"{self.kind} '{mod_name(self.fn)}': {what} is not supported by the Triton kernel "
            f"(kernel_options={{'BACKEND': 'MATH'}} runs any mod through the math path)"
        )

    def emit(self, code: str, dtype: torch.dtype, axes) -> Value:
        # Every emitted expression is pure (temps are assigned once, captured tensors are read-only),
        # so a repeat reuses the first temp: traced mods repeat index loads (a document mask loads
        # ids[q_idx] twice), and the repeats cost registers (eager document forward spilled).
        key = (code, dtype, frozenset(axes))
        name = self.cse.get(key)
        if name is None:
            name = self.cse[key] = f"t{self.counter}"
            self.counter += 1
            self.lines.append(f"{name} = {code}")
        return Value(name, dtype, frozenset(axes))

    @staticmethod
    def float_form(v: Value) -> Optional[str]:
        if v.fcode is not None:
            if not TILE_FLOAT_FORM and v.axes == frozenset("mn"):
                return None
            return v.fcode
        if v.dtype in (torch.int32, torch.int64) and v.code.lstrip("-").isdigit() and abs(int(v.code)) < (1 << 24):
            return repr(float(v.code))
        return None

    def as_float(self, v: Value, result_dtype: torch.dtype) -> Value:
        """An int operand of a float op, given by its float form when it has one."""
        if _is_float(result_dtype) and not _is_float(v.dtype) and v.dtype != torch.bool:
            f = self.float_form(v)
            if f is not None and v.axes:
                return Value(f"({f})", torch.float32, v.axes)
        return v

    def int_result(self, code: str, dtype: torch.dtype, axes, fcode: Optional[str]) -> Value:
        v = self.emit(code, dtype, axes)
        v.fcode = fcode if (fcode is not None and not _is_float(dtype) and dtype != torch.bool) else None
        return v

    def val(self, a) -> Value:
        if isinstance(a, torch.fx.Node):
            v = self.env[a]
            if isinstance(v, _Constant):
                v = self.captured(v.tensor)
            if isinstance(v, TensorView):
                return self.load(v)
            return v
        if isinstance(a, (bool, int, float)):
            return _lit(a)
        raise self.fail(f"argument {a!r}")

    def load(self, view: TensorView) -> Value:
        if view.dims:
            raise self.fail("using a captured tensor that is not indexed down to a single element")
        p = self.params_of(view.arg)
        mask = f", mask={view.mask}, other=0" if view.mask else ""
        v = self.emit(f"tl.load({p[0]} + {view.offset}{mask})", view.dtype, view.axes)
        v.loaded_from = view.arg
        return v

    def params_of(self, arg: int) -> List[str]:
        t = self.tensors[arg]
        base = f"{self.prefix}{arg}"
        return [base] + [f"{base}_size{d}" for d in range(t.dim())] + [f"{base}_stride{d}" for d in range(t.dim())]

    def view(self, node) -> object:
        v = self.env[node]
        return self.captured(v.tensor) if isinstance(v, _Constant) else v

    def captured(self, tensor: torch.Tensor) -> TensorView:
        for i, t in enumerate(self.tensors):
            if t is tensor:
                arg = i
                break
        else:
            arg = len(self.tensors)
            self.tensors.append(tensor)
            self.params.extend(self.params_of(arg))
        return TensorView(arg, list(range(tensor.dim())), "0", None, frozenset(), tensor.dtype)

    def index(self, view: TensorView, indices) -> object:
        if len(indices) > len(view.dims):
            raise self.fail("indexing a captured tensor with more indices than it has dims")
        offset, mask, axes = view.offset, view.mask, set(view.axes)
        p = self.params_of(view.arg)
        ndim = self.tensors[view.arg].dim()
        for idx in indices:
            if idx is None:
                raise self.fail("slicing a captured tensor (index with integers only)")
            iv = self.val(idx)
            if _is_float(iv.dtype) or iv.dtype == torch.bool:
                raise self.fail(f"indexing a captured tensor with a {iv.dtype} value")
            d = view.dims[0]
            view = TensorView(view.arg, view.dims[1:], offset, mask, frozenset(axes), view.dtype)
            size, stride = p[1 + d], p[1 + ndim + d]
            if iv.code in ("q_idx", "kv_idx"):  # the kernels' row / column indices are never negative
                ok = f"({iv.code} < {size})"
                mask = ok if mask is None else f"{mask} & {ok}"
                offset = f"{offset} + {iv.code} * {stride}"
                axes |= iv.axes
                continue
            # PyTorch wraps negative indices once; anything still outside [0, size) is masked off.
            # A mask_mod's index read from a captured tensor wraps only where that tensor's flag
            # (PrintedMod.index_sources) says it may hold a negative value
            neg = f"{iv.code} < 0"
            if self.kind == "mask_mod" and iv.loaded_from is not None:
                if iv.loaded_from not in self.index_sources:
                    self.index_sources.append(iv.loaded_from)
                neg = f"({neg}) & ({self.prefix}{iv.loaded_from}_nonneg == 0)"
            wrapped = f"tl.where({neg}, {iv.code} + {size}, {iv.code})"
            if not iv.axes:
                # a (1, 1) tile, not a scalar: Triton's interpreter rejects scalar & tile load masks
                wrapped = f"tl.full([1, 1], 0, tl.int32) + {wrapped}"
            w = self.emit(wrapped, iv.dtype, iv.axes)
            ok = f"(({w.code} >= 0) & ({w.code} < {size}))"
            mask = ok if mask is None else f"{mask} & {ok}"
            offset = f"{offset} + {w.code} * {stride}"
            axes |= iv.axes
        return TensorView(view.arg, view.dims, offset, mask, frozenset(axes), view.dtype)

    # -- captured-tensor gradients (joint graphs) ----------------------------------------------
    def scatter(self, buf: "_GradBuf", indices, values) -> "_GradBuf":
        idx = [self.val(i) for i in indices]
        if isinstance(values, _GradBuf):  # t[i][j]: the inner gradient lands under index i
            return _GradBuf(buf.shape, buf.pending + [(idx + pi, pv) for pi, pv in values.pending])
        return _GradBuf(buf.shape, buf.pending + [(idx, values if isinstance(values, Value) else self.val(values))])

    def index_put(self, node) -> "_GradBuf":
        buf = self.env[node.args[0]]
        accumulate = node.args[3] if len(node.args) > 3 else node.kwargs.get("accumulate", False)
        if not isinstance(buf, _GradBuf) or not accumulate:
            raise self.fail("index_put outside a captured tensor's gradient")
        if any(i is None for i in node.args[1]):
            raise self.fail("the gradient of a sliced captured tensor")
        vals = node.args[2]
        v = self.env[vals] if isinstance(vals, torch.fx.Node) else vals
        if isinstance(v, (_Constant, TensorView)):
            v = self.val(vals)
        return self.scatter(buf, node.args[1], v)

    def atomics(self, arg: int, grad, ptr: str) -> List[str]:
        """Lines that add the gradient of captured tensor ``arg`` (a _GradBuf or a dense 0-d value)
        into the float32 buffer ``ptr`` (contiguous, the tensor's shape)."""
        t = self.tensors[arg]
        p = self.params_of(arg)
        ndim = t.dim()
        sizes = p[1:1 + ndim]
        pending = grad.pending if isinstance(grad, _GradBuf) else [([], grad)]
        lines = []
        for idx, v in pending:
            if len(idx) != ndim:
                raise self.fail("the gradient of a captured tensor read with fewer indices than it has dims")
            offset, mask, axes = "tl.full([1, 1], 0, tl.int32)", None, set()
            for d, iv in enumerate(idx):
                stride = " * ".join(sizes[d + 1:]) or "1"
                w = f"tl.where({iv.code} < 0, {iv.code} + {sizes[d]}, {iv.code})"
                if not iv.axes:  # a (1, 1) tile: the interpreter rejects scalar & tile masks
                    w = f"tl.full([1, 1], 0, tl.int32) + {w}"
                ok = f"(({w}) >= 0) & (({w}) < {sizes[d]})"
                mask = ok if mask is None else f"{mask} & {ok}"
                offset = f"{offset} + ({w}) * ({stride})"
                axes |= set(iv.axes)
            code = f"({v.code}).to(tl.float32)" if v.axes else f"tl.full([1, 1], {v.code}, tl.float32)"
            # every term is linear in grad: where grad is 0 (masked, padded) the term is 0, even if
            # the mod's derivative there is inf (sqrt at 0) and would turn 0 * inf into NaN
            code = f"tl.where(grad != 0.0, {code}, 0.0)"
            # sum over the tile axes the index does not vary along: one atomic per distinct address
            if "n" in v.axes and "n" not in axes:
                code = f"tl.sum({code}, 1)[:, None]"
            if "m" in v.axes and "m" not in axes:
                code = f"tl.sum({code}, 0)[None, :]"
            n = self.counter
            self.counter += 1
            lines.append(f"_gp{n}, _gv{n} = tl.broadcast({ptr} + ({offset}), {code})")
            keep = f"_gv{n} != 0.0" if mask is None else f"({mask}) & (_gv{n} != 0.0)"
            lines.append(f"tl.atomic_add(_gp{n}, _gv{n}, mask={keep}, sem=\"relaxed\")")
        return lines

    # -- main loop ----------------------------------------------------------------------------
    def _bind(self, names: Tuple[str, ...], score: Optional[Value] = None) -> None:
        placeholders = [n for n in self.gm.graph.nodes if n.op == "placeholder"]
        axes_of = {"score": ("m", "n"), "b": (), "h": (), "q_idx": ("m",), "kv_idx": ("n",)}
        for n, name in zip(placeholders, names):
            dt = torch.float32 if name == "score" else torch.int32
            self.env[n] = Value(name, dt, frozenset(axes_of[name]), None if name == "score" else f"{name}.to(tl.float32)")
        if score is not None:
            self.env[placeholders[0]] = score

    def _walk(self, replace: Optional[Dict[torch.fx.Node, Value]] = None):
        """Print every node (those in ``replace`` take the given value) -> the output node's argument."""
        result = None
        for node in self.gm.graph.nodes:
            if node.op == "placeholder":
                continue
            if replace and node in replace:
                self.env[node] = replace[node]
            elif node.op == "get_attr":
                t = getattr(self.gm, node.target)
                if not isinstance(t, torch.Tensor):
                    raise self.fail(f"captured object {type(t).__name__}")
                self.env[node] = _Constant(t)
            elif node.op == "call_function":
                self.env[node] = self.call(node)
            elif node.op == "output":
                (result,) = node.args if not isinstance(node.args[0], (list, tuple)) else (node.args[0],)
                if isinstance(result, (list, tuple)):
                    if len(result) != 1:
                        raise self.fail("returning several values")
                    result = result[0]
            else:
                raise self.fail(f"FX node kind {node.op}")
        return result

    def _scaled_lead(self, score_node) -> Dict[torch.fx.Node, Value]:
        """{the score's only use: score * k or score / k (k > 0): its value from qk, qk_scale} or {}.
        The forward and the backward print it alike, so a kernel calling both computes it once."""
        users = list(score_node.users)
        lead = users[0] if len(users) == 1 else None
        if lead is not None and lead.op == "call_function" and lead.target in _SCALE_OPS:
            a0, a1 = lead.args[:2]
            if lead.target in (aten.mul.Tensor, aten.mul.Scalar) and a1 is score_node:
                a0, a1 = a1, a0
            if a0 is score_node and _positive_literal(a1, nonzero_only=True):
                op = "/" if lead.target in (aten.div.Tensor, aten.div.Scalar) else "*"
                return {lead: self.emit(f"qk * (qk_scale {op} {float(a1)!r})", torch.float32, frozenset("mn"))}
        return {}

    def run_scaled(self) -> str:
        """Body of ``score_mod_scaled(qk, qk_scale, b, h, q_idx, kv_idx, ...)`` returning (s, c) with
        score_mod(qk * qk_scale) == s * c: a leading ``score * k`` or ``score / k`` takes qk_scale
        into its constant (one multiply instead of two), and a trailing ``x * c`` (c > 0) is left to
        the caller, which folds c into its log2(e) factor (softcap: 2 of its 3 extra multiplies)."""
        score_node = next(n for n in self.gm.graph.nodes if n.op == "placeholder")
        mn = frozenset("mn")
        replace = self._scaled_lead(score_node)
        self._bind(("score", "b", "h", "q_idx", "kv_idx"),
                   None if replace else self.emit("qk * qk_scale", torch.float32, mn))
        result = self._walk(replace)
        factor = 1.0
        if isinstance(result, torch.fx.Node) and result.op == "call_function" and result.target in (
                aten.mul.Tensor, aten.mul.Scalar):
            x, c = result.args[:2]
            if not isinstance(x, torch.fx.Node):
                x, c = c, x
            if isinstance(x, torch.fx.Node) and x is not score_node and _positive_literal(c):
                xv = self.val(x)
                if xv.dtype == torch.float32 and xv.axes == mn:
                    result, factor = x, float(c)
        out = self.val(result)
        code = out.code if out.dtype == torch.float32 else f"({out.code}).to(tl.float32)"
        if out.axes != mn:
            code = f"{code} + tl.zeros_like(qk)"
        return "\n".join("    " + l for l in self.lines + [f"return {code}, {factor!r}"])

    def run(self, names: Tuple[str, ...]) -> str:
        self._bind(names)
        result = self._walk()
        out = self.val(result)
        if self.kind == "score_mod":
            code = out.code if out.dtype == torch.float32 else f"({out.code}).to(tl.float32)"
            if out.axes != frozenset("mn"):
                code = f"{code} + tl.zeros_like(score)"
                if out.code[0].isdigit() or out.code.startswith("float"):
                    code = f"tl.full(score.shape, {out.code}, tl.float32)"
        else:
            if out.dtype != torch.bool:
                raise FlexModError(f"mask_mod '{mod_name(self.fn)}' must return a bool tensor, got {out.dtype}")
            code = out.code
            if out.code in ("True", "False"):
                code = f"tl.full([1, 1], {out.code}, tl.int1)"
        body = "\n".join("    " + l for l in self.lines + [f"return {code}"])
        return body

    def run_joint(self, grad_ptrs: Dict[int, str], guard: bool = True, scaled: bool = False
                  ) -> Tuple[str, List[str]]:
        """Print a joint graph (score, b, h, q_idx, kv_idx, grad, *captured) -> (d score, *d captured).
        Returns the body computing d score and the atomic-add lines for the captured gradients.
        ``guard``: d score is 0 wherever grad is, even where the derivative is not finite.
        ``scaled``: the score arrives as (qk, qk_scale), as in score_mod_scaled (run_scaled)."""
        placeholders = [n for n in self.gm.graph.nodes if n.op == "placeholder"]
        names = ("score", "b", "h", "q_idx", "kv_idx", "grad")
        axes_of = {"score": ("m", "n"), "b": (), "h": (), "q_idx": ("m",), "kv_idx": ("n",), "grad": ("m", "n")}
        for n, name in zip(placeholders, names):
            dt = torch.float32 if name in ("score", "grad") else torch.int32
            fcode = None if name in ("score", "grad") else f"{name}.to(tl.float32)"
            self.env[n] = Value(name, dt, frozenset(axes_of[name]), fcode)
        for i, n in enumerate(placeholders[len(names):]):
            self.env[n] = self.captured(self.tensors[i])
        replace = self._scaled_lead(placeholders[0]) if scaled else {}
        if scaled and not replace:
            self.env[placeholders[0]] = self.emit("qk * qk_scale", torch.float32, frozenset("mn"))
        outs = None
        for node in self.gm.graph.nodes:
            if node.op == "placeholder":
                continue
            if node in replace:
                self.env[node] = replace[node]
            elif node.op == "get_attr":
                self.env[node] = _Constant(getattr(self.gm, node.target))
            elif node.op == "call_function":
                self.env[node] = self.call(node)
            elif node.op == "output":
                outs = list(node.args[0])
            else:
                raise self.fail(f"FX node kind {node.op}")
        d_score = outs[0]
        if d_score is None:
            code = "tl.zeros_like(score)"
        else:
            v = self.val(d_score)
            code = v.code if v.dtype == torch.float32 else f"({v.code}).to(tl.float32)"
            if v.axes != frozenset("mn"):
                code = f"({code}) + tl.zeros_like(score)"
        atomics: List[str] = []
        for i, g in enumerate(outs[1:]):
            if g is None or i not in grad_ptrs:
                continue
            gv = self.env[g] if isinstance(g, torch.fx.Node) else g
            if not isinstance(gv, _GradBuf):
                gv = self.val(g)
            atomics += self.atomics(i, gv, grad_ptrs[i])
        if guard:
            code = f"tl.where(grad != 0.0, {code}, 0.0)"
        return "\n".join("    " + l for l in self.lines) + f"\n    d_score = {code}", atomics

    def call(self, node: torch.fx.Node):
        f = node.target
        base = getattr(getattr(f, "overloadpacket", None), "__name__", "")
        if base.endswith("_") and not base.startswith("_") and node.args and isinstance(node.args[0], torch.fx.Node):
            # an in-place op (autograd formulas use a few): print the functional op, and later reads
            # of the mutated value see the result
            functional = getattr(getattr(aten, base[:-1], None), f._overloadname, None)
            if functional is None:
                raise self.fail(f"operator {f}")
            node.target = functional
            try:
                out = self.call(node)
            finally:
                node.target = f
            self.env[node.args[0]] = out
            return out
        args, kw = node.args, node.kwargs
        out_dt = node.meta["val"].dtype if "val" in node.meta else None
        if f is aten.lift_fresh_copy.default and isinstance(self.env[args[0]], _Constant):
            # torch.tensor(x) written inside the mod: a literal, not a kernel argument
            t = self.env[args[0]].tensor
            if t.numel() != 1:
                raise self.fail("creating a non-scalar tensor inside the mod")
            return Value(_lit(t.item()).code, t.dtype)
        if f is aten.index.Tensor:
            base = self.view(args[0])
            if not isinstance(base, TensorView):
                raise self.fail("indexing a tensor that was not captured from outside the mod")
            return self.index(base, list(args[1]))
        if f is aten.select.int:
            base = self.view(args[0])
            if not isinstance(base, TensorView) or args[1] not in (0, -len(base.dims)):
                raise self.fail("select on a non-leading dim")
            return self.index(base, [args[2]])
        if f in _ALIASES:
            src = self.env[args[0]]
            if isinstance(src, _Constant):
                src = self.captured(src.tensor)
            if isinstance(src, TensorView):
                if f in (aten.clone.default, aten.alias.default, aten.detach.default, aten.lift_fresh_copy.default):
                    return src
                if src.dims:
                    raise self.fail(f"{f} on a captured tensor")
            return src
        if f is aten._to_copy.default or f is aten.to.dtype:
            v = self.val(args[0])
            dt = kw.get("dtype", out_dt) or v.dtype
            if dt == v.dtype:
                return v
            if dt not in TL_DTYPES:
                raise self.fail(f"cast to {dt}")
            if v.dtype == torch.bool or dt == torch.bool:
                code = f"({v.code} != 0)" if dt == torch.bool else f"{v.code}.to({TL_DTYPES[dt]})"
            elif dt == torch.float32 and self.float_form(v) is not None and v.axes == frozenset("mn"):
                code = self.float_form(v)  # converts the index vectors, not the tile
            else:
                code = f"{v.code}.to({TL_DTYPES[dt]})"
            if not _is_float(dt) and dt != torch.bool and self.float_form(v) is not None:
                return self.int_result(code, dt, v.axes, self.float_form(v))
            return self.emit(code, dt, v.axes)
        if f in (aten.scalar_tensor.default, aten.full.default, aten.full_like.default, aten.new_full.default):
            value = args[0] if f is aten.scalar_tensor.default else args[1]
            if f is aten.full.default and list(args[0]) != []:
                raise self.fail("torch.full with a non-scalar shape")
            dt = out_dt or torch.float32
            lit = _lit(bool(value) if dt == torch.bool else (float(value) if dt.is_floating_point else int(value)))
            return Value(lit.code, dt)
        if f in (aten.new_zeros.default, aten.zeros.default) and list(args[1] if f is aten.new_zeros.default else args[0]):
            return _GradBuf(tuple(args[1] if f is aten.new_zeros.default else args[0]), [])
        if f in (aten.index_put.default, aten.index_put_.default, aten._index_put_impl_.default):
            return self.index_put(node)
        if f is aten.select_backward.default:
            g, sizes, dim, index = args[:4]
            if dim != 0:
                raise self.fail("the gradient of select on a non-leading dim")
            return self.scatter(_GradBuf(tuple(sizes), []), [index], self.env[g] if isinstance(g, torch.fx.Node) else g)
        if f is aten.add.Tensor and any(isinstance(self.env.get(a), _GradBuf) for a in args[:2] if isinstance(a, torch.fx.Node)):
            a, b = (self.env.get(x) for x in args[:2])
            if not (isinstance(a, _GradBuf) and isinstance(b, _GradBuf)):
                raise self.fail("adding a dense value to a captured tensor's gradient")
            return _GradBuf(a.shape, a.pending + b.pending)
        if f is aten.tanh_backward.default:
            g, y = self.val(args[0]), self.val(args[1])
            return self.emit(f"{g.code} * (1.0 - {y.code} * {y.code})", torch.float32, g.axes | y.axes)
        if f is aten.sigmoid_backward.default:
            g, y = self.val(args[0]), self.val(args[1])
            return self.emit(f"{g.code} * {y.code} * (1.0 - {y.code})", torch.float32, g.axes | y.axes)
        if f is aten.threshold_backward.default:
            g, x, thr = self.val(args[0]), self.val(args[1]), self.val(args[2])
            return self.emit(f"tl.where({x.code} <= {thr.code}, 0.0, {g.code})", g.dtype, g.axes | x.axes)
        if f in _CONSTANT_LIKE:
            dt = out_dt or torch.float32
            v = _CONSTANT_LIKE[f]
            lit = _lit(bool(v) if dt == torch.bool else (float(v) if dt.is_floating_point else v))
            return Value(lit.code, dt)
        if f in _BINARY:
            a, b = self.val(args[0]), self.val(args[1])
            op = _BINARY[f]
            if f in (aten.add.Tensor, aten.sub.Tensor) and kw.get("alpha", 1) != 1:
                b = Value(f"({b.code} * {kw['alpha']!r})", b.dtype, b.axes)
            dt = out_dt or _promote(a.dtype, b.dtype)
            fa, fb = self.float_form(a), self.float_form(b)
            if not _is_float(dt) and op in "+-" and fa is not None and fb is not None:
                return self.int_result(f"{a.code} {op} {b.code}", dt, a.axes | b.axes, f"({fa} {op} {fb})")
            if not _is_float(dt) and op == "*" and fa is not None and fb is not None and (
                    not a.axes or not b.axes) and (a.code.lstrip("-").isdigit() or b.code.lstrip("-").isdigit()):
                return self.int_result(f"{a.code} {op} {b.code}", dt, a.axes | b.axes, f"({fa} {op} {fb})")
            a, b = self.as_float(a, dt), self.as_float(b, dt)
            return self.emit(f"{a.code} {op} {b.code}", dt, a.axes | b.axes)
        if f in (aten.rsub.Scalar, aten.rsub.Tensor):
            a, b = self.val(args[0]), self.val(args[1])
            dt = out_dt or a.dtype
            fa, fb = self.float_form(a), self.float_form(b)
            if not _is_float(dt) and fa is not None and fb is not None:
                return self.int_result(f"{b.code} - {a.code}", dt, a.axes | b.axes, f"({fb} - {fa})")
            a, b = self.as_float(a, dt), self.as_float(b, dt)
            return self.emit(f"{b.code} - {a.code}", dt, a.axes | b.axes)
        if f in (aten.div.Tensor, aten.div.Scalar):
            a, b = self.val(args[0]), self.val(args[1])
            num = a.code if _is_float(a.dtype) or _is_float(b.dtype) else f"{a.code}.to(tl.float32)"
            return self.emit(f"{num} / {b.code}", out_dt or torch.float32, a.axes | b.axes)
        if f in (aten.div.Tensor_mode, aten.div.Scalar_mode, aten.floor_divide.default, aten.floor_divide.Scalar):
            a, b = self.val(args[0]), self.val(args[1])
            mode = kw.get("rounding_mode", args[2] if len(args) > 2 else "floor")
            if f in (aten.floor_divide.default, aten.floor_divide.Scalar):
                mode = "floor"
            dt = out_dt or _promote(a.dtype, b.dtype)
            if _is_float(dt):
                inner = f"{a.code} / {b.code}"
                code = f"tl.floor({inner})" if mode == "floor" else (
                    f"tl.where({inner} < 0, tl.ceil({inner}), tl.floor({inner}))" if mode == "trunc" else inner)
            elif mode == "floor":
                code = f"_floordiv({a.code}, {b.code})"
            elif mode == "trunc":
                q = f"_floordiv({a.code}, {b.code})"
                code = f"tl.where(({a.code} % {b.code} != 0) & (({a.code} < 0) != ({b.code} < 0)), {q} + 1, {q})"
            else:
                raise self.fail(f"division rounding mode {mode!r}")
            return self.emit(code, dt, a.axes | b.axes)
        if f in (aten.remainder.Tensor, aten.remainder.Scalar):
            a, b = self.val(args[0]), self.val(args[1])
            dt = out_dt or _promote(a.dtype, b.dtype)
            if _is_float(dt):
                code = f"{a.code} - tl.floor({a.code} / {b.code}) * {b.code}"
            else:
                code = f"_pymod({a.code}, {b.code})"
            return self.emit(code, dt, a.axes | b.axes)
        if f in _FLOAT_UNARY:
            a = self.val(args[0])
            x = a.code if _is_float(a.dtype) else f"{a.code}.to(tl.float32)"
            tmpl = _FLOAT_UNARY[f]
            if f is aten.tanh.default and self.fast_tanh:
                tmpl = "_tanh_approx({})"
                self.used_fast_tanh = True
            dt = out_dt or torch.float32
            return self.emit(tmpl.format(x), dt, a.axes)
        if f is aten.abs.default:
            a = self.val(args[0])
            fa = self.float_form(a)
            if fa is not None and not _is_float(a.dtype):
                return self.int_result(f"tl.abs({a.code})", a.dtype, a.axes, f"tl.abs({fa})")
            return self.emit(f"tl.abs({a.code})", a.dtype, a.axes)
        if f is aten.neg.default:
            a = self.val(args[0])
            fa = self.float_form(a)
            if fa is not None and not _is_float(a.dtype):
                return self.int_result(f"-{a.code}", a.dtype, a.axes, f"(-{fa})")
            return self.emit(f"-{a.code}", a.dtype, a.axes)
        if f in (aten.bitwise_not.default, aten.logical_not.default):
            a = self.val(args[0])
            if a.dtype == torch.bool or f is aten.logical_not.default:
                return self.emit(f"{a.code} == 0", torch.bool, a.axes)
            return self.emit(f"~{a.code}", a.dtype, a.axes)
        if f in (aten.where.self, aten.where.ScalarOther, aten.where.ScalarSelf, aten.where.Scalar):
            c, a, b = self.val(args[0]), self.val(args[1]), self.val(args[2])
            dt = out_dt or _promote(a.dtype, b.dtype)
            return self.emit(f"tl.where({c.code}, {a.code}, {b.code})", dt, c.axes | a.axes | b.axes)
        if f is aten.masked_fill.Scalar or f is aten.masked_fill.Tensor:
            x, m, v = self.val(args[0]), self.val(args[1]), self.val(args[2])
            return self.emit(f"tl.where({m.code}, {v.code}, {x.code})", x.dtype, x.axes | m.axes | v.axes)
        if f in (aten.minimum.default, aten.maximum.default, aten.min.other, aten.max.other, aten.fmin.default, aten.fmax.default):
            a, b = self.val(args[0]), self.val(args[1])
            fn = "tl.minimum" if f in (aten.minimum.default, aten.min.other, aten.fmin.default) else "tl.maximum"
            return self.emit(f"{fn}({a.code}, {b.code})", out_dt or _promote(a.dtype, b.dtype), a.axes | b.axes)
        if f in (aten.clamp.default, aten.clamp.Tensor, aten.clamp_min.default, aten.clamp_max.default):
            x = self.val(args[0])
            lo = hi = None
            if f in (aten.clamp.default, aten.clamp.Tensor):
                lo = args[1] if len(args) > 1 else kw.get("min")
                hi = args[2] if len(args) > 2 else kw.get("max")
            elif f is aten.clamp_min.default:
                lo = args[1]
            else:
                hi = args[1]
            code, axes = x.code, set(x.axes)
            if lo is not None:
                lv = self.val(lo)
                code, axes = f"tl.maximum({code}, {lv.code})", axes | lv.axes
            if hi is not None:
                hv = self.val(hi)
                code, axes = f"tl.minimum({code}, {hv.code})", axes | hv.axes
            return self.emit(code, out_dt or x.dtype, axes)
        if f in (aten.pow.Tensor_Scalar, aten.pow.Tensor_Tensor, aten.pow.Scalar):
            a, b = self.val(args[0]), self.val(args[1])
            dt = out_dt or _promote(a.dtype, b.dtype)
            if f is aten.pow.Tensor_Scalar and isinstance(args[1], int) and not isinstance(args[1], bool) and 0 <= args[1] <= 8:
                if args[1] == 0:
                    return self.emit(f"tl.full([1, 1], 1, {TL_DTYPES[dt]})", dt, ())
                return self.emit(" * ".join([a.code] * args[1]), dt, a.axes)
            if f is aten.pow.Tensor_Scalar and args[1] == 0.5:
                return self.emit(f"tl.sqrt({a.code})", dt, a.axes)
            if not _is_float(dt):
                raise self.fail("integer pow with a non-literal or large exponent")
            if f is aten.pow.Tensor_Scalar and isinstance(args[1], float) and args[1].is_integer() and 0 <= args[1] <= 8:
                # autograd's pow backward writes x ** (n - 1.0): still a product, right for x < 0
                if args[1] == 0:
                    return self.emit(f"tl.full([1, 1], 1, {TL_DTYPES[dt]})", dt, ())
                return self.emit(" * ".join([a.code] * int(args[1])), dt, a.axes)
            base = a.code if _is_float(a.dtype) else f"{a.code}.to(tl.float32)"
            if not isinstance(args[0], torch.fx.Node):
                base = f"tl.full([1, 1], {float(args[0])!r}, tl.float32)"
            if isinstance(args[1], torch.fx.Node):
                y = b.code if _is_float(b.dtype) else f"{b.code}.to(tl.float32)"
                return self.emit(f"_pow({base}, {y})", dt, a.axes | b.axes)
            y = float(args[1])
            if not y.is_integer():  # log2 of a negative base is NaN, as torch.pow gives
                return self.emit(f"tl.exp2(tl.log2({base}) * {y!r})", dt, a.axes)
            r = self.emit(f"tl.exp2(tl.log2(tl.abs({base})) * {y!r})", dt, a.axes)
            if int(y) % 2 == 0:
                return r
            return self.emit(f"tl.where({base} < 0, -{r.code}, {r.code})", dt, a.axes)
        if f is aten.square.default:
            a = self.val(args[0])
            return self.emit(f"{a.code} * {a.code}", a.dtype, a.axes)
        if f in (aten.sign.default, aten.sgn.default):
            a = self.val(args[0])
            return self.emit(f"tl.where({a.code} > 0, 1, tl.where({a.code} < 0, -1, 0)).to({TL_DTYPES[a.dtype]})", a.dtype, a.axes)
        raise self.fail(f"operator {f}")


def _trace(fn: Callable, kind: str, score_dtype: torch.dtype, device) -> torch.fx.GraphModule:
    idx = [torch.zeros((), dtype=torch.int32, device=device) for _ in range(4)]
    args = ([torch.zeros((), dtype=score_dtype, device=device)] if kind == "score_mod" else []) + idx

    # FX reads the traced function's arity from its code object: a bound method's counts self, a
    # callable object's is its __call__'s, so the mod is traced through a plain function
    if kind == "score_mod":
        def mod(score, b, h, q_idx, kv_idx):
            return fn(score, b, h, q_idx, kv_idx)
    else:
        def mod(b, h, q_idx, kv_idx):
            return fn(b, h, q_idx, kv_idx)

    try:
        with TensorIndexMode():
            return make_fx(mod, tracing_mode="real")(*args)
    except FlexModError:
        raise
    except Exception as e:  # noqa: BLE001
        raise explain_mod_error(fn, kind, e) from e


def print_mod(fn: Callable, kind: str, device, fast_tanh: bool = False) -> PrintedMod:
    """Trace ``fn`` and print it as a Triton helper named after ``kind``."""
    gm = _trace(fn, kind, torch.float32, device)
    prefix = "SM_CAP" if kind == "score_mod" else "MM_CAP"
    p = _Printer(gm, kind, fn, prefix, fast_tanh)
    names = ("score", "b", "h", "q_idx", "kv_idx") if kind == "score_mod" else ("b", "h", "q_idx", "kv_idx")
    body = p.run(names)
    sources = sorted(p.index_sources)
    flags = index_flag_params(p.prefix, sources)
    params = ", ".join(list(names) + p.params + flags)
    source = f"@triton.jit\ndef {kind}({params}):\n    # {mod_name(fn)}\n{body}\n"
    separable = False
    if kind == "score_mod":
        source += _print_scaled(gm, fn, fast_tanh, p.params)
        parts = _print_separable(gm, fn, fast_tanh, p.params)
        source += parts
        separable = bool(parts)
    for t in p.tensors:
        if t.device.type != torch.device(device).type:
            raise FlexModError(
                f"{kind} '{mod_name(fn)}' captures a tensor on {t.device} but the inputs are on {device}; "
                f"move the captured tensor to {device}"
            )
    return PrintedMod(kind, source, p.tensors, p.params + flags, p.used_fast_tanh, separable=separable,
                      index_sources=sources)


def _print_scaled(gm, fn: Callable, fast_tanh: bool, params: List[str]) -> str:
    """``score_mod_scaled(qk, qk_scale, ...) -> (s, c)``, s * c == score_mod(qk * qk_scale): the
    forward template's call, with scale constants folded (_Printer.run_scaled); the plain call
    where the fold's parameters would differ."""
    p = _Printer(gm, "score_mod", fn, "SM_CAP", fast_tanh)
    body = p.run_scaled()
    if p.params != params:
        args = ", ".join(["b", "h", "q_idx", "kv_idx"] + params)
        body = f"    return score_mod(qk * qk_scale, {args}), 1.0"
    head = ", ".join(["qk", "qk_scale", "b", "h", "q_idx", "kv_idx"] + params)
    return f"\n\n@triton.jit\ndef score_mod_scaled({head}):\n{body}\n"


# How an integer value varying along both tile axes (ALiBi's kv_idx - q_idx) enters float
# arithmetic. False: as the integer tile, converted per score (an integer subtract and a convert,
# off the float pipe, as Inductor's lowering prints it). True: as the float forms of its index
# vectors (kv_idx.to(f32) - q_idx.to(f32): converts per row / column, then a float subtract per
# score). The float pipe is what the softmax saturates: the warp-specialized ALiBi forward ran at
# 490-493 TFLOP/s with False against 411-457 with True (H100, benchmarks/alibi_ws_probe.py).
TILE_FLOAT_FORM = False

_AFFINE_PASS = {aten._to_copy.default, aten.to.dtype, prims.convert_element_type.default} | _ALIASES


class _SeparablePrinter(_Printer):
    """Finds whether a score_mod is c * score + n(kv) + m(q): c constant over the tile (a number,
    or a function of b and h), n varying only along the keys and m only along the queries. Each
    value is tracked as such a sum of printed parts (codes; None for zero) while the mod prints."""

    def __init__(self, *args):
        super().__init__(*args)
        self.parts: Dict[torch.fx.Node, Optional[tuple]] = {}

    def _float(self, v: Value) -> str:
        if _is_float(v.dtype):
            return v.code
        return self.float_form(v) or f"({v.code}).to(tl.float32)"

    def part_of(self, a) -> Optional[tuple]:
        """(c, n, m) codes of an argument, or None when it varies along both axes inseparably."""
        if isinstance(a, (int, float)) and not isinstance(a, bool):
            return (None, repr(float(a)), None)
        if not isinstance(a, torch.fx.Node):
            return None
        if a in self.parts:
            return self.parts[a]
        v = self.env.get(a)
        if isinstance(v, (_Constant, TensorView)):
            v = self.val(a)
        if not isinstance(v, Value) or v.dtype == torch.bool:
            return None
        if "m" not in v.axes:
            return (None, self._float(v), None)
        if "n" not in v.axes:
            return (None, None, self._float(v))
        return None

    def _combine(self, x: Optional[str], y: Optional[str], op: str, axes) -> Optional[str]:
        if y is None:
            return x
        if x is None:
            return y if op == "+" else self.emit(f"-{y}", torch.float32, axes).code
        return self.emit(f"{x} {op} {y}", torch.float32, axes).code

    def _scaled(self, part: tuple, k: str, op: str) -> tuple:
        axes = ((), frozenset("n"), frozenset("m"))
        return tuple(None if x is None else self.emit(f"{x} {op} {k}", torch.float32, ax).code
                     for x, ax in zip(part, axes))

    def affine(self, node: torch.fx.Node, out) -> Optional[tuple]:
        if not isinstance(out, Value) or out.dtype == torch.bool:
            return None
        if out.axes != frozenset("mn"):
            return None  # a low-rank value: part_of reads it from its axes
        f, args, kw = node.target, node.args, node.kwargs
        if f in _AFFINE_PASS:
            # views and casts to float32 keep the value; a cast to an integer or 16-bit type does not
            return self.part_of(args[0]) if out.dtype == torch.float32 else None
        if f in (aten.add.Tensor, aten.add.Scalar, aten.sub.Tensor, aten.sub.Scalar) and kw.get("alpha", 1) == 1:
            a, b = self.part_of(args[0]), self.part_of(args[1])
            if a is None or b is None:
                return None
            op = "+" if f in (aten.add.Tensor, aten.add.Scalar) else "-"
            return tuple(self._combine(x, y, op, ax) for x, y, ax in
                         zip(a, b, ((), frozenset("n"), frozenset("m"))))
        if f is aten.neg.default:
            a = self.part_of(args[0])
            return None if a is None else self._scaled(a, "-1.0", "*")
        if f in (aten.mul.Tensor, aten.mul.Scalar, aten.div.Tensor, aten.div.Scalar):
            a, b = self.part_of(args[0]), self.part_of(args[1])
            if a is None or b is None:
                return None
            def scalar(x, arg):  # a factor constant over the tile (no score, no index)
                if x[0] is not None or x[2] is not None:
                    return None
                v = self.env.get(arg) if isinstance(arg, torch.fx.Node) else None
                return x[1] if v is None or not getattr(v, "axes", True) else None
            div = f in (aten.div.Tensor, aten.div.Scalar)
            k = scalar(b, args[1])
            if k is not None:
                return self._scaled(a, k, "/" if div else "*")
            k = scalar(a, args[0])
            if k is not None and not div:
                return self._scaled(b, k, "*")
        return None

    def call(self, node: torch.fx.Node):
        out = super().call(node)
        part = self.affine(node, out)
        if part is not None:
            self.parts[node] = part
        return out

    def run_parts(self) -> Optional[Tuple[str, str]]:
        """(score_mod_parts body, score_mod_row body), or None when the mod is not separable."""
        self._bind(("score", "b", "h", "q_idx", "kv_idx"))
        score = next(n for n in self.gm.graph.nodes if n.op == "placeholder")
        self.parts[score] = ("1.0", None, None)
        result = self._walk()
        part = self.part_of(result) if isinstance(result, torch.fx.Node) else None
        if part is None:
            return None
        c, n, m = part
        key = self._slice([f"return {c or '0.0'} * qk_scale, {n or '0.0'}"], forbid=("score", "q_idx"))
        row = self._slice([f"return {m or '0.0'}"], forbid=("score", "kv_idx"))
        if key is None or row is None:
            return None
        return key, row

    def _slice(self, tail: List[str], forbid: Tuple[str, ...]) -> Optional[str]:
        """The printed lines the tail needs (temps are assigned once), or None if they read a name
        the helper does not have."""
        need = set(re.findall(r"\bt\d+\b", tail[0]))
        keep = []
        for line in reversed(self.lines):
            name = line.split(" = ", 1)[0]
            if name in need:
                keep.append(line)
                need |= set(re.findall(r"\bt\d+\b", line.split(" = ", 1)[1]))
        body = list(reversed(keep)) + tail
        text = "\n".join(body)
        if any(re.search(rf"\b{w}\b", text) for w in forbid):
            return None
        return "\n".join("    " + l for l in body)


def _print_separable(gm, fn: Callable, fast_tanh: bool, params: List[str]) -> str:
    """``score_mod_parts(qk_scale, b, h, kv_idx, ...) -> (a, key_bias)`` and
    ``score_mod_row(b, h, q_idx, ...) -> row_bias`` when score_mod(qk * qk_scale) is
    a * qk + key_bias + row_bias (the templates' SEPARABLE path: a row's constant row_bias never
    enters the tile); "" otherwise."""
    p = _SeparablePrinter(gm, "score_mod", fn, "SM_CAP", fast_tanh)
    try:
        bodies = p.run_parts()
    except Exception:  # noqa: BLE001 - an optimization: a mod it cannot analyse prints as before
        return ""
    if bodies is None or p.params != params:
        return ""
    caps = "".join(", " + x for x in params)
    return (f"\n\n@triton.jit\ndef score_mod_parts(qk_scale, b, h, kv_idx{caps}):\n{bodies[0]}\n"
            f"\n\n@triton.jit\ndef score_mod_row(b, h, q_idx{caps}):\n{bodies[1]}\n")


class _WithCaptured(torch.fx.Interpreter):
    """Runs a traced mod with its captured tensors swapped for the given stand-ins."""

    def __init__(self, gm, pairs):
        super().__init__(gm)
        self.pairs = pairs

    def get_attr(self, target, args, kwargs):
        t = super().get_attr(target, args, kwargs)
        for orig, new in self.pairs:
            if t is orig:
                return new
        return t


def print_score_mod_backward(fn: Callable, fwd: PrintedMod, device, grad_caps: Tuple[bool, ...],
                             fast_tanh: bool = False) -> PrintedMod:
    """Print the joint graph of a score_mod as
    ``score_mod_bwd_scaled(qk, qk_scale, b, h, q_idx, kv_idx, grad, ...)`` (score = qk * qk_scale):
    it returns grad · d score_mod / d score and, when ACCUMULATE_CAPS, atomically adds
    grad · d score_mod / d captured[i] into SM_GRAD{i} for every captured tensor with grad_caps[i]."""
    gm = _trace(fn, "score_mod", torch.float32, device)
    caps = list(fwd.tensors)

    def joint(score, b, h, q_idx, kv_idx, grad, *leaves):
        out = _WithCaptured(gm, list(zip(caps, leaves))).run(score, b, h, q_idx, kv_idx)
        wrt = [score] + [l for l, need in zip(leaves, grad_caps) if need]
        got = list(torch.autograd.grad(out, wrt, grad, allow_unused=True))
        res, it = [got[0]], iter(got[1:])
        res += [next(it) if need else None for need in grad_caps]
        return tuple(res)

    idx = [torch.zeros((), dtype=torch.int32, device=device) for _ in range(4)]
    leaves = [c.detach().requires_grad_(need) for c, need in zip(caps, grad_caps)]
    score = torch.zeros((), device=device, requires_grad=True)
    try:
        with torch.enable_grad():
            jg = make_fx(joint, tracing_mode="real")(score, *idx, torch.ones((), device=device), *leaves)
    except Exception as e:  # noqa: BLE001
        raise FlexModError(f"score_mod '{mod_name(fn)}': its gradient could not be traced ({e})") from e
    jg.graph.eliminate_dead_code()
    jg.recompile()
    jg = fold_constant_factors(jg)
    p = _Printer(jg, "score_mod", fn, "SM_CAP", fast_tanh)
    for c in caps:
        p.captured(c)
    ptrs = {i: f"SM_GRAD{i}" for i, need in enumerate(grad_caps) if need}
    bounded = derivative_is_bounded(jg)
    # the kernels call it from (qk, qk_scale) as the forward's score_mod_scaled: the same leading
    # multiply, so a kernel computes it (and what follows, softcap's tanh) once for both
    body, atomics = p.run_joint(ptrs, guard=not bounded, scaled=True)
    params = ", ".join(["qk", "qk_scale", "b", "h", "q_idx", "kv_idx", "grad"] + p.params + list(ptrs.values())
                       + ["ACCUMULATE_CAPS: tl.constexpr"])
    acc = ""
    if atomics:
        acc = "\n    if ACCUMULATE_CAPS:\n" + "\n".join("        " + l for l in atomics)
    source = (f"@triton.jit\ndef score_mod_bwd_scaled({params}):\n"
              f"    # d/d score and d/d captured of {mod_name(fn)}, score = qk * qk_scale\n"
              f"{body}{acc}\n    return d_score\n")
    if len(p.tensors) != len(caps):
        raise p.fail("a captured tensor that only its gradient reads")
    return PrintedMod("score_mod_bwd", source, caps, p.params + list(ptrs.values()), p.used_fast_tanh, bounded)


_IDENTITY: Dict[str, PrintedMod] = {}


def identity_mod(kind: str) -> PrintedMod:
    if kind not in _IDENTITY:
        _IDENTITY[kind] = _identity_mod(kind)
    return _IDENTITY[kind]


def _identity_mod(kind: str) -> PrintedMod:
    if kind == "score_mod":
        src = ("@triton.jit\ndef score_mod(score, b, h, q_idx, kv_idx):\n    return score\n\n\n"
               "@triton.jit\ndef score_mod_scaled(qk, qk_scale, b, h, q_idx, kv_idx):\n    return qk * qk_scale, 1.0\n")
    else:
        src = "@triton.jit\ndef mask_mod(b, h, q_idx, kv_idx):\n    return tl.full([1, 1], True, tl.int1)\n"
    return PrintedMod(kind, src)
