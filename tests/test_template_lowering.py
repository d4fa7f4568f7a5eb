"""The forward template lowered by Inductor (lowering/template.py), on CPU.

Inductor renders templates/flex_forward.py.jinja with the mods lowered into its hooks; here the
graph's Triton kernels come from Inductor's Triton CPU backend and run in Triton's interpreter
(the `interpreted_inductor` fixture swaps Inductor's kernel loader for one that does that), so CI
checks the numerics of the very source Inductor generates. The GPU suite runs the same on CUDA."""
import pytest
import torch

from inductor_flex import flex_attention
from inductor_flex.kernel import load_module
from inductor_flex.lowering import template

from cases import SHAPES, make_inputs, make_variant
from conftest import (assert_close_to_reference, assert_grads_close, compile_counter, reference64,
                      reference_same_dtype)


class _InterpreterLibdevice:
    """libdevice as Triton's interpreter can run it (its own libdevice calls return None here)."""

    def __getattr__(self, name):
        import triton.language as tl

        table = {
            "exp2": tl.exp2, "exp": tl.exp, "log": tl.log, "log2": tl.log2, "sqrt": tl.sqrt,
            "rsqrt": tl.rsqrt, "sin": tl.sin, "cos": tl.cos, "abs": tl.abs, "floor": tl.floor,
            "ceil": tl.ceil, "tanh": lambda x: 1.0 - 2.0 / (tl.exp(2.0 * x) + 1.0),
            "pow": lambda x, y: tl.exp2(y * tl.log2(x)),
        }
        if name not in table:
            raise NotImplementedError(f"libdevice.{name} has no interpreter stand-in in this test")
        return table[name]


class _InterpretedKernel:
    """Stands in for Inductor's compiled kernel: the same source, run by Triton's interpreter."""

    sources = []  # every source seen, for the sm_90 compile test

    def __init__(self, name, source):
        self.sources.append(source)
        from torch._inductor.runtime import triton_heuristics

        real = triton_heuristics.template
        triton_heuristics.template = lambda *a, **k: (lambda fn: fn)
        try:
            module = load_module(source, True)
            if hasattr(module, "libdevice"):
                module.libdevice = _InterpreterLibdevice()
            self.fn = getattr(module, name)
        finally:
            triton_heuristics.template = real
        self.source = source

    def run(self, *args, stream=None, **kwargs):
        n = len(self.fn.arg_names)
        grid = tuple(int(g) for g in args[n:n + 3])
        self.fn[grid](*args[:n])


@pytest.fixture
def interpreted_inductor(monkeypatch):
    import torch._inductor.config as config
    import torch.utils._triton as torch_triton
    from torch._inductor.async_compile import AsyncCompile

    def triton(self, kernel_name, source_code, device_str="cuda"):
        if "_attn_fwd_inner" not in source_code:
            raise NotImplementedError(f"this test graph should hold only the flex template, got {kernel_name}")
        return _InterpretedKernel(kernel_name, source_code)

    monkeypatch.setattr(template, "DEVICES", ("cuda", "cpu"))
    monkeypatch.setattr(torch_triton, "triton_hash_with_backend", lambda: "triton-interpreter")
    monkeypatch.setattr(AsyncCompile, "triton", triton)
    with config.patch(cpu_backend="triton", fx_graph_cache=False):
        yield


def _compiled(score_mod, block_mask, gqa, **kw):
    def run(q, k, v):
        return flex_attention(q, k, v, score_mod=score_mod, block_mask=block_mask, enable_gqa=gqa,
                              return_lse=True, **kw)

    cnt = compile_counter("inductor")
    return torch.compile(run, backend=cnt, fullgraph=True), cnt


CASES = [(v, "odd37_E40", torch.float32) for v in (
    "noop", "causal", "sliding_window", "document", "alibi", "softcap", "relative_bias", "head_scale",
    "random_blocks", "ops_soup", "empty_rows")] + [
    ("causal", "Lq50_Lkv97", torch.float32), ("relative_bias", "gqa4x2_E64_Ev32", torch.float32),
    ("noop", "Lq50_Lkv97", torch.float16), ("document", "gqa4x2_E64_Ev32", torch.float16),
    ("alibi", "E128_Lq33_Lkv65", torch.float16),
]


@pytest.mark.parametrize("variant,shape,dtype", CASES,
                         ids=[f"{v}-{s}-{str(d)[6:]}" for v, s, d in CASES])
def test_inductor_renders_the_template(interpreted_inductor, variant, shape, dtype):
    from torch._inductor.utils import run_and_get_code

    dims = SHAPES[shape]
    B, Hq, Hkv, Lq, Lkv, E, Ev = dims
    q, k, v = make_inputs(dims, dtype, "cpu")
    score_mod, block_mask = make_variant(variant, Lq, Lkv, Hq, "cpu")
    fn, cnt = _compiled(score_mod, block_mask, Hq != Hkv)
    (out, lse), code = run_and_get_code(fn, q, k, v)
    code = "\n".join(code)
    assert cnt.frame_count == 1
    # Inductor's template kernel, not the custom op and not the decomposition
    assert "_attn_fwd_inner" in code and "def score_mod(" in code
    assert "inductor_flex.flex_forward" not in code
    ref_out, ref_lse, _ = reference64(q, k, v, score_mod, block_mask)
    low_out, low_lse, _ = reference_same_dtype(q, k, v, score_mod, block_mask)
    assert_close_to_reference(out, ref_out, low_out, dtype, "out")
    assert_close_to_reference(lse, ref_lse, low_lse, dtype, "lse")


def test_captured_tensors_are_kernel_arguments(interpreted_inductor):
    """New values of a captured table reuse the compiled kernel (no recompile) and are read."""
    dims = SHAPES["odd37_E40"]
    q, k, v = make_inputs(dims, torch.float32, "cpu")
    table = torch.randn(2, 80)

    def run(q, k, v, table):
        def bias(score, b, h, q_idx, kv_idx):
            return score + table[h, kv_idx - q_idx + 40]
        return flex_attention(q, k, v, score_mod=bias)

    cnt = compile_counter("inductor")
    fn = torch.compile(run, backend=cnt, fullgraph=True)
    for _ in range(2):
        table = torch.randn(2, 80)
        out = fn(q, k, v, table)

        def bias(score, b, h, q_idx, kv_idx):
            return score + table[h, kv_idx - q_idx + 40]
        ref, _, _ = reference64(q, k, v, bias)
        low, _, _ = reference_same_dtype(q, k, v, bias)
        assert_close_to_reference(out, ref, low, torch.float32)
    assert cnt.frame_count == 1


def test_backward_after_template_forward(interpreted_inductor):
    """Training through the template's out and lse: the fused backward kernels (the custom op;
    BACKEND "TRITON" asks for them on CPU) read the template's outputs."""
    dims = SHAPES["Lq50_Lkv97"]
    B, Hq, Hkv, Lq, Lkv, E, Ev = dims
    q, k, v = make_inputs(dims, torch.float32, "cpu", requires_grad=True)
    score_mod, block_mask = make_variant("alibi", Lq, Lkv, Hq, "cpu")
    fn, cnt = _compiled(score_mod, block_mask, False, kernel_options={"BACKEND": "TRITON"})
    out, lse = fn(q, k, v)
    g = torch.randn_like(out)
    grads = torch.autograd.grad(out, (q, k, v), g)
    assert_grads_close(q, k, v, grads, g, score_mod, block_mask, torch.float32)


@pytest.mark.skipif(torch.cuda.is_available(), reason="the GPU suite compiles these for real")
def test_inductor_sources_compile_for_sm90(interpreted_inductor, tmp_path):
    """The kernels Inductor renders from the template (dense, sparse with captured tensors, tanh)
    compile to sm_90 cubin with the signature and launch options Inductor chose."""
    import os
    import subprocess
    import sys

    _InterpretedKernel.sources.clear()
    for variant, shape, dtype in [("noop", "Lq50_Lkv97", torch.float16), ("document", "gqa4x2_E64_Ev32", torch.float16),
                                  ("softcap", "E128_Lq33_Lkv65", torch.bfloat16), ("relative_bias", "odd37_E40",
                                                                                   torch.float32)]:
        dims = SHAPES[shape]
        q, k, v = make_inputs(dims, dtype, "cpu")
        score_mod, block_mask = make_variant(variant, dims[3], dims[4], dims[1], "cpu", block=128)
        # the H100's default tile config (the interpreter's 16x16 would be picked on CPU otherwise)
        fn, _ = _compiled(score_mod, block_mask, dims[1] != dims[2],
                          kernel_options=dict(BLOCK_M=128, BLOCK_N=64, num_warps=8, num_stages=3))
        fn(q, k, v)  # (bf16 runs garbage through the interpreter's dot; only the source matters here)
    sources = sorted(set(_InterpretedKernel.sources))
    assert len(sources) >= 4
    for i, src in enumerate(sources):
        (tmp_path / f"kernel_{i}.py").write_text(src)
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.update(SM90_ONLY="inductor", SM90_INDUCTOR_DIR=str(tmp_path))
    script = os.path.join(os.path.dirname(__file__), "sm90_matrix.py")
    res = subprocess.run([sys.executable, script], env=env, capture_output=True, text=True, timeout=1200)
    print(res.stdout[-3000:])
    assert res.returncode == 0, res.stdout[-4000:] + res.stderr[-4000:]
    assert f"{len(sources)}/{len(sources)} specializations compiled for sm_90" in res.stdout
