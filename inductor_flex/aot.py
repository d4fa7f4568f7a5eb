"""Ahead-of-time compilation of rendered kernels for a GPU target, with no GPU present.

CI uses this to prove every template specialization builds for Hopper (sm_90): the launch a call
would make is turned into a Triton signature + constexprs and handed to ``triton.compile`` with
``GPUTarget("cuda", 90, 32)``. It must run in a process without TRITON_INTERPRET.
"""
from __future__ import annotations

from typing import Dict, Tuple

import torch

_PTR = {
    torch.float16: "*fp16", torch.bfloat16: "*bf16", torch.float32: "*fp32", torch.float64: "*fp64",
    torch.int32: "*i32", torch.int64: "*i64", torch.int8: "*i8", torch.uint8: "*u8", torch.bool: "*i1",
    torch.int16: "*i16",
}


def _arg_type(v) -> str:
    if isinstance(v, torch.Tensor):
        return _PTR[v.dtype]
    if isinstance(v, bool):
        return "i1"
    if isinstance(v, int):
        return "i32" if -(2 ** 31) <= v < 2 ** 31 else "i64"
    if isinstance(v, float):
        return "fp32"
    raise TypeError(f"cannot type kernel argument {v!r}")


def signature_of(fn, args, constexprs: Dict[str, object]) -> Tuple[dict, dict, dict]:
    """(signature, constexprs, attrs) as a launch with these arguments would specialize them: an int
    equal to 1 becomes a constant, and 16-byte-aligned pointers and ints divisible by 16 carry
    tt.divisibility (what lets the GPU build vectorize loads and fold address arithmetic)."""
    names = fn.arg_names
    declared = {names[i] for i in fn.constexprs}  # tl.constexpr parameters passed positionally
    sig, consts, attrs = {}, {}, {}
    positional = [n for n in names if n not in constexprs]
    if len(positional) != len(args):
        raise ValueError(f"{len(args)} positional args for {len(positional)} parameters")
    for n, a in zip(positional, args):
        if n in declared:
            sig[n], consts[n] = "constexpr", a
            continue
        if isinstance(a, int) and not isinstance(a, bool) and a == 1:
            sig[n], consts[n] = "constexpr", 1
            continue
        sig[n] = _arg_type(a)
        aligned = (a.data_ptr() % 16 == 0 if isinstance(a, torch.Tensor)
                   else isinstance(a, int) and not isinstance(a, bool) and a % 16 == 0)
        if aligned:
            attrs[(names.index(n),)] = [["tt.divisibility", 16]]
    for n in names:
        if n in constexprs:
            sig[n] = "constexpr"
            consts[n] = constexprs[n]
    return sig, consts, attrs


def compile_launch(module, kernel_name: str, args, constexprs, num_warps: int, num_stages: int,
                   arch: int = 90):
    """Compile one launch's specialization for ``cuda:sm_{arch}``; returns the compiled kernel."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    fn = getattr(module, kernel_name)
    sig, consts, attrs = signature_of(fn, args, constexprs)
    src = ASTSource(fn=fn, signature=sig, constexprs=consts, attrs=attrs)
    return triton.compile(src, target=GPUTarget("cuda", arch, 32),
                          options={"num_warps": num_warps, "num_stages": num_stages})
