"""Shared test setup: interpreter mode on CPU machines, the float64 reference and the criterion."""
import os

import torch

if not torch.cuda.is_available():
    # must happen before triton is imported: @triton.jit picks the interpreter at decoration time
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

from inductor_flex.reference import math_attention  # noqa: E402

HAS_CUDA = torch.cuda.is_available()


def pytest_configure(config):
    config.addinivalue_line("markers", "gpu: needs a CUDA GPU (run on the H100 with -m gpu)")
    config.addinivalue_line("markers", "slow: long-running")


def reference64(q, k, v, score_mod=None, block_mask=None, scale=None, block_mask64=None):
    """The float64 oracle: the math path on float64 copies (GQA handled inside)."""
    bm = block_mask
    return math_attention(q.double(), k.double(), v.double(), score_mod, bm, scale)


def reference_same_dtype(q, k, v, score_mod=None, block_mask=None, scale=None):
    return math_attention(q, k, v, score_mod, block_mask, scale)


def assert_close_to_reference(actual, ref64, ref_lowp, dtype, name="out"):
    """DEVELOPERS.md criterion, as PyTorch's flex tests apply it: the mean absolute error vs float64
    is <= 1.1x (fp16/bf16) or 10x (fp32) that of a same-dtype math reference (plus a tiny floor
    for exact-zero reference errors). The worst element must also stay within 3x (10x for fp32)
    of the reference's worst, so an error confined to a few rows cannot hide in the mean."""
    factor = 10.0 if dtype == torch.float32 else 1.1
    max_factor = 10.0 if dtype == torch.float32 else 3.0
    finite = torch.isfinite(ref64)
    assert torch.equal(torch.isfinite(actual.double()), finite), f"{name}: inf/NaN pattern differs from the reference"
    if not finite.any():
        return 0.0, 0.0
    diff = (actual.double() - ref64)[finite].abs()
    ref_diff = (ref_lowp.double() - ref64)[finite].abs()
    floor = 1e-6 if dtype == torch.float32 else 1e-5
    err, ref_err = diff.mean().item(), ref_diff.mean().item()
    assert err <= factor * ref_err + floor, (
        f"{name}: mean error {err:.3e} > {factor} x reference mean error {ref_err:.3e} (+{floor})")
    worst, ref_worst = diff.max().item(), ref_diff.max().item()
    assert worst <= max_factor * ref_worst + floor, (
        f"{name}: max error {worst:.3e} > {max_factor} x reference max error {ref_worst:.3e} (+{floor})")
    return err, ref_err


def assert_grads_close(q, k, v, grads, grad_out, score_mod, block_mask, dtype):
    """(dq, dk, dv) against the float64 reference's gradients for ``grad_out``, the same-dtype math
    path's gradients being the error yardstick."""
    leaves64 = [t.detach().double().requires_grad_(True) for t in (q, k, v)]
    ref = torch.autograd.grad(math_attention(*leaves64, score_mod, block_mask)[0], leaves64, grad_out.double())
    leaves = [t.detach().requires_grad_(True) for t in (q, k, v)]
    low = torch.autograd.grad(math_attention(*leaves, score_mod, block_mask)[0], leaves, grad_out)
    for name, a, r, lo in zip(("dq", "dk", "dv"), grads, ref, low):
        assert_close_to_reference(a, r, lo, dtype, name)


def compile_counter(backend="inductor"):
    """A fresh Dynamo state and a counter of the frames compiled with ``backend``."""
    import torch._dynamo
    import torch._dynamo.testing

    torch._dynamo.reset()
    return torch._dynamo.testing.CompileCounterWithBackend(backend)


def check_dynamic_lengths(call, score_mod, shape_of, dtype, in_code, lengths=(40, 57)):
    """torch.compile(call, dynamic=True), call(q, k, v) -> (out, lse) by flex_attention with
    ``score_mod``, on CPU inputs of shape_of(L) for each length: ``in_code`` is in the first
    compile's output code, out and lse match float64, and the later lengths reuse the one frame."""
    from torch._inductor.utils import run_and_get_code

    from cases import make_inputs

    cnt = compile_counter("inductor")
    fn = torch.compile(call, backend=cnt, fullgraph=True, dynamic=True)
    for i, L in enumerate(lengths):
        q, k, v = make_inputs(shape_of(L), dtype, "cpu")
        if i == 0:
            (out, lse), code = run_and_get_code(fn, q, k, v)
            assert in_code in "\n".join(code)
        else:
            out, lse = fn(q, k, v)
        ref_out, ref_lse, _ = reference64(q, k, v, score_mod, None)
        low_out, low_lse, _ = reference_same_dtype(q, k, v, score_mod, None)
        assert_close_to_reference(out, ref_out, low_out, dtype, "out")
        assert_close_to_reference(lse, ref_lse, low_lse, dtype, "lse")
    assert cnt.frame_count == 1


def record_calls(monkeypatch, module, name, record=lambda *args, **kwargs: None):
    """Wrap ``module.name`` for the test: each call appends ``record(*args, **kwargs)`` to the
    returned list, then runs the real function."""
    calls = []
    real = getattr(module, name)

    def spy(*args, **kwargs):
        calls.append(record(*args, **kwargs))
        return real(*args, **kwargs)

    monkeypatch.setattr(module, name, spy)
    return calls


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture
def interpreted_inductor(monkeypatch):
    """Inductor with its Triton CPU backend, the flex templates enabled on CPU, and every kernel it
    generates run by Triton's interpreter (tests/inductor_interpreter.py)."""
    import torch._inductor.config as config
    import torch.utils._triton as torch_triton
    from torch._inductor.async_compile import AsyncCompile

    from inductor_flex.lowering import template
    from inductor_interpreter import InterpretedInductorKernel, InterpretedKernel

    def triton(self, kernel_name, source_code, device_str="cuda"):
        if "@triton_heuristics.template(" in source_code:  # a flex template kernel
            return InterpretedKernel(kernel_name, source_code)
        return InterpretedInductorKernel(kernel_name, source_code)

    monkeypatch.setattr(template, "DEVICES", ("cuda", "cpu"))
    monkeypatch.setattr(torch_triton, "triton_hash_with_backend", lambda: "triton-interpreter")
    monkeypatch.setattr(AsyncCompile, "triton", triton)
    with config.patch(cpu_backend="triton", fx_graph_cache=False):
        yield
