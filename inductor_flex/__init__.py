"""inductor-flex: FlexAttention compiled into fused Triton kernels, eager and under torch.compile.

Switch from PyTorch's implementation by changing one import::

    from inductor_flex import flex_attention, create_block_mask
"""
import importlib.util as _ilu
import os as _os
import sys as _sys


def _mount_source_subpackages() -> None:
    # Installed, setuptools maps lowering/ and templates/ to inductor_flex.lowering/.templates.
    # Run from a source checkout without installing, mount them from beside this package.
    root = _os.path.dirname(_os.path.dirname(_os.path.abspath(__file__)))
    for name in ("lowering", "templates"):
        full = f"{__name__}.{name}"
        if full in _sys.modules or _ilu.find_spec(full) is not None:
            continue
        init = _os.path.join(root, name, "__init__.py")
        if _os.path.exists(init):
            spec = _ilu.spec_from_file_location(full, init, submodule_search_locations=[_os.path.dirname(init)])
            mod = _ilu.module_from_spec(spec)
            _sys.modules[full] = mod
            spec.loader.exec_module(mod)


_mount_source_subpackages()

from .compat import check_torch_version as _check_torch_version

_check_torch_version()

from .attention import AuxOutput, AuxRequest, flex_attention
from .block_mask import BlockMask, create_block_mask, create_mask, refine_block_mask
from .mods import FlexModError, and_masks, noop_mask, or_masks
from .validation import FlexKernelOptions
from . import dynamo as _dynamo

_dynamo.install()

from .lowering import forward as _lowering_forward  # noqa: E402

_lowering_forward.register()

__version__ = "0.1.0"


def kernel_source(query, key, value, score_mod=None, block_mask=None, scale=None, enable_gqa=False,
                  kernel_options=None) -> str:
    """The exact Triton source that ``flex_attention`` with these arguments runs."""
    from .kernel import kernel_source as _kernel_source

    return _kernel_source(query, key, value, score_mod, block_mask, scale, enable_gqa, kernel_options)


__all__ = [
    "AuxOutput", "AuxRequest", "BlockMask", "FlexKernelOptions", "FlexModError", "and_masks", "create_block_mask", "create_mask",
    "flex_attention", "kernel_source", "noop_mask", "or_masks", "refine_block_mask",
]
