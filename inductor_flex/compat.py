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



# ---- Inductor templates (lowering/template.py) ---------------------------------------------------
def inductor_template_api():
    """(TritonTemplate, autotune_select_algorithm, SymbolicGridFn, TritonTemplateKernel): Inductor's
    Jinja-template kernels and their autotuner (private: torch._inductor.select_algorithm)."""
    sa = "torch._inductor.select_algorithm"
    return (
        _private(sa, "TritonTemplate", "Triton template kernels"),
        _private(sa, "autotune_select_algorithm", "template autotuning"),
        _private(sa, "SymbolicGridFn", "template launch grids"),
        _private(sa, "TritonTemplateKernel", "template kernel hooks"),
    )


def new_triton_template(name: str, grid, source: str):
    """A TritonTemplate; layouts of its inputs are frozen when the template reads their strides
    (torch 2.13 makes that an option, 2.11 always does it)."""
    import inspect

    TritonTemplate = inductor_template_api()[0]
    kwargs = {}
    if "always_freeze_layout" in inspect.signature(TritonTemplate.__init__).parameters:
        kwargs["always_freeze_layout"] = True
    return TritonTemplate(name=name, grid=grid, source=source, **kwargs)


def modification_takes_shapes() -> bool:
    """Whether the template hook modification() takes input_shapes / input_dtypes (torch 2.13)."""
    import inspect

    params = inspect.signature(inductor_template_api()[3].modification).parameters
    return "input_shapes" in params and "input_dtypes" in params


def store_output_takes_shape() -> bool:
    """Whether the template hook store_output() takes val_shape (the value's block shape)."""
    import inspect

    return "val_shape" in inspect.signature(inductor_template_api()[3].store_output).parameters


def select_template(name, choices, input_nodes, layout, input_gen_fns):
    """Benchmark the template choices (when there are several) and return the chosen output node."""
    res = inductor_template_api()[1](name, choices, input_nodes, layout, input_gen_fns=input_gen_fns)
    return res[0] if isinstance(res, tuple) else res


def inductor_ir():
    """torch._inductor.ir: TensorBox, ComputedBuffer, InputBuffer, FixedLayout, FlexibleLayout, Subgraph."""
    return _private("torch._inductor", "ir", "Inductor's IR")


def inductor_graph():
    """The GraphLowering running now (torch._inductor.virtualized.V.graph)."""
    return _private("torch._inductor.virtualized", "V", "Inductor's virtualized state").graph


def inductor_lowering(op):
    """Inductor's lowering for an ATen op (e.g. aten.empty_strided, aten.full)."""
    table = _private("torch._inductor.lowering", "lowerings", "Inductor's lowering table")
    return table[op]


def inductor_realize(*nodes):
    """Realize IR nodes into buffers a template can read."""
    fn = _private("torch._inductor.select_algorithm", "realize_inputs", "template input realization")
    return [fn(n) for n in nodes]


def lower_subgraph(gm, args):
    """Lower a pointwise FX subgraph (a score_mod / mask_mod) on IR arguments inside the running
    GraphLowering -> its lowered outputs (TensorBoxes)."""
    cls = _private("torch._inductor.subgraph_lowering", "PointwiseSubgraphLowering", "subgraph lowering")
    V = _private("torch._inductor.virtualized", "V", "Inductor's virtualized state")
    sub = cls(gm, root_graph_lowering=V.graph)
    with V.set_graph_handler(sub):
        sub.run(*args)
    return sub.graph_outputs


def inductor_lowers_inline_asm() -> bool:
    """Whether Inductor's Triton codegen prints ops.inline_asm_elementwise (the compiled kernels'
    route to the hardware tanh); without it they keep the exact tanh."""
    try:
        from torch._inductor.codegen.triton import TritonOverrides
    except ImportError:
        return False
    return hasattr(TritonOverrides, "inline_asm_elementwise")


def inductor_inline_asm_pointwise(x, asm: str, constraints: str, dtype: torch.dtype):
    """A Pointwise IR node of ``dtype`` applying one PTX instruction to each element of ``x``."""
    ir = inductor_ir()
    ops = _private("torch._inductor.virtualized", "ops", "Inductor's ops handler")
    loader = x.make_loader()

    def inner(idx):
        return ops.inline_asm_elementwise(loader(idx), asm=asm, constraints=constraints, dtype=dtype,
                                          is_pure=True, pack=1)

    return ir.Pointwise.create(device=x.get_device(), dtype=dtype, inner_fn=inner, ranges=list(x.get_size()))


def size_hint(expr) -> int:
    """An integer value for a (possibly symbolic) size: sizevars.optimization_hint (2.13) or size_hint (2.11)."""
    sv = inductor_graph().sizevars
    fn = getattr(sv, "optimization_hint", None) or getattr(sv, "size_hint")
    return int(fn(expr))


def static_int(expr) -> int:
    """``expr`` as a Python int, guarding on its current value when it is symbolic (a recompile
    follows if it changes): for sizes a kernel bakes in as constexprs, such as head dims."""
    sv = inductor_graph().sizevars
    fn = getattr(sv, "guard_int", None) or getattr(sv, "evaluate_static_shape")
    return int(fn(expr))


def known_multiple_of(expr, n: int) -> bool:
    return bool(inductor_graph().sizevars.statically_known_multiple_of(expr, n))


def inductor_max_autotune() -> bool:
    import torch._inductor.config as cfg

    return bool(getattr(cfg, "max_autotune", False))


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


def raw_stream(device: torch.device) -> int:
    """The current CUDA stream's handle (torch._C._cuda_getCurrentRawStream: no Stream object, ~10x
    cheaper than torch.cuda.current_stream(), which matters on the decode path)."""
    fn = getattr(torch._C, "_cuda_getCurrentRawStream", None)
    if fn is None:
        return torch.cuda.current_stream(device).cuda_stream
    return fn(device.index if device.index is not None else torch.cuda.current_device())


_builder = None


def persistent_tensors(device: torch.device, make: Callable):
    """``make()``, for tensors a cache keeps across calls, allocated outside any CUDA-graph memory
    pool. torch.compile's CUDA graphs (mode "reduce-overhead") run a graph's warm-up calls with the
    calling thread's allocations routed into the graph's pool, and a tensor from that pool that
    outlives the call makes them raise ("tensor(s) in the cudagraph pool not tracked as outputs").
    Built on a thread of our own, it comes from the ordinary allocator; the caller's stream waits
    for it. Inside a capture it is built in place (no cross-stream work while capturing)."""
    global _builder
    stack = getattr(torch._C, "_len_torch_dispatch_stack", lambda: 0)
    if device.type != "cuda" or torch.cuda.is_current_stream_capturing() or stack():
        return make()  # (a dispatch mode, e.g. fake tensors while tracing, must see the allocation)
    import concurrent.futures

    index = device.index if device.index is not None else torch.cuda.current_device()

    def build():
        with torch.cuda.device(index):
            out = make()
            done = torch.cuda.Event()
            done.record()
        return out, done

    if _builder is None:
        _builder = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="inductor_flex_alloc")
    out, done = _builder.submit(build).result()
    torch.cuda.current_stream(index).wait_event(done)  # made (zeroed, filled) before the caller reads it
    return out


def ensure_triton_allocator() -> None:
    """Give Triton a global-memory allocator for kernels that build tensor descriptors on the device
    (tl.make_tensor_descriptor needs a small workspace per launch), unless the caller has set one."""
    import triton

    try:
        from triton.runtime._allocation import NullAllocator, _allocator
        if not isinstance(_allocator.get(), NullAllocator):
            return
    except ImportError:  # the private names moved: set ours (what set_allocator's users do anyway)
        pass

    def alloc(size: int, alignment: int, stream):
        return torch.empty(size, dtype=torch.int8, device="cuda" if torch.cuda.is_available() else "cpu")

    triton.set_allocator(alloc)


_launch_api = None


def _triton_launch_api():
    global _launch_api
    if _launch_api is None:
        from triton import knobs
        from triton.runtime.driver import driver
        _launch_api = (knobs.runtime, driver)
    return _launch_api


def can_launch_compiled(kernel) -> bool:
    """Whether ``launch_compiled`` can call this object's launcher (what ``JITFunction.run`` returns
    in triton 3.6 to 3.9: a CompiledKernel with run / function / packed_metadata)."""
    try:
        _triton_launch_api()
        return all(hasattr(kernel, a) for a in ("run", "function", "packed_metadata", "launch_metadata"))
    except Exception:  # noqa: BLE001 - another triton: Triton's own path only
        return False


def launch_compiled(kernel, grid, args, tail) -> None:
    """Launch a compiled kernel as ``JITFunction.run`` does after its lookup: the launcher takes the
    grid, the stream, the function, its metadata, the launch hooks, then every argument in signature
    order (constexprs included; it skips them)."""
    runtime, driver = _triton_launch_api()
    device = driver.active.get_current_device()
    stream = driver.active.get_current_stream(device)
    enter = runtime.launch_enter_hook
    meta = kernel.launch_metadata(grid, stream, *args, *tail) if enter is not None else None
    n = len(grid)
    kernel.run(grid[0], grid[1] if n > 1 else 1, grid[2] if n > 2 else 1, stream, kernel.function,
               kernel.packed_metadata, meta, enter, runtime.launch_exit_hook, *args, *tail)


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


def dynamo_input_value(vt):
    """The real tensor behind a Dynamo TensorVariable that is a graph input (its placeholder's
    GraphArg example), or None: a tensor built inside the traced code, or one no longer alive."""
    try:
        node = vt.as_proxy().node
        arg = node.meta.get("grapharg") if node.op == "placeholder" else None
        value = arg.example if arg is not None else None
    except Exception:  # noqa: BLE001 - not a tensor input, or its weak reference died
        return None
    fake = _private("torch._subclasses.fake_tensor", "is_fake", "fake-tensor check")
    return value if isinstance(value, torch.Tensor) and not fake(value) else None


_gluon_ready = None


def gluon_hopper_ready() -> bool:
    """Whether this Triton has Gluon with Hopper's warpgroup MMA, TMA and warp_specialize taking a
    list of (partition, args) (Triton 3.6 on; earlier Gluon took them apart), as
    templates/flex_forward_gluon.py is written against. Gluon is experimental Triton API."""
    global _gluon_ready
    if _gluon_ready is None:
        try:
            import inspect

            from triton.experimental.gluon import language as gl
            from triton.experimental.gluon.language.nvidia.hopper import (  # noqa: F401
                mbarrier, tma, warpgroup_mma, warpgroup_mma_wait)
            from triton.experimental.gluon.nvidia.hopper import TensorDescriptor  # noqa: F401

            params = list(inspect.signature(gl.warp_specialize).parameters)
            _gluon_ready = bool(params) and params[0] == "functions_and_args"
        except Exception:  # noqa: BLE001 - no Gluon, or another shape of it
            _gluon_ready = False
    return _gluon_ready
