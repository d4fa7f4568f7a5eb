"""Inductor lowering of the flex attention HOPs, registered on ``import inductor_flex``.

While Inductor's AOT trace records a forward HOP, its functionalization rule (inductor_flex/hop.py)
emits one split-KV decode op for short queries (``lowering/decode.py``); otherwise it keeps the HOP
node for calls the forward template takes (``lowering/template.py``: CUDA, mods Inductor can
lower), which then reaches ``lower_forward`` below with ``ir.Subgraph`` arguments for the mods;
or emits one call of the fused forward kernel as a custom op (``lowering/kernel_op.py``: CPU with
BACKEND "TRITON", mods closing over symbolic ints) or the chunked online-softmax code of
``lowering/cpu.py`` (everything else). Backward HOPs likewise: the node is kept for calls the
backward template takes (``lowering/backward.py``, lowered by ``lower_backward``), else replaced
by the fused backward op or the chunked decomposition.
"""
from __future__ import annotations

import torch

from inductor_flex import compat
from inductor_flex.hop import flex_attention_backward_hop, flex_attention_hop

from . import decode, kernel_op  # noqa: F401  (register the inductor_flex custom ops up front)
from .backward import lower_backward
from .cpu import chunked_backward, chunked_forward
from .template import lower_forward, lower_tanh_approx

_registered = False


def register() -> None:
    global _registered
    if _registered:
        return
    # the table entries are markers read by the HOPs' functionalization rule; the functions
    # documented with them are what that rule runs
    compat.inductor_register_decomposition(flex_attention_hop, chunked_forward)
    compat.inductor_register_decomposition(flex_attention_backward_hop, chunked_backward)
    compat.inductor_register_lowering(flex_attention_hop, lower_forward)
    compat.inductor_register_lowering(flex_attention_backward_hop, lower_backward)
    if compat.inductor_lowers_inline_asm():
        compat.inductor_register_lowering(torch.ops.inductor_flex.tanh_approx.default, lower_tanh_approx)
    _registered = True
