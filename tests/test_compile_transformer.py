"""A small transformer block (RMSNorm, rotary embedding, flex attention with a document mask,
MLP) compiled end to end, forward and backward, against the same block run eagerly."""
import pytest
import torch
import torch._dynamo.testing

from inductor_flex import create_block_mask, flex_attention
from inductor_flex.variants import generate_causal_mask, generate_doc_mask_mod


class RMSNorm(torch.nn.Module):
    def __init__(self, dim, eps=1e-6):
        super().__init__()
        self.eps = eps
        self.weight = torch.nn.Parameter(torch.ones(dim))

    def forward(self, x):
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps) * self.weight


def rotary(x, cos, sin):
    x1, x2 = x[..., : x.shape[-1] // 2], x[..., x.shape[-1] // 2:]
    return torch.cat([x1 * cos - x2 * sin, x1 * sin + x2 * cos], dim=-1)


class Block(torch.nn.Module):
    def __init__(self, dim=64, heads=4, kv_heads=2):
        super().__init__()
        self.heads, self.kv_heads, self.hd = heads, kv_heads, dim // heads
        self.norm1, self.norm2 = RMSNorm(dim), RMSNorm(dim)
        self.wq = torch.nn.Linear(dim, dim, bias=False)
        self.wkv = torch.nn.Linear(dim, 2 * kv_heads * self.hd, bias=False)
        self.wo = torch.nn.Linear(dim, dim, bias=False)
        self.mlp = torch.nn.Sequential(torch.nn.Linear(dim, 3 * dim), torch.nn.SiLU(), torch.nn.Linear(3 * dim, dim))
        # a learned per-head temperature, read by the score_mod: gets gradients through the HOP
        self.temp = torch.nn.Parameter(torch.ones(heads))

    def forward(self, x, block_mask, cos, sin):
        B, S, D = x.shape
        h = self.norm1(x)
        q = self.wq(h).view(B, S, self.heads, self.hd).transpose(1, 2)
        k, v = self.wkv(h).view(B, S, 2, self.kv_heads, self.hd).permute(2, 0, 3, 1, 4)
        q, k = rotary(q, cos, sin), rotary(k, cos, sin)
        temp = self.temp

        def head_temp(score, b, h, q_idx, kv_idx):
            return score * temp[h]

        a = flex_attention(q, k, v, score_mod=head_temp, block_mask=block_mask, enable_gqa=True)
        x = x + self.wo(a.transpose(1, 2).reshape(B, S, D))
        return x + self.mlp(self.norm2(x))


def _inputs(S=72, dim=64, heads=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.sort(torch.randint(0, 3, (S,), generator=g)).values
    bm = create_block_mask(generate_doc_mask_mod(generate_causal_mask(), ids), None, None, S, S, device="cpu",
                           BLOCK_SIZE=16)
    hd = dim // heads
    pos = torch.arange(S, dtype=torch.float32)[:, None] / (10000 ** (torch.arange(hd // 2) / (hd // 2)))
    x = torch.randn(2, S, dim, generator=g)
    return x, bm, pos.cos(), pos.sin()


@pytest.mark.parametrize("backend", ["aot_eager", "inductor", "inductor_flex"])
def test_transformer_block_forward_backward(backend):
    torch.manual_seed(0)
    model = Block()
    compiled_model = Block()
    compiled_model.load_state_dict(model.state_dict())
    x, bm, cos, sin = _inputs()
    torch._dynamo.reset()
    cnt = torch._dynamo.testing.CompileCounterWithBackend(backend)
    compiled = torch.compile(compiled_model, backend=cnt, fullgraph=True)

    out = compiled(x, bm, cos, sin)
    ref = model(x, bm, cos, sin)
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-5)
    out.square().mean().backward()
    ref.square().mean().backward()
    for (name, p), (_, pr) in zip(compiled_model.named_parameters(), model.named_parameters()):
        assert p.grad is not None, name
        torch.testing.assert_close(p.grad, pr.grad, rtol=1e-3, atol=1e-5, msg=lambda m: f"{name}: {m}")
    assert compiled_model.temp.grad.abs().sum() > 0

    # a second batch with a new document layout: same shapes, no recompile
    x2, bm2, _, _ = _inputs(seed=1)
    torch.testing.assert_close(compiled(x2, bm2, cos, sin), model(x2, bm2, cos, sin), rtol=1e-4, atol=1e-5)
    assert cnt.frame_count == 1
