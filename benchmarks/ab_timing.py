"""Forward and forward+backward medians (ms) of one attention call, and the shared command line,
for the one-process A/B probes (mask_cost_probe.py, mod_form_probe.py, alibi_ws_probe.py, ws_ab.py,
ws_runs_probe.py)."""
from __future__ import annotations

import argparse
from typing import Callable, Optional, Sequence, Tuple

import torch
import triton.testing


def probe_parser(doc: str, rounds: Optional[int] = 2) -> argparse.ArgumentParser:
    """The probes' arguments: --S and --B (H=16, D=128 in every probe), --rounds of alternation
    (none where ``rounds`` is None)."""
    ap = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--S", type=int, default=4096)
    ap.add_argument("--B", type=int, default=4)
    if rounds is not None:
        ap.add_argument("--rounds", type=int, default=rounds)
    return ap


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
