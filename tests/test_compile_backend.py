"""torch.compile entry points that exist today: the registered backend, and flex_attention inside a
compiled function (a graph break into the eager path)."""
import torch

from inductor_flex import create_block_mask, flex_attention
from inductor_flex.reference import math_attention
from inductor_flex.variants import generate_causal_mask


def test_backend_is_registered_and_compiles():
    assert "inductor_flex" in torch._dynamo.list_backends()

    def f(x):
        return torch.nn.functional.gelu(x) * 2 + 1

    x = torch.randn(64)
    compiled = torch.compile(f, backend="inductor_flex")
    torch.testing.assert_close(compiled(x), f(x))


def test_flex_attention_inside_compiled_function():
    bm = create_block_mask(generate_causal_mask(), None, None, 40, 40, device="cpu", BLOCK_SIZE=16)

    def block(q, k, v):
        return flex_attention(q * 2, k, v, block_mask=bm) + 1

    q, k, v = (torch.randn(1, 2, 40, 16) for _ in range(3))
    out = torch.compile(block, backend="eager")(q, k, v)
    ref, _, _ = math_attention((q * 2).double(), k.double(), v.double(), None, bm)
    torch.testing.assert_close(out.double(), ref + 1, rtol=1e-5, atol=1e-5)
