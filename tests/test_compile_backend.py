"""torch.compile entry points: the registered backend, and flex_attention captured inside a
compiled function without a graph break."""
import torch

from inductor_flex import create_block_mask, flex_attention
from inductor_flex.reference import math_attention
from inductor_flex.variants import generate_causal_mask


def test_backend_is_registered_and_compiles():
    assert "inductor_flex" in torch._dynamo.list_backends()
    from importlib.metadata import entry_points

    names = {ep.name: ep.value for ep in entry_points(group="torch_dynamo_backends")}
    assert names.get("inductor_flex") == "inductor_flex.backend:inductor_flex_backend"

    def f(x):
        return torch.nn.functional.gelu(x) * 2 + 1

    x = torch.randn(64)
    compiled = torch.compile(f, backend="inductor_flex", options={"max_autotune": False})
    torch.testing.assert_close(compiled(x), f(x))


def test_flex_attention_inside_compiled_function():
    bm = create_block_mask(generate_causal_mask(), None, None, 40, 40, device="cpu", BLOCK_SIZE=16)

    def block(q, k, v):
        return flex_attention(q * 2, k, v, block_mask=bm) + 1

    q, k, v = (torch.randn(1, 2, 40, 16) for _ in range(3))
    out = torch.compile(block, backend="eager", fullgraph=True)(q, k, v)
    ref, _, _ = math_attention((q * 2).double(), k.double(), v.double(), None, bm)
    torch.testing.assert_close(out.double(), ref + 1, rtol=1e-5, atol=1e-5)


def test_missing_private_api_names_it_and_the_torch_version():
    import pytest

    from inductor_flex import compat

    with pytest.raises(compat.UnsupportedTorchError, match=r"torch\._inductor\.lowering\.no_such_table.*torch 2\."):
        compat._private("torch._inductor.lowering", "no_such_table", "a test")


def test_bad_kernel_options_raise_under_compile_too():
    import pytest

    q, k, v = (torch.randn(1, 2, 16, 16) for _ in range(3))
    f = torch.compile(lambda q, k, v: flex_attention(q, k, v, kernel_options={"BLOCK_Q": 16}), backend="eager",
                      fullgraph=True)
    with pytest.raises(Exception, match="unknown key 'BLOCK_Q'"):
        f(q, k, v)
