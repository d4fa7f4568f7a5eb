"""The fused backward kernels inside compiled graphs: with the eager-style backends (aot_eager) the
backward HOP runs them directly; under Inductor the backward is one ``inductor_flex::flex_backward``
op whose kernels were rendered at trace time. Interpreter on CPU (BACKEND "TRITON") vs float64."""
import pytest
import torch

import inductor_flex.backward as backward_mod
from inductor_flex import flex_attention
from inductor_flex.reference import math_attention

from cases import LEARNABLE, LEARNABLE_LEN as L, SHAPES, make_inputs, make_variant
from conftest import assert_close_to_reference, compile_counter, record_calls

TRITON = {"BACKEND": "TRITON"}


@pytest.fixture
def backward_calls(monkeypatch):
    return record_calls(monkeypatch, backward_mod, "run_backward")


def _grads(fn, q, k, v, caps, g):
    out = fn(q, k, v, *caps)
    return torch.autograd.grad(out, (q, k, v, *caps), g)


@pytest.mark.parametrize("backend", ["aot_eager", "inductor"])
@pytest.mark.parametrize("variant", ["causal", "document", "softcap", "relative_bias", "empty_rows"])
def test_compiled_backward_runs_fused_kernels(variant, backend, backward_calls):
    shape = SHAPES["gqa4x2_E64_Ev32"]
    B, Hq, Hkv, Lq, Lkv, E, Ev = shape
    score_mod, block_mask = make_variant(variant, Lq, Lkv, Hq, "cpu")

    def attn(q, k, v):
        return flex_attention(q, k, v, score_mod=score_mod, block_mask=block_mask, enable_gqa=True,
                              kernel_options=TRITON)

    cnt = compile_counter(backend)
    compiled = torch.compile(attn, backend=cnt, fullgraph=True)
    q, k, v = make_inputs(shape, torch.float32, "cpu", requires_grad=True)
    g = torch.randn(B, Hq, Lq, Ev)
    got = _grads(compiled, q, k, v, [], g)
    assert cnt.frame_count == 1 and len(backward_calls) == 1
    ref = _grads(lambda *a: math_attention(*(t.double() for t in a), score_mod, block_mask)[0], q, k, v, [], g.double())
    low = _grads(lambda *a: math_attention(*a, score_mod, block_mask)[0], q, k, v, [], g)
    for name, a, r, lo in zip(("dq", "dk", "dv"), got, ref, low):
        assert_close_to_reference(a, r, lo, torch.float32, name)


@pytest.mark.parametrize("backend", ["aot_eager", "inductor"])
@pytest.mark.parametrize("name", ["relative_bias_table", "two_reads_repeated", "temperature_softcap"])
def test_compiled_captured_tensor_gradients_in_kernel(name, backend, backward_calls):
    factory, make = LEARNABLE[name]
    shape = (1, 4, 2, L, L, 32, 32)
    caps = [c.requires_grad_() for c in make(4)]

    def attn(q, k, v, *caps):
        return flex_attention(q, k, v, score_mod=factory(*caps), enable_gqa=True, kernel_options=TRITON)

    torch._dynamo.reset()
    compiled = torch.compile(attn, backend=backend, fullgraph=True)
    # pooled over 3 draws, as check_backward(draws=...): a 0-d temperature's gradient is one sum
    # over every score, and one draw's error against the same-dtype reference's is a coin toss
    # (1.4e-6 against 2.0e-7 on the first draw, while the kernel with a float64 tanh makes 9.4e-7)
    draws = []
    for _ in range(3):
        q, k, v = make_inputs(shape, torch.float32, "cpu", requires_grad=True)
        g = torch.randn(1, 4, L, 32)
        got = _grads(compiled, q, k, v, caps, g)
        r = [t.detach().double().requires_grad_() for t in (q, k, v, *caps)]
        ref = _grads(lambda q, k, v, *c: math_attention(q, k, v, factory(*c))[0], r[0], r[1], r[2], r[3:], g.double())
        low = _grads(lambda q, k, v, *c: math_attention(q, k, v, factory(*c))[0], q, k, v, caps, g)
        draws.append((got, ref, low))
    assert len(backward_calls) == 3
    for i in range(len(draws[0][0])):
        a, r, lo = (torch.cat([d[side][i].flatten() for d in draws]) for side in range(3))
        assert_close_to_reference(a, r, lo, torch.float32, f"grad {i}")
