"""Every private torch / Inductor API this package touches, in one place.

Supported: torch 2.11 + triton 3.6 (the GPU image) and torch 2.13 + triton 3.9 (CI). Each helper
imports lazily and, when the API is missing or has moved, raises ``UnsupportedTorchError`` naming
the API and the torch version, instead of an AttributeError deep inside a trace.
"""
from __future__ import annotations

import importlib
from typing import Any, Callable

import torch

_MIN_TORCH = (2, 11)


class UnsupportedTorchError(RuntimeError):
    """The installed torch lacks a private API inductor_flex needs."""


def torch_version() -> tuple:
    return tuple(int(p) for p in torch.__version__.split("+")[0].split(".")[:2])


def check_torch_version() -> None:
    if torch_version() < _MIN_TORCH:
        raise ImportError(
            f"inductor_flex needs torch >= {'.'.join(map(str, _MIN_TORCH))}, found {torch.__version__}"
        )


def _private(module: str, name: str, what: str) -> Any:
    try:
        return getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError) as e:
        raise UnsupportedTorchError(
            f"inductor_flex needs {module}.{name} ({what}), which torch {torch.__version__} does not have; "
            f"supported versions are torch 2.11 and 2.13"
        ) from e


# ---- Inductor ----------------------------------------------------------------------------------
def inductor_compile_fx():
    """Inductor's graph compiler (private: torch._inductor.compile_fx.compile_fx)."""
    return _private("torch._inductor.compile_fx", "compile_fx", "Inductor's graph compiler")


def inductor_register_lowering(op, lowering: Callable) -> None:
    """Add ``lowering`` for ``op`` to Inductor's lowering table (torch._inductor.lowering.lowerings).

    The table is a plain dict keyed by the op; a HOP is looked up by identity like an OpOverload.
    """
    lowerings = _private("torch._inductor.lowering", "lowerings", "Inductor's lowering table")
    lowerings[op] = lowering


def inductor_register_decomposition(op, fn: Callable) -> None:
    """Add ``op`` to the table Inductor hands its AOT trace (torch._inductor.decomposition).

    Our HOPs' make_fx rule checks the table for them; the cached copy that
    select_decomp_table() may return is refreshed so the entry is seen.
    """
    mod = importlib.import_module("torch._inductor.decomposition")
    table = _private("torch._inductor.decomposition", "decompositions", "Inductor's decomposition table")
    table[op] = fn
    cached = getattr(mod, "fast_random_decomps", None)
    if cached is not None and hasattr(cached, "cache_clear"):
        cached.cache_clear()










# ---- HigherOrderOperator machinery -------------------------------------------------------------
def higher_order_operator_class():
    return _private("torch._ops", "HigherOrderOperator", "the HigherOrderOperator base class")


def dispatch_key():
    return torch._C.DispatchKey


def below_autograd():
    """Context manager that dispatches the next op call below the Autograd key."""
    return torch._C._AutoDispatchBelowAutograd()


def above_autograd():
    """Undo ``below_autograd`` for a region: the dense backward runs autograd on real tensors
    even when its HOP was dispatched below the Autograd key."""
    exclude = torch._C._dispatch_tls_local_exclude_set()
    keys = torch._C.DispatchKey
    for key in (keys.AutogradOther, keys.AutogradNestedTensor, keys.AutogradFunctionality):
        exclude = exclude.remove(key)
    return torch._C._ForceDispatchKeyGuard(torch._C._dispatch_tls_local_include_set(), exclude)


def fake_tensor_mode_class():
    return _private("torch._subclasses.fake_tensor", "FakeTensorMode", "fake tensors")


def proxy_mode_class():
    return _private("torch.fx.experimental.proxy_tensor", "ProxyTorchDispatchMode", "make_fx tracing")


def track_tensor_tree(out, proxy, tracer):
    fn = _private("torch.fx.experimental.proxy_tensor", "track_tensor_tree", "make_fx output tracking")
    return fn(out, proxy, constant=None, tracer=tracer)


def proxies_of(proxy_mode, args):
    """``args`` with every traced tensor replaced by its proxy in ``proxy_mode``'s graph."""
    from torch.utils import _pytree

    return _pytree.tree_map(proxy_mode.tracer.unwrap_proxy, args)


def reenter_make_fx(fn: Callable) -> Callable:
    """Trace ``fn`` into a subgraph of the make_fx session that is running now."""
    return _private("torch._higher_order_ops.utils", "reenter_make_fx", "subgraph tracing inside make_fx")(fn)


def current_proxy_mode():
    """The make_fx ProxyTorchDispatchMode in effect, or None."""
    return _private("torch.fx.experimental.proxy_tensor", "get_proxy_mode", "make_fx mode lookup")()


def current_decomposition_table() -> dict:
    """The decomposition table of the make_fx trace in progress ({} when none)."""
    mode = current_proxy_mode()
    table = getattr(mode, "decomposition_table", None) if mode is not None else None
    if table is None and under_make_fx():
        from torch.fx.experimental import proxy_tensor

        table = getattr(proxy_tensor._CURRENT_MAKE_FX_TRACER, "decomposition_table", None)
    return table or {}


def under_make_fx() -> bool:
    """Whether a make_fx trace (e.g. AOTAutograd's) is running."""
    from torch.fx.experimental import proxy_tensor

    if not hasattr(proxy_tensor, "_CURRENT_MAKE_FX_TRACER"):
        raise UnsupportedTorchError(
            f"inductor_flex needs torch.fx.experimental.proxy_tensor._CURRENT_MAKE_FX_TRACER, which torch "
            f"{torch.__version__} does not have"
        )
    return proxy_tensor._CURRENT_MAKE_FX_TRACER is not None


def detect_fake_mode(tensors):
    return _private("torch._guards", "detect_fake_mode", "fake-mode lookup")(tensors)


def disable_current_modes():
    """Suspend every active TorchDispatchMode (proxy, functionalization, fake)."""
    return _private("torch.utils._python_dispatch", "_disable_current_modes", "dispatch-mode suspension")()


def make_fx(fn, tracing_mode: str = "real"):
    from torch.fx.experimental.proxy_tensor import make_fx as _make_fx

    return _make_fx(fn, tracing_mode=tracing_mode)


def unique_graph_name(proxy_mode, prefix: str) -> str:
    fn = _private("torch._higher_order_ops.utils", "unique_graph_id", "subgraph naming")
    return fn(proxy_mode, prefix)[1]




# ---- Dynamo ------------------------------------------------------------------------------------
def dynamo_hop_support():
    """(TorchHigherOrderOperatorVariable, speculate_subgraph, make_attr, wrap_fx_proxy,
    discard_graph_changes) — the pieces a HOP's Dynamo variable uses.

    speculate_subgraph(tx, f, args, kwargs, description, *, source_target, set_subgraph_inputs)
    returns ((output, spec), graph, lifted_freevars) on torch 2.11 and 2.13 alike."""
    hoo = "torch._dynamo.variables.higher_order_ops"
    return (
        _private(hoo, "TorchHigherOrderOperatorVariable", "Dynamo's HOP variable base class"),
        _private(hoo, "speculate_subgraph", "Dynamo's subgraph speculation"),
        _private(hoo, "make_attr", "Dynamo get_attr helper"),
        _private("torch._dynamo.variables.builder", "wrap_fx_proxy", "Dynamo proxy wrapping"),
        _private(hoo, "discard_graph_changes", "Dynamo graph rollback"),
    )


def dynamo_constant(tx, value):
    """A Dynamo VariableTracker for a Python constant (a shape list, a dtype)."""
    vt = _private("torch._dynamo.variables.base", "VariableTracker", "Dynamo variable tracker")
    if hasattr(vt, "build"):
        return vt.build(tx, value)
    builder = _private("torch._dynamo.variables.builder", "SourcelessBuilder", "Dynamo sourceless builder")
    return builder.create(tx, value)


def dynamo_realize(value):
    """Materialise lazily-built Dynamo variables inside a (nested) structure."""
    lazy = _private("torch._dynamo.variables.lazy", "LazyVariableTracker", "Dynamo lazy variables")
    return lazy.realize_all(value)


def register_dynamo_hop_variable(hop_name: str, variable_class) -> None:
    """Tell Dynamo which VariableTracker traces calls to the HOP named ``hop_name``."""
    table = _private("torch._dynamo.variables.higher_order_ops", "_hop_name_to_variable_class",
                     "Dynamo's HOP-name -> variable-class table")
    table[hop_name] = variable_class
