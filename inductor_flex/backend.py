"""``torch.compile(model, backend="inductor_flex")``: registered through the
``torch_dynamo_backends`` entry point in setup.py.

It is Inductor with this package's HOP support and lowerings active (they register on
``import inductor_flex``, which loading this module guarantees) and our Inductor config defaults
below. ``torch.compile(..., backend="inductor_flex", options={...})`` passes Inductor config
patches that override the defaults.
"""
from __future__ import annotations

from typing import Any, Dict

import inductor_flex  # noqa: F401  (registers the HOP's Dynamo support and lowerings)

from .compat import inductor_compile_fx

# Inductor config patches this backend applies before the user's options. Empty today: the
# lowerings need no Inductor setting changed; the slot exists so the defaults live in one place.
INDUCTOR_DEFAULTS: Dict[str, Any] = {}


def inductor_flex_backend(gm, example_inputs, options=None, config_patches=None):
    """``options`` is what torch.compile(..., options=...) passes: Inductor config patches."""
    patches = dict(INDUCTOR_DEFAULTS)
    patches.update(config_patches or {})
    patches.update(options or {})
    return inductor_compile_fx()(gm, example_inputs, config_patches=patches)
