"""inductor_flex/joint_graph.py: the rewrites of a score_mod's joint graph that the backward kernels
print (eager) or lower (Inductor) — values unchanged, instructions saved."""
import pytest
import torch
from torch.fx.experimental.proxy_tensor import make_fx

from inductor_flex import variants as V
from inductor_flex.hop import joint_function
from inductor_flex.joint_graph import derivative_is_bounded, fold_constant_factors
from inductor_flex.mods import TensorIndexMode

aten = torch.ops.aten
TABLE = torch.randn(4, 9)


def joint_graph(score_mod):
    """The joint graph as the eager printer traces it (captured tensors become constants)."""
    args = [torch.zeros(()), *(torch.zeros((), dtype=torch.int32) for _ in range(4)), torch.ones(())]
    with TensorIndexMode():
        gm = make_fx(joint_function(score_mod))(*args)
    gm.graph.eliminate_dead_code()
    gm.recompile()
    return gm


def random_inputs(n=257, seed=0):
    g = torch.Generator().manual_seed(seed)
    score = torch.randn(n, generator=g) * 8
    ints = [torch.randint(0, 4, (n,), generator=g, dtype=torch.int32) for _ in range(2)]
    q, kv = (torch.randint(0, 5, (n,), generator=g, dtype=torch.int32) for _ in range(2))
    grad = torch.randn(n, generator=g)
    grad[::5] = 0.0  # masked scores
    return score, *ints, q, kv, grad


MODS = {
    "softcap": V.generate_tanh_softcap(30.0),
    "alibi": V.generate_alibi_bias(4),
    "constants": lambda s, b, h, q, kv: s * 2.0 * (q - kv) / 4.0 - s / 3.0,
    "zero_factor": lambda s, b, h, q, kv: torch.tanh(s * 0.0) + s * 0.5 * 4.0,
    "sigmoid": lambda s, b, h, q, kv: 3.0 * torch.sigmoid(-s / 7.0),
    "captured": lambda s, b, h, q, kv: s * TABLE[h, kv] * 0.5 - torch.tanh(s * TABLE[b, q] / 4.0),
}


@pytest.mark.parametrize("name", list(MODS))
def test_folding_keeps_every_gradient(name):
    gm = joint_graph(MODS[name])
    folded = fold_constant_factors(gm)
    x = random_inputs()
    torch.testing.assert_close(folded(*x)[0], gm(*x)[0], rtol=1e-6, atol=1e-6)


def _constant_products(gm):
    return [n for n in gm.graph.nodes if n.op == "call_function" and n.target in (aten.mul.Tensor, aten.div.Tensor)
            and not all(isinstance(a, torch.fx.Node) for a in n.args)]


def test_softcap_factors_cancel():
    # autograd's tanh_backward(grad * cap, t) / cap: only the forward's score / cap is left
    gm = fold_constant_factors(joint_graph(V.generate_tanh_softcap(30.0)))
    consts = _constant_products(gm)
    assert len(consts) == 1 and consts[0].target is aten.div.Tensor and consts[0].args[1] == 30.0
    assert len(_constant_products(joint_graph(V.generate_tanh_softcap(30.0)))) == 3  # before: score / cap, grad * cap, / cap


@pytest.mark.parametrize("mod,bounded", [
    (V.generate_alibi_bias(4), True),
    (V.generate_tanh_softcap(20.0), True),
    (V.generate_relative_bias(TABLE), True),  # the table's gradient reads it, d score does not
    (lambda s, b, h, q, kv: s * s / 2.0 + torch.where(q >= kv, s, -s), True),
    (lambda s, b, h, q, kv: torch.sqrt(s.abs()), False),  # inf at 0
    (lambda s, b, h, q, kv: s / (kv - q + 0.5), False),  # divides by a value
    (lambda s, b, h, q, kv: torch.exp(s), False),
    (lambda s, b, h, q, kv: s * TABLE[h, kv], False),  # a table entry may be inf
], ids=["alibi", "softcap", "relative_bias", "polynomial_where", "sqrt", "divide_by_value", "exp", "table_factor"])
def test_derivative_bounded(mod, bounded):
    assert derivative_is_bounded(fold_constant_factors(joint_graph(mod))) is bounded


@pytest.mark.parametrize("mod,linear", [
    (V.generate_tanh_softcap(20.0), True),
    (V.generate_alibi_bias(2), True),
    (lambda s, b, h, q, kv: torch.sqrt(s.abs()), False),
], ids=["softcap", "alibi", "sqrt"])
def test_backward_kernels_take_a_bounded_derivative_into_p(mod, linear):
    # a bounded derivative is grad * J(score): the rendered backward multiplies P by J before its dots
    from inductor_flex.backward import BackwardPlan
    from inductor_flex.kernel import cached_plan
    from inductor_flex.validation import validate_kernel_options

    q, k, v = (torch.randn(1, 2, 32, 16) for _ in range(3))
    opts = validate_kernel_options({"BACKEND": "TRITON"})
    plan = cached_plan(q, k, v, mod, None, None, opts)
    source = BackwardPlan(plan, mod, (), opts).source
    assert source.count(f"LINEAR_GRAD: tl.constexpr = {linear}") == 2


def _mod_graph(score_mod):
    args = [torch.zeros(()), *(torch.zeros((), dtype=torch.int32) for _ in range(4))]
    with TensorIndexMode():
        return make_fx(score_mod)(*args)


@pytest.mark.parametrize("name", list(MODS) + ["identity", "negative_factor"])
@pytest.mark.parametrize("scale", [0.125, -0.3])
def test_prescale_takes_raw_scores(name, scale):
    # what the Inductor lowering hands the templates: gm(qk * scale) == gm'(qk) * c, c > 0
    from inductor_flex.joint_graph import prescale

    mod = {"identity": lambda s, b, h, q, kv: s, "negative_factor": lambda s, b, h, q, kv: torch.tanh(s) * -2.0
           }.get(name) or MODS[name]
    gm = _mod_graph(mod)
    pre, c = prescale(gm, scale, strip_factor=True)
    assert c > 0
    score, b, h, q, kv, _ = random_inputs()
    torch.testing.assert_close(pre(score, b, h, q, kv) * c, gm(score * scale, b, h, q, kv), rtol=1e-6, atol=1e-6)


def test_prescaled_softcap_is_one_multiply_and_a_tanh():
    from inductor_flex.joint_graph import prescale

    pre, c = prescale(_mod_graph(V.generate_tanh_softcap(30.0)), 0.125, strip_factor=True)
    ops = [n.target for n in pre.graph.nodes if n.op == "call_function"]
    assert c == 30.0 and ops == [aten.div.Tensor, aten.tanh.default]
