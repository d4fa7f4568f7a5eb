"""A few optimizer steps of a 2-layer transformer whose attention has a learnable relative-position
bias in its score_mod: the fused kernels follow the math path's loss curve and bias gradients."""
import pytest
import torch
import torch.nn as nn

from inductor_flex import create_block_mask, flex_attention
from inductor_flex.variants import generate_causal_mask


class Block(nn.Module):
    def __init__(self, dim, heads, max_len):
        super().__init__()
        self.heads, self.max_len = heads, max_len
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        self.mlp = nn.Sequential(nn.Linear(dim, 2 * dim), nn.GELU(), nn.Linear(2 * dim, dim))
        self.n1, self.n2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.rel = nn.Parameter(torch.zeros(heads, 2 * max_len - 1))

    def forward(self, x, block_mask, options):
        B, S, D = x.shape
        q, k, v = self.qkv(self.n1(x)).view(B, S, 3, self.heads, -1).permute(2, 0, 3, 1, 4)
        rel, M = self.rel, self.max_len

        def rel_bias(score, b, h, q_idx, kv_idx):
            return score + rel[h, q_idx - kv_idx + M - 1]

        a = flex_attention(q, k, v, score_mod=rel_bias, block_mask=block_mask, kernel_options=options)
        x = x + self.proj(a.transpose(1, 2).reshape(B, S, D))
        return x + self.mlp(self.n2(x))


class TinyLM(nn.Module):
    def __init__(self, vocab=64, dim=32, heads=2, max_len=48):
        super().__init__()
        self.emb = nn.Embedding(vocab, dim)
        self.blocks = nn.ModuleList([Block(dim, heads, max_len) for _ in range(2)])
        self.head = nn.Linear(dim, vocab)

    def forward(self, tokens, block_mask, options):
        x = self.emb(tokens)
        for blk in self.blocks:
            x = blk(x, block_mask, options)
        return self.head(x)


def train(backend, device, dtype, steps=5, compile_backend=None):
    torch.manual_seed(0)
    model = TinyLM().to(device=device, dtype=dtype)
    run = model if compile_backend is None else torch.compile(model, backend=compile_backend, fullgraph=True)
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    g = torch.Generator(device="cpu").manual_seed(1)
    data = torch.randint(0, 64, (steps, 2, 45), generator=g).to(device)
    bm = create_block_mask(generate_causal_mask(), None, None, 44, 44, device=device, BLOCK_SIZE=16)
    losses, rel_grads = [], []
    for step in range(steps):
        x, y = data[step, :, :-1], data[step, :, 1:]
        logits = run(x, bm, {"BACKEND": backend})
        loss = nn.functional.cross_entropy(logits.float().reshape(-1, 64), y.reshape(-1))
        opt.zero_grad()
        loss.backward()
        rel_grads.append(model.blocks[0].rel.grad.detach().float().clone())
        opt.step()
        losses.append(loss.item())
    return losses, rel_grads


def _compare(device, dtype, tol, compile_backend=None):
    kern, kern_g = train("TRITON", device, dtype, compile_backend=compile_backend)
    ref, ref_g = train("MATH", device, dtype)
    assert kern[-1] < kern[0]  # it learns
    for a, b in zip(kern, ref):
        assert abs(a - b) <= tol * abs(b), (kern, ref)
    for a, b in zip(kern_g, ref_g):
        assert (a - b).abs().max() <= tol * 10 * b.abs().max() + 1e-6


def test_training_follows_math_path_cpu_interpreter():
    _compare("cpu", torch.float32, 1e-4)


@pytest.mark.parametrize("compile_backend", ["aot_eager", "inductor"])
def test_compiled_training_follows_math_path_cpu_interpreter(compile_backend):
    # the whole model under torch.compile: the forward and backward kernels run as graph ops
    import torch._dynamo

    torch._dynamo.reset()
    _compare("cpu", torch.float32, 1e-4, compile_backend)


@pytest.mark.gpu
def test_training_follows_math_path_gpu():
    _compare("cuda", torch.float32, 1e-3)
