"""Property tests of the FX -> Triton printer (inductor_flex/printer.py): random score_mod / mask_mod
programs x random shapes, the printed kernels run by Triton's interpreter against the float64 math
path, forward and backward (the backward also prints the score_mod's joint graph). The same random
programs also go through torch.compile, where Inductor lowers them into the same templates
(lowering/template.py, lowering/backward.py) and the interpreter runs what Inductor generated.

A program is a small expression tree over the mods' arguments: integer arithmetic on the indices
(floor division and modulo by constants, with negative operands, which Triton's C-style `//` and
`%` do not follow on their own), comparisons and boolean algebra for masks, and float arithmetic,
transcendental functions, powers of either sign, `where`, and a captured table read at a computed index for score_mods."""
import pytest
import torch
from hypothesis import HealthCheck, example, given, settings, strategies as st

from inductor_flex import create_block_mask, flex_attention
from inductor_flex.reference import math_attention

from conftest import assert_close_to_reference, assert_grads_close, compile_counter
from test_backward_interpreter import check_backward

TRITON = {"BACKEND": "TRITON"}
TABLE = 11  # entries of the captured table; reads wrap with a Python-style modulo

# ---- programs: expression trees, and Python callables that evaluate them with torch ops -------
_ints = st.recursive(
    st.one_of(st.sampled_from(["q_idx", "kv_idx", "h", "b"]), st.tuples(st.just("const"), st.integers(-6, 6))),
    lambda sub: st.one_of(
        st.tuples(st.sampled_from(["add", "sub", "min", "max"]), sub, sub),
        st.tuples(st.sampled_from(["floordiv", "mod", "mul"]), sub, st.integers(1, 7)),
        st.tuples(st.just("abs"), sub),
    ),
    max_leaves=5,
)
_bools = st.recursive(
    st.tuples(st.sampled_from(["lt", "le", "ge", "eq", "ne"]), _ints, _ints),
    lambda sub: st.one_of(st.tuples(st.sampled_from(["and", "or"]), sub, sub), st.tuples(st.just("not"), sub)),
    max_leaves=3,
)
_floats = st.recursive(
    st.one_of(st.just("score"), st.tuples(st.just("float"), _ints), st.tuples(st.just("table"), _ints)),
    lambda sub: st.one_of(
        st.tuples(st.sampled_from(["fadd", "fsub", "fmax", "fmin"]), sub, sub),
        st.tuples(st.just("fmul"), sub, st.floats(-2.0, 2.0, allow_nan=False).map(lambda c: round(c, 3))),
        st.tuples(st.sampled_from(["tanh", "sigmoid", "fabs", "sin", "expm1"]), sub),
        # integer and integral float exponents of any sign of base (autograd writes x ** 2.0)
        st.tuples(st.just("pow"), sub, st.sampled_from([2, 3, 2.0, 3.0])),
        st.tuples(st.just("where"), _bools, sub, sub),
    ),
    max_leaves=6,
)


def _eval(node, env):
    if isinstance(node, str):
        return env[node]
    op, *args = node
    if op == "const":
        return env["q_idx"] * 0 + args[0]  # a tensor, like every other integer value
    if op == "float":
        # integer -> float: a small slope keeps scores in softmax's comfortable range
        return _eval(args[0], env) * 0.1
    if op == "table":
        return env["table"][_eval(args[0], env) % TABLE]
    a = _eval(args[0], env)
    if op in ("floordiv", "mod", "mul", "fmul"):
        c = args[1]
        return {"floordiv": lambda: a // c, "mod": lambda: a % c, "mul": lambda: a * c, "fmul": lambda: a * c}[op]()
    if op in ("abs", "fabs"):
        return a.abs()
    if op in ("tanh", "sigmoid", "sin", "expm1"):
        return getattr(torch, op)(a)
    if op == "pow":
        return a ** args[1]
    if op == "not":
        return torch.logical_not(a)
    if op == "where":
        return torch.where(a, _eval(args[1], env), _eval(args[2], env))
    b = _eval(args[1], env)
    fn = {
        "add": torch.add, "fadd": torch.add, "sub": torch.sub, "fsub": torch.sub, "min": torch.minimum,
        "max": torch.maximum, "fmin": torch.minimum, "fmax": torch.maximum, "lt": torch.lt, "le": torch.le,
        "ge": torch.ge, "eq": torch.eq, "ne": torch.ne, "and": torch.logical_and, "or": torch.logical_or,
    }[op]
    return fn(a, b)


def score_mod_of(tree, table):
    def score_mod(score, b, h, q_idx, kv_idx):
        env = dict(score=score, b=b, h=h, q_idx=q_idx, kv_idx=kv_idx, table=table)
        return score + 0.5 * _eval(tree, env).to(score.dtype)

    score_mod.__name__ = f"random_score_{abs(hash(repr(tree))) % 10**8}"
    return score_mod


def mask_mod_of(tree):
    def mask_mod(b, h, q_idx, kv_idx):
        # a band of up to 3 keys keeps most rows non-empty; the random part decides the rest. (A
        # diagonal alone, when the random part is all False, leaves one key per row: every gradient
        # of the scores is then exactly 0 in the math path and ~1e-6 of rounding in a kernel,
        # which no error ratio can compare.)
        band = (kv_idx <= q_idx) & (kv_idx >= q_idx - 2)
        return band | _eval(tree, dict(b=b, h=h, q_idx=q_idx, kv_idx=kv_idx))

    mask_mod.__name__ = f"random_mask_{abs(hash(repr(tree))) % 10**8}"
    return mask_mod


_shapes = st.tuples(
    st.integers(1, 2), st.integers(1, 2), st.integers(1, 2),   # B, Hkv, GQA group
    st.integers(1, 40), st.integers(1, 40),                    # Lq, Lkv
    st.sampled_from([8, 16, 24]), st.sampled_from([8, 16]),    # E, Ev
)
_SETTINGS = dict(deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow])


def _case(shape, score_tree, mask_tree, device="cpu"):
    B, Hkv, G, Lq, Lkv, E, Ev = shape
    table = torch.randn(TABLE, device=device)
    score_mod = score_mod_of(score_tree, table) if score_tree is not None else None
    block_mask = (create_block_mask(mask_mod_of(mask_tree), B, Hkv * G, Lq, Lkv, device=device, BLOCK_SIZE=16)
                  if mask_tree is not None else None)
    return (B, Hkv * G, Hkv, Lq, Lkv, E, Ev), score_mod, block_mask


# negative operands of // and % (Python floors, C truncates), and a table read at a negative index
_NEGATIVE_DIV = ("fadd", ("float", ("floordiv", ("sub", "kv_idx", "q_idx"), 3)), ("table", ("sub", "kv_idx", "q_idx")))
_NEGATIVE_MOD = ("eq", ("mod", ("sub", "kv_idx", "q_idx"), 4), ("const", 1))


@settings(max_examples=40, **_SETTINGS)
@given(shape=_shapes, score_tree=st.one_of(st.none(), _floats), mask_tree=st.one_of(st.none(), _bools))
@example(shape=(1, 1, 2, 37, 29, 16, 8), score_tree=_NEGATIVE_DIV, mask_tree=_NEGATIVE_MOD)
def test_random_programs_forward(shape, score_tree, mask_tree):
    full, score_mod, block_mask = _case(shape, score_tree, mask_tree)
    B, Hq, Hkv, Lq, Lkv, E, Ev = full
    q = torch.randn(B, Hq, Lq, E)
    k = torch.randn(B, Hkv, Lkv, E)
    v = torch.randn(B, Hkv, Lkv, Ev)
    out, lse = flex_attention(q, k, v, score_mod=score_mod, block_mask=block_mask, enable_gqa=Hq != Hkv,
                              return_lse=True, kernel_options=TRITON)
    ref_out, ref_lse, _ = math_attention(q.double(), k.double(), v.double(), score_mod, block_mask)
    low_out, low_lse, _ = math_attention(q, k, v, score_mod, block_mask)
    assert not torch.isnan(out).any() and not torch.isnan(lse).any()
    assert_close_to_reference(out, ref_out, low_out, torch.float32, "out")
    assert_close_to_reference(lse, ref_lse, low_lse, torch.float32, "lse")


@settings(max_examples=15, **_SETTINGS)
@given(shape=_shapes, score_tree=_floats, mask_tree=st.one_of(st.none(), _bools))
@example(shape=(1, 1, 2, 37, 29, 16, 8), score_tree=_NEGATIVE_DIV, mask_tree=_NEGATIVE_MOD)
def test_random_programs_backward(shape, score_tree, mask_tree):
    full, score_mod, block_mask = _case(shape, score_tree, mask_tree)
    check_backward(full, torch.float32, score_mod, block_mask)


def test_programs_are_printed_not_sent_to_the_math_path(monkeypatch):
    # the property tests above would pass vacuously if BACKEND "TRITON" quietly ran the math path
    import inductor_flex.attention as attention

    def boom(*a, **k):
        raise AssertionError("math path called")

    monkeypatch.setattr(attention, "math_attention", boom)
    tree = ("where", ("lt", ("floordiv", ("sub", "q_idx", "kv_idx"), 3), ("const", -1)),
            ("tanh", "score"), ("table", ("mod", "kv_idx", 4)))
    full, score_mod, block_mask = _case((1, 1, 2, 21, 19, 16, 8), tree, ("ge", ("mod", "q_idx", 5), ("const", 2)))
    B, Hq, Hkv, Lq, Lkv, E, Ev = full
    out = flex_attention(torch.randn(B, Hq, Lq, E), torch.randn(B, Hkv, Lkv, E), torch.randn(B, Hkv, Lkv, Ev),
                         score_mod=score_mod, block_mask=block_mask, enable_gqa=True, kernel_options=TRITON)
    assert out.shape == (B, Hq, Lq, Ev)


@settings(max_examples=5, deadline=None, derandomize=True,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
@given(shape=_shapes.filter(lambda s: s[3] > 16), score_tree=_floats, mask_tree=st.one_of(st.none(), _bools))
@example(shape=(1, 1, 2, 37, 29, 16, 8), score_tree=_NEGATIVE_DIV, mask_tree=_NEGATIVE_MOD)
def test_random_programs_compiled(interpreted_inductor, shape, score_tree, mask_tree):
    from torch._inductor.utils import run_and_get_code

    full, score_mod, block_mask = _case(shape, score_tree, mask_tree)
    B, Hq, Hkv, Lq, Lkv, E, Ev = full
    q, k, v = (t.requires_grad_() for t in (torch.randn(B, Hq, Lq, E), torch.randn(B, Hkv, Lkv, E),
                                             torch.randn(B, Hkv, Lkv, Ev)))
    g = torch.randn(B, Hq, Lq, Ev)
    cnt = compile_counter("inductor")
    fn = torch.compile(lambda q, k, v: flex_attention(q, k, v, score_mod=score_mod, block_mask=block_mask,
                                                      enable_gqa=Hq != Hkv), backend=cnt, fullgraph=True)

    def step():
        out = fn(q, k, v)
        return out, torch.autograd.grad(out, (q, k, v), g)

    (out, grads), code = run_and_get_code(step)
    code = "\n".join(code)
    assert cnt.frame_count == 1
    # Inductor's own template kernels ran, with the mods lowered into them
    assert "_attn_fwd_inner" in code and "_bwd_dkdv_inner" in code and "_bwd_dq_inner" in code
    ref, _, _ = math_attention(q.double(), k.double(), v.double(), score_mod, block_mask)
    low, _, _ = math_attention(q.detach(), k.detach(), v.detach(), score_mod, block_mask)
    assert_close_to_reference(out.detach(), ref.detach(), low, torch.float32, "out")
    assert_grads_close(q, k, v, grads, g, score_mod, block_mask, torch.float32)


@pytest.mark.parametrize("tile_float_form", [False, True], ids=["int_tile", "float_vectors"])
def test_index_tile_forms_agree(monkeypatch, tile_float_form):
    # printer.TILE_FLOAT_FORM: ALiBi's kv_idx - q_idx as an integer tile converted per score (the
    # default) or as a float subtract of the converted index vectors; both match float64
    from inductor_flex import printer
    from inductor_flex.printer import print_mod

    monkeypatch.setattr(printer, "TILE_FLOAT_FORM", tile_float_form)

    def alibi(score, b, h, q_idx, kv_idx):  # a fresh function: printed under this setting
        return score + torch.exp2(-8.0 * (h + 1) / 4) * (kv_idx - q_idx)

    src = print_mod(alibi, "score_mod", torch.device("cpu")).source
    scaled = src[src.index("def score_mod_scaled"):]
    assert ("kv_idx.to(tl.float32) - q_idx.to(tl.float32)" in scaled) == tile_float_form
    q, k, v = (torch.randn(1, 4, 37, 16) for _ in range(3))
    out = flex_attention(q, k, v, score_mod=alibi, kernel_options=TRITON)
    ref, _, _ = math_attention(q.double(), k.double(), v.double(), alibi, None)
    low, _, _ = math_attention(q, k, v, alibi, None)
    assert_close_to_reference(out, ref, low, torch.float32, "out")


# ---- packed segments: the one-loop walk of rows that are one run only together, and gathers --------
# through captured ids that may be negative (printer.nonneg_flag)
@settings(max_examples=8, **_SETTINGS)
@given(L=st.integers(40, 160), cuts=st.lists(st.integers(1, 159), max_size=5),
       first_id=st.integers(-3, 1), windows=st.lists(st.integers(1, 90), min_size=7, max_size=7),
       lq_short=st.booleans())
@example(L=150, cuts=[40, 97], first_id=-1, windows=[70, 20, 200, 5, 33, 64, 9], lq_short=False)
def test_random_segmented_masks(L, cuts, first_id, windows, lq_short):
    """Causal attention inside packed segments with a per-segment window read through the
    segment's id: ``(seg[q] == seg[kv]) & (kv <= q) & (q - kv < width[seg[q]])``. Segment ids start
    at a random value, negative ones included, so the gather wraps exactly where PyTorch's indexing
    does. Rows list a partial block where their segment (or window) starts, full blocks, then the
    partial diagonal: the kernels walk them in one loop (forward, dQ and dK/dV). Forward and
    gradients against the float64 math path."""
    from inductor_flex import kernel as K

    Lq = L - 17 if lq_short else L
    seg = torch.zeros(L, dtype=torch.int64)
    for c in cuts:
        seg[c % L:] += 1
    seg += first_id
    width = torch.tensor(windows)  # seg values in [-3, 6]: negative ones read from the end

    def segmented(b, h, q_idx, kv_idx):
        same = seg[q_idx] == seg[kv_idx]
        return same & (kv_idx <= q_idx) & (q_idx - kv_idx < width[seg[q_idx]])

    block_mask = create_block_mask(segmented, None, None, Lq, L, device="cpu", BLOCK_SIZE=16)
    shape = (1, 2, 1, Lq, L, 16, 8)
    q = torch.randn(1, 2, Lq, 16)
    k, v = torch.randn(1, 1, L, 16), torch.randn(1, 1, L, 8)
    out, lse = flex_attention(q, k, v, block_mask=block_mask, enable_gqa=True, return_lse=True,
                              kernel_options=TRITON)
    ref_out, ref_lse, _ = math_attention(q.double(), k.double(), v.double(), None, block_mask)
    low_out, low_lse, _ = math_attention(q, k, v, None, block_mask)
    assert_close_to_reference(out, ref_out, low_out, torch.float32, "out")
    assert_close_to_reference(lse, ref_lse, low_lse, torch.float32, "lse")
    check_backward(shape, torch.float32, None, block_mask)
    plan = K.cached_plan(q, k, v, None, block_mask, None, dict(TRITON))
    assert plan.mask.index_sources  # seg's values index width: the flag is passed
    if (L, cuts, first_id) == (150, [40, 97], -1):  # the example: both sides walk the union
        assert K.plan_union_walk(plan, "kv") and K.plan_union_walk(plan, "q")
