"""Inductor's generated kernels run by Triton's interpreter on CPU tensors: the kernel stand-ins
behind the ``interpreted_inductor`` fixture (conftest.py), so CI checks the numerics of the very
source Inductor generates for the flex templates and for its own kernels around them."""
import re

from inductor_flex.kernel import load_module


class InterpreterLibdevice:
    """libdevice as Triton's interpreter can run it (its own libdevice calls return None here)."""

    def __getattr__(self, name):
        import triton.language as tl

        table = {
            "exp2": tl.exp2, "exp": tl.exp, "log": tl.log, "log2": tl.log2, "sqrt": tl.sqrt,
            "rsqrt": tl.rsqrt, "sin": tl.sin, "cos": tl.cos, "abs": tl.abs, "floor": tl.floor,
            "ceil": tl.ceil, "tanh": lambda x: 1.0 - 2.0 / (tl.exp(2.0 * x) + 1.0),
            "pow": lambda x, y: tl.exp2(y * tl.log2(x)),
            "isinf": lambda x: tl.abs(x) == float("inf"),
        }
        if name not in table:
            raise NotImplementedError(f"libdevice.{name} has no interpreter stand-in in this test")
        return table[name]


# Inductor's print of the hardware tanh (FAST_TANH); the interpreter has no PTX, so it runs tanh
_TANH_ASM = re.compile(r"tl\.inline_asm_elementwise\('tanh\.approx\.f32 \$0, \$1;', '=f,f', \[([^\]]+)\], "
                       r"dtype=tl\.float32, is_pure=True, pack=1\)")


def _interpreted(name, source, decorators):
    """Kernel ``name`` of Inductor's ``source`` as a Triton interpreter function: the named
    triton_heuristics decorators (autotuning launchers) replaced by no-ops while it loads."""
    from torch._inductor.runtime import triton_heuristics

    source = _TANH_ASM.sub(r"(1.0 - 2.0 / (tl.exp(2.0 * (\1)) + 1.0))", source)

    real = {k: getattr(triton_heuristics, k) for k in decorators}
    for k in decorators:
        setattr(triton_heuristics, k, lambda *a, **kw: (lambda fn: fn))
    try:
        module = load_module(source, True)
        if hasattr(module, "libdevice"):
            module.libdevice = InterpreterLibdevice()
        return getattr(module, name)
    finally:
        for k, f in real.items():
            setattr(triton_heuristics, k, f)


class InterpretedKernel:
    """Stands in for Inductor's compiled kernel: the same source, run by Triton's interpreter."""

    sources = []  # every source seen, for the sm_90 compile test

    def __init__(self, name, source):
        self.sources.append(source)
        self.fn = _interpreted(name, source, ("template",))
        self.source = source

    def run(self, *args, stream=None, **kwargs):
        n = len(self.fn.arg_names)
        grid = tuple(int(g) for g in args[n:n + 3])
        self.fn[grid](*args[:n])


class InterpretedInductorKernel:
    """Stands in for one of Inductor's own kernels (pointwise, reduction; e.g. the backward's
    delta): the same source run by Triton's interpreter, with fixed power-of-two block sizes."""

    BLOCKS = {"XBLOCK": 16, "YBLOCK": 16, "R0_BLOCK": 16, "RBLOCK": 16}

    def __init__(self, name, source):
        import re

        self.fn = _interpreted(name, source, ("pointwise", "reduction", "persistent_reduction"))
        self.axis = {m.group(1): int(m.group(2)) for m in re.finditer(r"(\w)offset = tl\.program_id\((\d)\)", source)}

    def run(self, *args, stream=None, **kwargs):
        params = [n for n in self.fn.arg_names if n not in self.BLOCKS]
        consts = {n: self.BLOCKS[n] for n in self.fn.arg_names if n in self.BLOCKS}
        values = dict(zip(params, args))
        grid = [1, 1, 1]
        for axis, pid in self.axis.items():
            block = consts.get(f"{axis.upper()}BLOCK", 1)
            grid[pid] = -(-int(values[f"{axis}numel"]) // block)
        self.fn[tuple(grid)](*args[:len(params)], **consts)
