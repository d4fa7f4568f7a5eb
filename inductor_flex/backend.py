"""``torch.compile(model, backend="inductor_flex")``: registered through the
``torch_dynamo_backends`` entry point in setup.py.

Today this is Inductor itself; ``flex_attention`` calls inside the model run our eager fused
kernel behind a graph break (the HOP that would keep them inside the graph is planned).
"""
from __future__ import annotations

from .compat import inductor_compile_fx


def inductor_flex_backend(gm, example_inputs, **kwargs):
    return inductor_compile_fx()(gm, example_inputs, **kwargs)
