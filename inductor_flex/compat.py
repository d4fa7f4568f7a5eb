"""Every private torch / Inductor API this package touches, in one place.

Supported: torch 2.11 + triton 3.6 (the GPU image) and torch 2.13 + triton 3.9 (CI).
"""
from __future__ import annotations

import torch

_MIN_TORCH = (2, 11)


def torch_version() -> tuple:
    return tuple(int(p) for p in torch.__version__.split("+")[0].split(".")[:2])


def check_torch_version() -> None:
    if torch_version() < _MIN_TORCH:
        raise ImportError(
            f"inductor_flex needs torch >= {'.'.join(map(str, _MIN_TORCH))}, found {torch.__version__}"
        )


def inductor_compile_fx():
    """Inductor's graph compiler (private: torch._inductor.compile_fx.compile_fx)."""
    from torch._inductor.compile_fx import compile_fx

    return compile_fx
