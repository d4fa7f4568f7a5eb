"""PagedKVCache: page bookkeeping, and decode attention over a shuffled page pool (Triton
interpreter) vs the float64 oracle on the same K/V stored contiguously."""
import pytest
import torch

from inductor_flex import create_block_mask, flex_attention
from inductor_flex import decode as D
from inductor_flex.paged import PagedKVCache
from inductor_flex.reference import math_attention
from inductor_flex.variants import generate_alibi_bias, generate_causal_mask, generate_sliding_window

from conftest import assert_close_to_reference

DECODE = {"BACKEND": "TRITON_DECODE"}


def shuffled_cache(n_pages, page_size, lengths):
    """A cache whose slots own interleaved, out-of-order pages (grown round-robin, one erased)."""
    cache = PagedKVCache(n_pages, page_size, len(lengths) + 1, device="cpu")
    g = torch.Generator().manual_seed(0)
    cache.free_pages = [cache.free_pages[i] for i in torch.randperm(n_pages, generator=g).tolist()]
    spare = len(lengths)
    cache.reserve(spare, 2 * page_size)  # taken, then given back in the middle of the growth
    grown = [0] * len(lengths)
    while grown != list(lengths):
        for b in torch.randperm(len(lengths), generator=g).tolist():
            grown[b] = min(lengths[b], grown[b] + page_size)
            cache.reserve(b, grown[b])
            if b == 0 and spare is not None:
                cache.erase(spare)
                spare = None
    return cache


def test_reserve_assign_erase_bookkeeping():
    cache = PagedKVCache(6, 4, 2, device="cpu")
    cache.reserve(0, 5)
    cache.reserve(1, 4)
    cache.reserve(0, 8)  # already enough pages: nothing new
    assert cache.pages == [[0, 1], [2]]
    assert cache.page_table[0, :3].tolist() == [0, 1, -1] and cache.page_table[1, :2].tolist() == [2, -1]
    assert cache.physical_to_logical[0, :3].tolist() == [0, 1, -1]
    assert cache.physical_to_logical[1, 2].item() == 0

    k_pool, v_pool = torch.zeros(1, 2, 24, 3), torch.zeros(1, 2, 24, 3)
    k_new = torch.randn(2, 2, 3, 3)
    v_new = torch.randn(2, 2, 3, 3)
    pos = torch.tensor([[3, 4, 5], [0, 1, 2]])
    cache.assign(torch.tensor([0, 1]), pos, k_new, v_new, k_pool, v_pool)
    # slot 0: logical 3 -> page 0 offset 3; logical 4, 5 -> page 1 offsets 0, 1
    assert torch.equal(k_pool[0, :, [3, 4, 5]], k_new[0])
    assert torch.equal(v_pool[0, :, [8, 9, 10]], v_new[1])

    cache.erase(0)
    assert cache.page_table[0].eq(-1).all() and cache.physical_to_logical[0].eq(-1).all()
    cache.reserve(1, 20)
    assert sorted(cache.pages[1]) == [0, 1, 2, 3, 4]


def test_errors_name_the_problem():
    cache = PagedKVCache(2, 4, 1, device="cpu")
    with pytest.raises(RuntimeError, match="needs 3 more pages"):
        cache.reserve(0, 12)
    with pytest.raises(IndexError, match="batch_idx 3"):
        cache.reserve(3, 1)
    cache.reserve(0, 4)
    k = torch.zeros(1, 1, 8, 2)
    with pytest.raises(ValueError, match="beyond the pages reserved"):
        cache.assign(torch.tensor([0]), torch.tensor([[4]]), torch.zeros(1, 1, 1, 2), torch.zeros(1, 1, 1, 2), k, k)
    bm = create_block_mask(None, None, None, 1, 8, device="cpu", BLOCK_SIZE=(16, 3))
    with pytest.raises(ValueError, match="multiple of the BlockMask's kv block size"):
        cache.convert_logical_block_mask(bm)
    with pytest.raises(ValueError, match="page_size must be a positive int"):
        PagedKVCache(2, 0, 1)


def test_converted_block_mask_points_at_pages():
    cache = shuffled_cache(12, 32, [80, 64])
    bm = create_block_mask(generate_causal_mask(), None, None, 80, 80, device="cpu", BLOCK_SIZE=16)
    phys = cache.convert_logical_block_mask(bm, torch.tensor([0, 1]))
    assert phys.seq_lengths == (80, 12 * 32) and phys.kv_indices.shape == (2, 1, 5, 24)
    logical = bm.to_dense()[0, 0]
    for b, length in ((0, 80), (1, 64)):
        dense = phys.to_dense()[b, 0]
        for lb in range(5):
            page = cache.page_table[b, lb // 2].item()
            if lb * 16 < length:
                assert torch.equal(dense[:, page * 2 + lb % 2], logical[:, lb])
        assert dense.sum() == logical[:, : -(-length // 16)].sum()  # blocks beyond the slot's pages dropped


def paged_case(group, Lq, lengths, mask, score_mod, page_size, kv_block, dtype):
    B, Hkv, E, Ev = len(lengths), 4, 64, 128  # >= 1k output elements: a stable max-error ratio
    Hq, L = Hkv * group, max(lengths)
    cache = shuffled_cache(-(-L // page_size) * B + 2, page_size, lengths)
    k = torch.randn(B, Hkv, L, E, dtype=dtype)
    v = torch.randn(B, Hkv, L, Ev, dtype=dtype)
    k_pool = torch.zeros(1, Hkv, cache.capacity, E, dtype=dtype)
    v_pool = torch.zeros(1, Hkv, cache.capacity, Ev, dtype=dtype)
    batch_idx = torch.arange(B)
    for b, n in enumerate(lengths):
        cache.assign(batch_idx[b:b + 1], torch.arange(n)[None], k[b:b + 1, :, :n], v[b:b + 1, :, :n], k_pool, v_pool)
    # the queries are the last Lq positions; shorter sequences see only their own length
    offset = torch.tensor(L - Lq)
    seq_len = torch.tensor(lengths)

    def logical_mask(b, h, q_idx, kv_idx):
        return mask(b, h, q_idx + offset, kv_idx) & (kv_idx < seq_len[b])

    logical = create_block_mask(logical_mask, B, None, Lq, L, device="cpu", BLOCK_SIZE=(32, kv_block))
    phys = cache.convert_logical_block_mask(logical, batch_idx)
    q = torch.randn(B, Hq, Lq, E, dtype=dtype)
    out, lse = flex_attention(q, k_pool.expand(B, -1, -1, -1), v_pool.expand(B, -1, -1, -1),
                              score_mod=cache.get_score_mod(score_mod, batch_idx), block_mask=phys,
                              enable_gqa=group > 1, return_lse=True, kernel_options={**DECODE, "SPLIT_KV": 3})
    ref_out, ref_lse, _ = math_attention(q.double(), k.double(), v.double(), score_mod, logical)
    low_out, low_lse, _ = math_attention(q, k, v, score_mod, logical)
    assert_close_to_reference(out, ref_out, low_out, dtype, "out")
    assert_close_to_reference(lse, ref_lse, low_lse, dtype, "lse")
    return cache, phys


def _causal(b, h, q_idx, kv_idx):
    return q_idx >= kv_idx


def _rel(score, b, h, q_idx, kv_idx):
    return score + 0.05 * torch.cos(kv_idx * 0.1)


MASKS = {"causal": _causal, "window": generate_sliding_window(50)}
SCORES = {"none": None, "alibi": generate_alibi_bias(16), "kv_bias": _rel}


@pytest.mark.parametrize("score", list(SCORES))
@pytest.mark.parametrize("mask", list(MASKS))
@pytest.mark.parametrize("group,Lq", [(1, 1), (4, 3), (4, 16)], ids=["gqa1-Lq1", "gqa4-Lq3", "gqa4-Lq16"])
def test_paged_decode_matches_contiguous_reference(group, Lq, mask, score):
    # odd lengths (not a multiple of the page or the kv block); pages of two kv blocks
    paged_case(group, Lq, [141, 97], MASKS[mask], SCORES[score], page_size=32, kv_block=16, dtype=torch.float16)


def test_paged_fp32_page_equals_block():
    paged_case(2, 2, [75, 130, 33], _causal, _rel, page_size=16, kv_block=16, dtype=torch.float32)


def test_paged_wrappers_are_reused_across_steps():
    cache = shuffled_cache(8, 32, [100, 60])
    batch_idx = torch.arange(2)
    bm = create_block_mask(_causal, None, None, 1, 100, device="cpu", BLOCK_SIZE=32)
    a = cache.convert_logical_block_mask(bm, batch_idx)
    b = cache.convert_logical_block_mask(bm, batch_idx)
    assert a.mask_mod is b.mask_mod
    assert cache.get_score_mod(_rel, batch_idx) is cache.get_score_mod(_rel, batch_idx)
    q = torch.randn(2, 2, 1, 16)
    pool = torch.randn(1, 2, cache.capacity, 16)
    flex_attention(q, pool.expand(2, -1, -1, -1), pool.expand(2, -1, -1, -1), block_mask=a, kernel_options=DECODE)
    renders, plans = D.stats["renders"], D.stats["plans"]
    flex_attention(q, pool.expand(2, -1, -1, -1), pool.expand(2, -1, -1, -1), block_mask=b, kernel_options=DECODE)
    assert (D.stats["renders"], D.stats["plans"]) == (renders, plans)


def test_paged_wrappers_follow_the_wrapped_mods_changes():
    # the plan key takes a paged wrapper as fixed and walks only the mod it wraps: rebinding a
    # scalar the wrapped score_mod / mask_mod bakes into its kernel must still give a new kernel
    cache = shuffled_cache(8, 32, [100, 60])
    batch_idx = torch.arange(2)
    k_pool, v_pool = torch.randn(1, 2, cache.capacity, 16), torch.randn(1, 2, cache.capacity, 16)
    q = torch.randn(2, 2, 1, 16, dtype=torch.float32)

    def score(score, b, h, q_idx, kv_idx):
        return score + bias * torch.sin(kv_idx * 0.3)

    def mask(b, h, q_idx, kv_idx):
        return kv_idx >= 100 - window

    seen = []
    for bias, window in ((0.5, 40), (-2.0, 40), (-2.0, 70)):  # noqa: B007 - the mods read the rebound names
        logical = create_block_mask(mask, None, None, 1, 100, device="cpu", BLOCK_SIZE=32)
        phys = cache.convert_logical_block_mask(logical, batch_idx)
        out = flex_attention(q, k_pool.expand(2, -1, -1, -1), v_pool.expand(2, -1, -1, -1),
                             score_mod=cache.get_score_mod(score, batch_idx), block_mask=phys, kernel_options=DECODE)
        ref = flex_attention(q, k_pool.expand(2, -1, -1, -1), v_pool.expand(2, -1, -1, -1),
                             score_mod=cache.get_score_mod(score, batch_idx), block_mask=phys,
                             kernel_options={"BACKEND": "MATH"})
        torch.testing.assert_close(out, ref, atol=2e-5, rtol=2e-5)
        seen.append(out)
    assert not torch.allclose(seen[0], seen[1]) and not torch.allclose(seen[1], seen[2])
