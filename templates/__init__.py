"""Jinja templates of the Triton kernels. Both the eager renderer and the Inductor lowering fill
the same hooks (the score_mod / mask_mod helpers and their captured-tensor parameters)."""
import functools
import os

import jinja2

TEMPLATE_DIR = os.path.dirname(os.path.abspath(__file__))


@functools.lru_cache(None)
def _env() -> jinja2.Environment:
    return jinja2.Environment(
        loader=jinja2.FileSystemLoader(TEMPLATE_DIR),
        undefined=jinja2.StrictUndefined,
        keep_trailing_newline=True,
    )


def render(name: str, **hooks) -> str:
    """Render ``name`` (e.g. 'flex_forward.py.jinja') with its hooks filled."""
    return _env().get_template(name).render(**hooks)
