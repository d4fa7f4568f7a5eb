"""inductor-flex: FlexAttention compiled into fused Triton kernels, eager and under torch.compile.

Switch from PyTorch's implementation by changing one import::

    from inductor_flex import flex_attention, create_block_mask
"""
from .attention import AuxOutput, AuxRequest, flex_attention
from .block_mask import BlockMask, create_block_mask, create_mask
from .mods import FlexModError, and_masks, noop_mask, or_masks

__version__ = "0.1.0"


def kernel_source(query, key, value, score_mod=None, block_mask=None, scale=None, enable_gqa=False,
                  kernel_options=None) -> str:
    """The exact Triton source that ``flex_attention`` with these arguments runs."""
    from .kernel import kernel_source as _kernel_source

    return _kernel_source(query, key, value, score_mod, block_mask, scale, enable_gqa, kernel_options)


__all__ = [
    "AuxOutput", "AuxRequest", "BlockMask", "FlexModError", "and_masks", "create_block_mask", "create_mask",
    "flex_attention", "kernel_source", "noop_mask", "or_masks",
]
