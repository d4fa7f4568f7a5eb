"""Forward and forward+backward medians (ms) of one attention call, for the one-process A/B probes
(mask_cost_probe.py, mod_form_probe.py, ws_ab.py)."""
from __future__ import annotations

from typing import Callable, Sequence, Tuple

import torch
import triton.testing


def fwd_fwdbwd_ms(call: Callable[[], torch.Tensor], leaves: Sequence[torch.Tensor], dout: torch.Tensor,
                  backward: bool = True) -> Tuple[float, float]:
    """(forward ms, forward+backward ms or nan): do_bench medians, the forward under no_grad, the
    step with the leaves' gradients cleared before each backward."""
    with torch.no_grad():
        fwd = triton.testing.do_bench(call, warmup=25, rep=100, return_mode="median")
    if not backward:
        return fwd, float("nan")

    def step():
        for t in leaves:
            t.grad = None
        call().backward(dout)

    return fwd, triton.testing.do_bench(step, warmup=25, rep=100, return_mode="median")
