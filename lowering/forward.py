"""Inductor lowering of the flex attention HOPs, registered on ``import inductor_flex``.

How it works today: the HOPs sit in Inductor's decomposition table, and while Inductor's AOT
trace records them their functionalization rule (inductor_flex/hop.py, ``decompose_here``) emits,
instead of the HOP node, either one call of the fused forward kernel as a custom op
(lowering/kernel_op.py: where an eager call would run the kernel) or the chunked online-softmax
code of lowering/cpu.py (everything else, and every backward), which Inductor fuses.

Planned hook-up point for the template lowered by Inductor itself (templates/flex_forward.py.jinja
with Inductor-generated hooks and template autotuning): let CUDA calls keep the HOP node in
``hop._forward_functionalize`` and implement ``_not_decomposed`` below; the HOP then reaches
Inductor's lowering with ``ir.Subgraph`` arguments for the mods.
"""
from __future__ import annotations

from inductor_flex import compat
from inductor_flex.hop import flex_attention_backward_hop, flex_attention_hop

from . import kernel_op  # noqa: F401  (registers the inductor_flex::flex_forward custom op up front)
from .cpu import chunked_backward, chunked_forward

_registered = False


def _not_decomposed(*args, **kwargs):
    raise RuntimeError(
        "inductor_flex: a flex attention HOP reached Inductor's lowering without being decomposed during the "
        "AOT trace; Inductor's decomposition table must hold the HOP (inductor_flex.lowering.forward.register())"
    )


def register() -> None:
    global _registered
    if _registered:
        return
    # the table entries are markers read by the HOPs' functionalization rule; the functions
    # documented with them are what that rule runs
    compat.inductor_register_decomposition(flex_attention_hop, chunked_forward)
    compat.inductor_register_decomposition(flex_attention_backward_hop, chunked_backward)
    compat.inductor_register_lowering(flex_attention_hop, _not_decomposed)
    compat.inductor_register_lowering(flex_attention_backward_hop, _not_decomposed)
    _registered = True
