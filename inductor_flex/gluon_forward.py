"""When the eager forward runs the hand-scheduled Gluon kernel (templates/flex_forward_gluon.py), and
how it is launched.

The kernel has no score_mod / mask_mod hooks: it serves the two calls cuDNN and FlashAttention-3
are measured on, no BlockMask (dense) and a causal one, for 16-bit inputs with head dim 64 or 128,
equal query and key lengths that are multiples of 128, on a Hopper GPU whose Triton has Gluon's
warp specialization, from the lengths where it measured faster than the template (MIN_LEN; any
length with kernel_options GLUON=True). Every other call, and any call with GLUON=False or a pinned
tile config, takes the Jinja template as before.

A BlockMask counts as causal when its blocks are 128 x 128, its partial blocks are exactly the
diagonal, its full blocks exactly the blocks below it, and its mask_mod on the diagonal blocks is
q >= kv for every (batch, head) of the call: then the template would compute the same thing, and
this kernel does so with the diagonal masked by q >= kv and the rest unmasked.
"""
from __future__ import annotations

import math
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


def shapes_served(query, key, value, any_length: bool = False) -> bool:
    """Head dims 64 or 128 (V's the same), equal lengths that are multiples of 128, from MIN_LEN on
    unless ``any_length`` (kernel_options GLUON=True)."""
    Lq, Lkv, E, Ev = query.shape[2], key.shape[2], query.shape[-1], value.shape[-1]
    return (E == Ev and E in MIN_LEN and Lq == Lkv and Lq % TILE == 0
            and (any_length or Lq >= MIN_LEN[E]))


def plan_mode(plan, query, key, value) -> Optional[str]:
    """'dense', 'causal' or None (the template) for a ForwardPlan's calls of this signature."""
    opts = plan.opts
    flag = opts.get("GLUON")
    if flag is False or plan.pinned is not None or plan.interpret:
        return None
    if not available(query.device) or query.dtype not in (torch.float16, torch.bfloat16):
        return None
    B, Hq, Lq, _ = query.shape
    if plan.has_score_mod or not plan.scale > 0 or not shapes_served(query, key, value, flag is True):
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


def source(mode: str) -> str:
    """What kernel_source shows for a call this kernel serves: its module, with a header naming the
    mode and the entry point."""
    import inspect

    from inductor_flex.templates import flex_forward_gluon as K

    head = (f"# inductor_flex: this call runs the Gluon forward, mode {mode!r} (CAUSAL={mode == 'causal'}):\n"
            f"# flex_fwd_gluon below, from templates/flex_forward_gluon.py; no hooks (no score_mod,\n"
            f"# {'a causal BlockMask' if mode == 'causal' else 'no BlockMask'}). kernel_options GLUON=False shows the template.\n")
    return head + inspect.getsource(K)


def _desc(t: torch.Tensor, block):
    from triton.experimental.gluon import language as gl
    from triton.experimental.gluon.nvidia.hopper import TensorDescriptor

    B, H, L, D = t.shape
    rows = B * H * L
    el = gl.float16 if t.dtype == torch.float16 else gl.bfloat16
    layout = gl.NVMMASharedLayout.get_default_for(block, el)
    # rows_layout: row (b * H + h) * L + m of the matrix sits at that many row strides from the base
    return TensorDescriptor(t, [rows, D], [t.stride(2), 1], block, layout)


def launch(query, key, value, out, lse, mx, scale: float, causal: bool) -> None:
    from inductor_flex.templates import flex_forward_gluon as K

    B, Hq, L, D = query.shape
    Hkv = key.shape[1]
    K.flex_fwd_gluon[(L // K.BLOCK_M, B * Hq)](
        _desc(query, [K.HALF_M, D]), _desc(key, [K.BLOCK_N, D]), _desc(value, [K.BLOCK_N, D]),
        _desc(out, [K.HALF_M, D]), lse, mx, scale * math.log2(math.e), L, Hq, Hq // Hkv,
        causal, K.NUM_STAGES, num_warps=4, maxnreg=K.MAXNREG)


def cross_compile(causal: bool, head_dim: int, dtype: torch.dtype = torch.bfloat16, arch: int = 90):
    """The kernel built to cubin for sm_<arch> with no GPU (CI's check that every mode compiles for
    Hopper): its signature written out as Triton's launcher would specialize it. Run in a process
    without TRITON_INTERPRET."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.experimental.gluon import language as gl
    from triton.experimental.gluon._runtime import GluonASTSource

    from inductor_flex.templates import flex_forward_gluon as K

    el, name = (gl.float16, "fp16") if dtype == torch.float16 else (gl.bfloat16, "bf16")

    def desc(rows):
        layout = gl.NVMMASharedLayout.get_default_for([rows, head_dim], el)
        return f"tensordesc<{name}[{rows}, {head_dim}],{layout!r}>"

    sig = {"q_desc": desc(K.HALF_M), "k_desc": desc(K.BLOCK_N), "v_desc": desc(K.BLOCK_N), "o_desc": desc(K.HALF_M),
           "LSE": "*fp32", "MAX": "*fp32", "qk_scale": "fp32", "seq_len": "i32", "HQ": "i32", "GROUP": "i32",
           "CAUSAL": "constexpr", "STAGES": "constexpr"}
    src = GluonASTSource(K.flex_fwd_gluon, sig, constexprs={"CAUSAL": causal, "STAGES": K.NUM_STAGES})
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


def serves_compiled(query, key, value, score_mod, block_mask, opts: dict) -> bool:
    """Trace time, under torch.compile: whether a forward goes to the inductor_flex::flex_forward op
    (lowering/kernel_op.py), whose plan then runs this kernel, instead of the Inductor-rendered
    template. Dense calls only (a causal BlockMask's lists are graph inputs, unknown until run
    time), identity score_mod, static shapes from MIN_LEN on, no pinned tile config."""
    from inductor_flex.lowering.kernel_op import _CONFIG_KEYS

    if block_mask[2] is not None or opts.get("GLUON") is False or any(k in opts for k in _CONFIG_KEYS):
        return False
    if not available(query.device) or query.dtype not in (torch.float16, torch.bfloat16):
        return False
    dims = (query.shape[2], key.shape[2], query.shape[-1], value.shape[-1])
    if not all(isinstance(d, int) for d in dims):
        return False
    return shapes_served(query, key, value) and is_identity_score(score_mod)
