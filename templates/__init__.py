"""Jinja templates of the Triton kernels. Both the eager renderer and the Inductor lowering fill
the same hooks (the score_mod / mask_mod helpers and their captured-tensor parameters)."""
import functools
import os
import re

import jinja2

TEMPLATE_DIR = os.path.dirname(os.path.abspath(__file__))
# the kernel parameters that describe a call's layout: strides, lengths, head counts
_LAYOUT_PARAM = re.compile(r"\b(stride_\w+|Q_LEN|KV_LEN|HQ|HKV|GQA_GROUP)\b(?=\s*,)")


@jinja2.pass_context
def _layout_params(context, text: str) -> str:
    """{% filter layout_params %}: with specialize_layout (decided per eager plan by kernel.py's
    _specialize_layout) the layout parameters become constexprs, so Triton compiles the kernel for
    the call's strides and lengths, as Inductor bakes them in; otherwise the text as written."""
    if not context.get("specialize_layout", False):
        return text
    return _LAYOUT_PARAM.sub(r"\1: tl.constexpr", text)


@functools.lru_cache(None)
def _env() -> jinja2.Environment:
    env = jinja2.Environment(
        loader=jinja2.FileSystemLoader(TEMPLATE_DIR),
        undefined=jinja2.StrictUndefined,
        keep_trailing_newline=True,
    )
    env.filters["layout_params"] = _layout_params
    return env


def render(name: str, **hooks) -> str:
    """Render ``name`` (e.g. 'flex_forward.py.jinja') with its hooks filled."""
    return _env().get_template(name).render(**hooks)
