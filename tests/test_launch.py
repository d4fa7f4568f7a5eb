"""inductor_flex/launch.py: the cached direct launch must never reuse a kernel compiled for another
specialization (alignment, integer divisibility), and must give what Triton's own launch gives."""
import pytest
import torch

from inductor_flex import flex_attention, launch
from inductor_flex.launch import _key, _known

from conftest import assert_close_to_reference


def key_of(*args):
    return _key(args, {"BLOCK": 16}, 4, 3)


def test_equal_values_of_other_types_do_not_share_a_key():
    # Triton compiles an int 1 as a constant, a float as fp32, a bool as i1
    assert len({key_of(x) for x in (1, 1.0, True)}) == 3
    # 1, multiples of 16 and 64-bit values all specialize differently: the value covers them
    assert len({key_of(x) for x in (1, 2, 16, 32, 2 ** 31, 2 ** 63)}) == 6


def test_tensor_key_sees_alignment_and_dtype():
    base = torch.zeros(64, dtype=torch.bfloat16)
    assert key_of(base) != key_of(base[1:])  # 2 bytes off a 16-byte boundary
    assert key_of(base) == key_of(base[8:])  # 16 bytes on: the same kernel serves it
    assert key_of(base) != key_of(base.float())
    assert key_of(base) != _key((base,), {"BLOCK": 32}, 4, 3)


def test_key_reads_every_argument_whatever_the_layout():
    # the tensors' positions are looked up once per list of argument types: a key must still see
    # each value, including lists with no tensor or no other value
    t = torch.zeros(64, dtype=torch.float16)
    assert key_of(3) != key_of(4) and key_of(t) != key_of(t.float())
    assert key_of(t, 3) != key_of(3, t)
    assert key_of(t, 3, t[1:]) != key_of(t, 3, t) != key_of(t, 5, t)
    assert key_of(t, t[8:]) == key_of(t[8:], t)


def test_only_known_argument_types_are_cached():
    assert _known((torch.zeros(2), 3, 0.5, True, None))
    assert not _known((torch.zeros(2), object()))


def _qkv(dtype, offset, device="cuda"):
    # offset elements into a flat buffer: offset 1 leaves every tensor 2 bytes off 16-byte alignment
    B, H, L, D = 2, 4, 200, 64
    out = []
    for i in range(3):
        flat = torch.randn(B * H * L * D + offset, dtype=dtype, device=device, generator=None)
        out.append(flat[offset:].view(B, H, L, D))
    return out


@pytest.mark.gpu
def test_misaligned_call_after_aligned_one_is_right():
    torch.manual_seed(0)

    def bias(s, b, h, q, kv):
        return s + (q - kv) * 0.01

    for offset in (0, 1, 0, 1):
        q, k, v = _qkv(torch.bfloat16, offset)
        assert (q.data_ptr() % 16 == 0) == (offset == 0)
        out = flex_attention(q, k, v, score_mod=bias)
        ref = flex_attention(q.double(), k.double(), v.double(), score_mod=bias, kernel_options={"BACKEND": "MATH"})
        low = flex_attention(q, k, v, score_mod=bias, kernel_options={"BACKEND": "MATH"})
        assert_close_to_reference(out, ref, low, torch.bfloat16, f"out (offset {offset})")


@pytest.mark.gpu
def test_direct_launch_matches_tritons_own(monkeypatch):
    torch.manual_seed(0)
    q, k, v = _qkv(torch.float16, 0)
    for t in (q, k, v):
        t.requires_grad_(True)

    def step():
        out = flex_attention(q, k, v, score_mod=lambda s, b, h, qi, kv: s * 0.5)
        grads = torch.autograd.grad(out.sum(), (q, k, v))
        return out, grads

    monkeypatch.setattr(launch, "_ENABLED", False)
    slow = step()
    monkeypatch.setattr(launch, "_ENABLED", True)
    step()  # the first call of a key goes through Triton; the second launches directly
    kernels = [kern for _, table in launch._cache.values() for kern in table.values() if kern is not None]
    assert kernels, "no launch was cached for the direct path"
    fast = step()
    assert torch.equal(slow[0], fast[0])
    for a, b in zip(slow[1], fast[1]):
        assert torch.equal(a, b)
