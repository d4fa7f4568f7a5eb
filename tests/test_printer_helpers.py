"""The printer's shared Triton helpers (inductor_flex/printer.py HELPERS) run by Triton's interpreter
elementwise against float64 torch, and the mods that print through them: tanh near 0 (where its exp
form cancels) and pow of negative bases (exp2 / log2 of a negative number is NaN)."""
import importlib.util
import sys

import numpy as np
import pytest
import torch

from inductor_flex import flex_attention
from inductor_flex.printer import HELPERS

from test_backward_interpreter import check_backward

TRITON = {"BACKEND": "TRITON"}

_UNARY = '''
@triton.jit
def NAME_kernel(X, Y, N, BLOCK: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    x = tl.load(X + offs, mask=offs < N)
    tl.store(Y + offs, _NAME(x), mask=offs < N)
'''
_PROBE = "import triton\nimport triton.language as tl\n" + HELPERS + "".join(
    _UNARY.replace("NAME", name) for name in ("tanh", "expm1", "log1p")) + '''

@triton.jit
def pow_kernel(X, P, Y, N, BLOCK: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    x = tl.load(X + offs, mask=offs < N)
    p = tl.load(P + offs, mask=offs < N)
    tl.store(Y + offs, _pow(x, p), mask=offs < N)
'''


@pytest.fixture(scope="module")
def helpers(tmp_path_factory):
    path = tmp_path_factory.mktemp("helpers") / "printer_helpers_probe.py"
    path.write_text(_PROBE)
    spec = importlib.util.spec_from_file_location("printer_helpers_probe", path)
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod
    spec.loader.exec_module(mod)
    return mod


def _run(kernel, *inputs):
    out = torch.empty_like(inputs[0])
    n = out.numel()
    kernel[(triton_cdiv(n, 1024),)](*inputs, out, n, BLOCK=1024)
    return out


def triton_cdiv(a, b):
    return -(-a // b)


def _ulps(actual, exact):
    # errors in units of the float32 spacing at the exact value
    spacing = torch.from_numpy(np.spacing(exact.abs().float().numpy())).double()
    return (actual.double() - exact).abs() / spacing


def test_tanh_within_two_ulp_everywhere_and_half_an_ulp_near_zero(helpers):
    x = torch.cat([torch.linspace(-9.0, 9.0, 200001), torch.logspace(-7, 0, 20001), -torch.logspace(-7, 0, 20001),
                   torch.tensor([0.0, float("inf"), float("-inf")])])
    got = _run(helpers.tanh_kernel, x)
    exact = torch.tanh(x.double())
    ulps = _ulps(got, exact)
    assert ulps.max() <= 2.5, f"tanh: max error {ulps.max():.2f} ulp at x={x[ulps.argmax()].item()}"
    # the exp form alone was ~eps/|x| relative here (3e-4 at x = 1e-4)
    near0 = x.abs() < 0.55
    assert ulps[near0].max() <= 1.0, f"tanh near 0: {ulps[near0].max():.2f} ulp at x={x[near0][ulps[near0].argmax()].item()}"
    assert torch.isnan(_run(helpers.tanh_kernel, torch.tensor([float("nan")]))).all()


@pytest.mark.parametrize("name", ["expm1", "log1p"])
def test_expm1_log1p_within_two_ulp_and_exact_near_zero(helpers, name):
    x = torch.cat([torch.linspace(-0.99, 9.0, 200001), torch.logspace(-8, 0, 20001), -torch.logspace(-8, -0.01, 20001),
                   torch.tensor([0.0, float("inf")])])
    got = _run(getattr(helpers, f"{name}_kernel"), x)
    exact = getattr(torch, name)(x.double())
    assert got[-1] == float("inf")
    got, exact, x = got[:-1], exact[:-1], x[:-1]
    ulps = _ulps(got, exact)
    # exp(x) - 1 and log(1 + x) were ~eps/|x| relative near 0 (1e3 ulp at x = 1e-4); away from 0
    # the forms keep them, whose error in exp(x) or 1 + x lands on a smaller result (4.1 ulp at 1.05)
    assert ulps.max() <= 5.0, f"{name}: max error {ulps.max():.2f} ulp at x={x[ulps.argmax()].item()}"
    near0 = x.abs() < 0.5
    assert ulps[near0].max() <= 2.0, f"{name} near 0: {ulps[near0].max():.2f} ulp"
    edges = torch.tensor([float("-inf")]) if name == "expm1" else torch.tensor([-1.0, -2.0])
    got = _run(getattr(helpers, f"{name}_kernel"), edges)
    assert torch.equal(got.isnan(), getattr(torch, name)(edges).isnan())
    assert torch.equal(got.nan_to_num(0.0), getattr(torch, name)(edges).nan_to_num(0.0))


def test_pow_follows_torch_for_negative_bases_and_any_exponent(helpers):
    base = torch.tensor([-2.5, -2.0, -1.0, -0.5, 0.0, 0.5, 1.0, 3.0])
    expo = torch.tensor([3.0, 2.0, -1.0, -2.0, 0.0, 0.5, 2.5, -3.0, 7.0])
    x, p = (t.flatten().contiguous() for t in torch.meshgrid(base, expo, indexing="ij"))
    got = _run(helpers.pow_kernel, x, p)
    exact = torch.pow(x.double(), p.double())
    assert torch.equal(torch.isnan(got), torch.isnan(exact)), "pow: NaN pattern differs from torch"
    fin = torch.isfinite(exact)
    assert torch.equal(torch.isfinite(got), fin)
    assert torch.equal(got[~fin & ~exact.isnan()], exact[~fin & ~exact.isnan()].float())
    rel = ((got.double() - exact) / exact.abs().clamp_min(1e-30))[fin & (exact != 0)].abs()
    assert rel.max() <= 1e-6, f"pow: relative error {rel.max():.2e}"


def _cube(temp):
    # an odd power of a negative-ish quantity, with a learnable temperature: autograd's backward
    # of x ** 3 is 3 * x ** 2.0, a float exponent of a negative base
    def score_pow3(score, b, h, q_idx, kv_idx):
        return score + (score / temp) ** 3
    return score_pow3


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
def test_odd_power_of_negative_scores_backward(dtype):
    check_backward((1, 2, 2, 37, 29, 16, 16), dtype, _cube, None, [torch.tensor(2.0)], draws=3)


@pytest.mark.parametrize("exponent", [3.0, -1.0, 2.5, "int_tensor"], ids=["float3", "minus1", "fractional", "int_tensor"])
def test_float_exponents_of_negative_bases_forward(exponent):
    q, k, v = (torch.randn(1, 2, 21, 16) for _ in range(3))
    per_head = torch.tensor([2, 3])

    def score_mod(score, b, h, q_idx, kv_idx):
        # shifted so some bases are negative: NaN for the fractional exponent, as torch gives
        return score + 0.01 * (score - 0.5) ** (per_head[h] if exponent == "int_tensor" else exponent)

    from inductor_flex.reference import math_attention

    got = flex_attention(q, k, v, score_mod=score_mod, kernel_options=TRITON)
    ref = math_attention(q.double(), k.double(), v.double(), score_mod)[0]
    assert torch.equal(torch.isnan(got), torch.isnan(ref))
    if exponent != 2.5:
        assert not torch.isnan(got).any()
        assert (got.double() - ref).abs().max() < 1e-4
