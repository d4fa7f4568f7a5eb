"""When the eager forward runs the hand-scheduled Gluon kernel (templates/flex_forward_gluon.py), and
how it is launched.

The kernel serves two masks, none (dense) and causal, the calls cuDNN and FlashAttention-3 are
measured on, with any score_mod the FX printer's output can be written in Gluon for and that captures no
tensor (gluon_dialect, CAPTURED_OK: softcap, ALiBi, ...), for 16-bit inputs with head dim 64 or 128, equal query
and key lengths that are multiples of 128, on a Hopper GPU whose Triton has Gluon's warp
specialization, from the lengths where it measured faster than the template (MIN_LEN; any length
with kernel_options GLUON=True). Every other call, and any call with GLUON=False or a pinned tile
config, takes the Jinja template as before.

Its one hook, score_hook, is filled like the templates' in eager mode: the printed score_mod (Triton
source) is rewritten into Gluon and put into a copy of the kernel's module (hooked_source).

A BlockMask counts as causal when its blocks are 128 x 128, its partial blocks are exactly the
diagonal, its full blocks exactly the blocks below it, and its mask_mod on the diagonal blocks is
q >= kv for every (batch, head) of the call: then the template would compute the same thing, and
this kernel does so with the diagonal masked by q >= kv and the rest unmasked.
"""
from __future__ import annotations

import math
import re
from typing import Optional

import torch

from . import compat

TILE = 128
# mask_mod evaluations spent recognising a causal BlockMask, at most (batch x heads x S x 128)
_MAX_CHECK = 1 << 28


def available(device: torch.device) -> bool:
    return device.type == "cuda" and compat.gluon_hopper_ready() and torch.cuda.get_device_capability(device)[0] == 9


def is_causal_block_mask(block_mask, B: int, Hq: int, S: int) -> bool:
    """Whether the kernel's causal mode computes exactly what this BlockMask asks for (module doc)."""
    from .mods import eval_mask_blocks

    if tuple(block_mask.BLOCK_SIZE) != (TILE, TILE) or tuple(block_mask.seq_lengths) != (S, S):
        return False
    if block_mask.full_kv_num_blocks is None:
        return False
    n = S // TILE
    dev = block_mask.kv_num_blocks.device
    i = torch.arange(n, device=dev)
    num, idx = block_mask.kv_num_blocks, block_mask.kv_indices
    fnum, fidx = block_mask.full_kv_num_blocks, block_mask.full_kv_indices
    if num.shape[-1] != n or fnum.shape[-1] != n:
        return False
    if not (bool((num == 1).all()) and bool((idx[..., :n, 0] == i).all()) and bool((fnum == i).all())):
        return False
    below = i[None, :] < i[:, None]  # (row, slot): slot j < row i holds block j
    if not bool(((fidx[..., :n, :n] == i[None, :]) | ~below).all()):
        return False
    if B * Hq * S * TILE > _MAX_CHECK:
        return False
    b = torch.arange(B, device=dev).repeat_interleave(Hq * n)
    h = torch.arange(Hq, device=dev).repeat_interleave(n).repeat(B)
    blk = i.repeat(B * Hq)
    q = blk[:, None] * TILE + torch.arange(TILE, device=dev)[None, :]
    got = eval_mask_blocks(block_mask.mask_mod, b, h, q, q)
    want = torch.ones(TILE, TILE, dtype=torch.bool, device=dev).tril()
    return bool((got == want).all())


# by default the kernel runs from these lengths on (head dim -> L), where it measured faster than the
# template (H200, bf16, H=16, B*L = 16384: D=128 from L=1024, 1.27x / 1.17x noop / causal; D=64
# slower at L=1024, 0.92x / 0.83x, faster from L=4096, 1.07x / 1.05x; results/h200_2026-11-29_gluon_probe.json).
# kernel_options GLUON=True runs it at any length it serves
MIN_LEN = {64: 4096, 128: 1024}
# with a score_mod (H200, bf16, H=16, gluon_fwd_probe.py, results/h200_2026-11-29_gluon_score_probe*.json):
# D=128 softcap / causal softcap / ALiBi at L=4096 1.17x / 1.09x / 1.03x the template, at L=16384
# 1.20x / 1.13x / 1.08x, at L=1024 0.96x / 0.68x / 0.84x; D=64 at L=4096 0.88x / 0.98x / 0.92x, at
# L=16384 0.91x / 1.08x / 1.02x, so D=64 keeps the template (GLUON=True still runs it)
MIN_LEN_SCORE = {128: 4096}


def shapes_served(query, key, value, any_length: bool = False, score: bool = False) -> bool:
    """Head dims 64 or 128 (V's the same), equal lengths that are multiples of 128, from MIN_LEN on
    (MIN_LEN_SCORE with a ``score`` mod) unless ``any_length`` (kernel_options GLUON=True)."""
    Lq, Lkv, E, Ev = query.shape[2], key.shape[2], query.shape[-1], value.shape[-1]
    return (E == Ev and E in MIN_LEN and Lq == Lkv and Lq % TILE == 0
            and (any_length or Lq >= (MIN_LEN_SCORE if score else MIN_LEN).get(E, Lq + 1)))


def plan_mode(plan, query, key, value) -> Optional[str]:
    """'dense', 'causal' or None (the template) for a ForwardPlan's calls of this signature. A plan
    with a score_mod also gets ``gluon_source``, the kernel's module with it as the hook."""
    opts = plan.opts
    flag = opts.get("GLUON")
    if flag is False or plan.pinned is not None or plan.interpret:
        return None
    if not available(query.device) or query.dtype not in (torch.float16, torch.bfloat16):
        return None
    B, Hq, Lq, _ = query.shape
    if not plan.scale > 0 or not shapes_served(query, key, value, flag is True, plan.has_score_mod):
        return None
    if plan.has_score_mod:
        plan.gluon_source = hooked_source(plan.score)
        if plan.gluon_source is None:
            return None
    if plan.user_block_mask is None:
        return "dense"
    if plan.mask.tensors:  # a captured tensor can change in place after this check
        return None
    return "causal" if is_causal_block_mask(plan.user_block_mask, B, Hq, Lq) else None


def reads_layout(query, key, value) -> bool:
    """Whether the kernel can read the call's tensors: (B*H*L, D) row matrices through TMA."""
    from .kernel import rows_layout, tma_eligible

    return all(tma_eligible(t) and rows_layout(t) for t in (query, key, value))


def launchable(query, key, value, out) -> bool:
    return out.dtype == query.dtype and out.is_contiguous() and reads_layout(query, key, value)


def source(mode: str, hooked: Optional[str] = None) -> str:
    """What kernel_source shows for a call this kernel serves: its module (``hooked``, the copy with
    the call's score_mod, where it has one), with a header naming the mode and the entry point."""
    what = "the score_mod printed into score_hook" if hooked else "no score_mod"
    head = (f"# inductor_flex: this call runs the Gluon forward, mode {mode!r} (CAUSAL={mode == 'causal'}, "
            f"HAS_SCORE={hooked is not None}):\n"
            f"# flex_fwd_gluon below, from templates/flex_forward_gluon.py, with {what} and\n"
            f"# {'a causal BlockMask' if mode == 'causal' else 'no BlockMask'}. kernel_options GLUON=False shows the template.\n")
    return head + (hooked if hooked is not None else _module_source())


def _module_source() -> str:
    import inspect

    from inductor_flex.templates import flex_forward_gluon as K

    return inspect.getsource(K)


# ---- the score hook: printed Triton rewritten into Gluon ------------------------------------------
_HOOK_START, _HOOK_END = "# >>> score hook", "# <<< score hook"


def _call_end(src: str, start: int) -> int:
    """Index of the parenthesis closing the call whose '(' is at ``start``."""
    depth = 0
    for i in range(start, len(src)):
        depth += {"(": 1, ")": -1}.get(src[i], 0)
        if depth == 0:
            return i
    raise ValueError("unbalanced parentheses")


def gluon_dialect(source: str) -> Optional[str]:
    """Printed ``@triton.jit`` functions rewritten into ``@gluon.jit`` ones, or None where they use
    something Gluon lacks. Elementwise code carries over name for name (gl.where, gl.exp2, gl.load,
    ...: its layouts come from the operands); only a created tensor needs a layout named, and
    tl.full takes its function's first parameter's (the score tile, or a tile of its layout)."""
    from triton.experimental.gluon import language as gl

    out = []
    for name, first, fn in _jit_functions(source):
        if name is None:
            return None
        fn = fn.replace("@triton.jit", "@gluon.jit", 1)
        uses_layout = False
        while True:
            i = fn.find("tl.full(")
            if i < 0:
                break
            end = _call_end(fn, i + len("tl.full"))
            args = fn[i + len("tl.full("):end]
            fn = f"{fn[:i]}gl.full({args}, _layout){fn[end + 1:]}"
            uses_layout = True
        for name in set(re.findall(r"\btl\.(\w+)", fn)):
            if not hasattr(gl, name):
                return None  # e.g. tl.sigmoid: the template runs this call
        fn = re.sub(r"\btl\.", "gl.", fn)
        if uses_layout:
            head_end = fn.index(":\n", fn.index("def ")) + 2
            fn = f"{fn[:head_end]}    _layout: gl.constexpr = {first}.type.layout\n{fn[head_end:]}"
        out.append(fn)
    return "\n\n\n".join(out) + "\n"


def printed_score(source: str) -> str:
    """A printed score_mod's two functions the hook is made of, out of a rendered template's source
    (the compiled op's argument) or a PrintedMod's."""
    return _functions(source, ("score_mod", "score_mod_scaled"))


def _jit_functions(source: str):
    """(name, first parameter, text) of each top-level ``@triton.jit`` function of ``source``; name
    None for a piece that is not one."""
    for fn in re.split(r"\n(?=@triton\.jit\n)", source.strip("\n")):
        m = re.match(r"@triton\.jit\ndef (\w+)\((\w*)", fn)
        yield (m.group(1), m.group(2), fn) if m else (None, None, fn)


def _functions(source: str, names) -> str:
    """The top-level ``@triton.jit`` functions of ``source`` named ``names``, in source order."""
    return "\n\n\n".join(fn.strip("\n") for name, _, fn in _jit_functions(source) if name in names)


_hooked: dict = {}
# Score_mods that read captured tensors (a relative-bias table, per-head scales) take the template:
# Triton 3.6 (the GPU's) fails to lower the dense kernel with any load in the hook ("Assertion
# idx < size()" in ConvertTritonGPUToLLVM; the causal kernel and Triton 3.9 build, not GPU-checked)
CAPTURED_OK = False


def hooked_source(score) -> Optional[str]:
    """The kernel's module with ``score`` (a PrintedMod) as score_hook, or None where its printed
    source has no Gluon form. The hook calls the mod's score_mod_scaled with the captured tensors'
    arguments unpacked from the ``caps`` tuple."""
    key = (score.source, tuple(score.params))
    if key in _hooked:
        return _hooked[key]
    if score.tensors and not CAPTURED_OK:
        return None
    from .printer import HELPERS

    result = None
    printed = printed_score(score.source)
    mods = gluon_dialect(printed) if printed else None
    helpers = gluon_dialect(HELPERS)
    if mods is not None and helpers is not None:
        caps = "".join(f", caps[{i}]" for i in range(len(score.params)))
        hook = (f"{helpers}\n\n{mods}\n\n"
                f"@gluon.jit\ndef score_hook(qk, sm_scale, b, h, q_idx, kv_idx, caps):\n"
                f"    return score_mod_scaled(qk, sm_scale, b, h, q_idx, kv_idx{caps})\n")
        module = _module_source()
        start, end = module.index(_HOOK_START), module.index(_HOOK_END)
        result = f"{module[:start]}{_HOOK_START}: {printed.splitlines()[2].strip('# ')}\n{hook}{module[end:]}"
    _hooked[key] = result
    return result


def _desc(t: torch.Tensor, block):
    from triton.experimental.gluon import language as gl
    from triton.experimental.gluon.nvidia.hopper import TensorDescriptor

    B, H, L, D = t.shape
    rows = B * H * L
    el = gl.float16 if t.dtype == torch.float16 else gl.bfloat16
    layout = gl.NVMMASharedLayout.get_default_for(block, el)
    # rows_layout: row (b * H + h) * L + m of the matrix sits at that many row strides from the base
    return TensorDescriptor(t, [rows, D], [t.stride(2), 1], block, layout)


def _module(hooked: Optional[str]):
    if hooked is None:
        from inductor_flex.templates import flex_forward_gluon as K

        return K
    from .kernel import load_module

    return load_module(hooked, False)


def launch(query, key, value, out, lse, mx, scale: float, causal: bool, hooked: Optional[str] = None,
           caps: tuple = ()) -> None:
    """``hooked``: hooked_source's module for a call with a score_mod, ``caps`` its arguments."""
    K = _module(hooked)
    B, Hq, L, D = query.shape
    Hkv = key.shape[1]
    K.flex_fwd_gluon[(L // K.BLOCK_M, B * Hq)](
        _desc(query, [K.HALF_M, D]), _desc(key, [K.BLOCK_N, D]), _desc(value, [K.BLOCK_N, D]),
        _desc(out, [K.HALF_M, D]), lse, mx, scale * math.log2(math.e), scale, L, Hq, Hq // Hkv, tuple(caps),
        causal, K.NUM_STAGES, hooked is not None, num_warps=4, maxnreg=K.MAXNREG)


def cross_compile(causal: bool, head_dim: int, dtype: torch.dtype = torch.bfloat16, arch: int = 90,
                  hooked: Optional[str] = None, caps: tuple = ()):
    """The kernel built to cubin for sm_<arch> with no GPU (CI's check that every mode compiles for
    Hopper): its signature written out as Triton's launcher would specialize it. ``hooked`` /
    ``caps``: a score_mod's module and the Triton types of its captured-tensor arguments ('*fp32',
    'i32', ...). Run in a process without TRITON_INTERPRET."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.experimental.gluon import language as gl
    from triton.experimental.gluon._runtime import GluonASTSource

    K = _module(hooked)
    el, name = (gl.float16, "fp16") if dtype == torch.float16 else (gl.bfloat16, "bf16")

    def desc(rows):
        layout = gl.NVMMASharedLayout.get_default_for([rows, head_dim], el)
        return f"tensordesc<{name}[{rows}, {head_dim}],{layout!r}>"

    sig = {"q_desc": desc(K.HALF_M), "k_desc": desc(K.BLOCK_N), "v_desc": desc(K.BLOCK_N), "o_desc": desc(K.HALF_M),
           "LSE": "*fp32", "MAX": "*fp32", "qk_scale": "fp32", "sm_scale": "fp32", "seq_len": "i32", "HQ": "i32",
           "GROUP": "i32", "caps": tuple(caps), "CAUSAL": "constexpr", "STAGES": "constexpr", "HAS_SCORE": "constexpr"}
    src = GluonASTSource(K.flex_fwd_gluon, sig,
                         constexprs={"CAUSAL": causal, "STAGES": K.NUM_STAGES, "HAS_SCORE": hooked is not None})
    return triton.compile(src, target=GPUTarget("cuda", arch, 32), options={"num_warps": 4, "maxnreg": K.MAXNREG})



def is_identity_score(score_mod) -> bool:
    """Whether a traced call's score_mod is the identity: the HOP's identity_score itself, or the
    subgraph Dynamo made of it (a graph returning its first input, nothing computed)."""
    from .hop import identity_score

    if score_mod is identity_score:
        return True
    graph = getattr(score_mod, "graph", None)
    if graph is None:
        return False
    nodes = list(graph.nodes)
    places = [n for n in nodes if n.op == "placeholder"]
    outs = [n for n in nodes if n.op == "output"]
    if len(outs) != 1 or len(places) + 1 != len(nodes) or not places:
        return False
    ret = outs[0].args[0]
    if isinstance(ret, (tuple, list)):
        if len(ret) != 1:
            return False
        ret = ret[0]
    return ret is places[0]


def serves_compiled(query, key, value, score_mod, block_mask, opts: dict, score_bufs=()) -> bool:
    """Trace time, under torch.compile: whether a forward goes to the inductor_flex::flex_forward op
    (lowering/kernel_op.py), whose plan then runs this kernel, instead of the Inductor-rendered
    template. Dense calls only (a causal BlockMask's lists are graph inputs, unknown until run
    time), static shapes from MIN_LEN on (MIN_LEN_SCORE with a score_mod), no pinned tile config;
    a score_mod without captured tensors whose printed form has a Gluon one."""
    from inductor_flex.lowering.kernel_op import _CONFIG_KEYS

    if block_mask[2] is not None or opts.get("GLUON") is False or any(k in opts for k in _CONFIG_KEYS):
        return False
    if not available(query.device) or query.dtype not in (torch.float16, torch.bfloat16):
        return False
    dims = (query.shape[2], key.shape[2], query.shape[-1], value.shape[-1])
    if not all(isinstance(d, int) for d in dims):
        return False
    if is_identity_score(score_mod):
        return shapes_served(query, key, value)
    if score_bufs or not shapes_served(query, key, value, score=True):
        return False
    from inductor_flex.compat import disable_current_modes
    from inductor_flex.lowering.kernel_op import _print_mods
    from inductor_flex.validation import use_fast_tanh

    with disable_current_modes():
        mods = _print_mods(score_mod, block_mask, (), (), query.device,
                           use_fast_tanh(opts, query.dtype, True), opts)
    return mods is not None and hooked_source(mods[0]) is not None
