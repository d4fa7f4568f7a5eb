"""The variant matrix shared by the interpreter, sm_90 cross-compile and GPU test suites."""
import torch

from inductor_flex import create_block_mask
from inductor_flex.variants import (
    generate_alibi_bias, generate_causal_mask, generate_doc_mask_mod, generate_head_scale,
    generate_prefix_lm_mask, generate_random_block_mask_mod, generate_relative_bias,
    generate_sliding_window, generate_tanh_softcap,
)

# (B, Hq, Hkv, Lq, Lkv, E, Ev)
SHAPES = {
    "odd37_E40": (1, 2, 2, 37, 37, 40, 40),
    "Lq50_Lkv97": (2, 2, 2, 50, 97, 64, 64),
    "gqa4x2_E64_Ev32": (1, 4, 2, 64, 64, 64, 32),
    "E128_Lq33_Lkv65": (1, 1, 1, 33, 65, 128, 128),
}


def _score_sq(score, b, h, q_idx, kv_idx):
    return score * score / 8.0


def _trig(score, b, h, q_idx, kv_idx):
    return score + torch.sin(q_idx * 0.1) * torch.cos(kv_idx * 0.05)


def _ops_soup(score, b, h, q_idx, kv_idx):
    d = q_idx - kv_idx
    x = torch.where(d % 3 == 0, score, score * 0.5) + (d // 4).float() * 0.01
    x = x + torch.clamp(d.float(), -8, 8) * 0.01 + torch.sigmoid(score) - torch.abs(score).sqrt() * 0.1
    x = x + torch.exp(-torch.abs(score)) + torch.log2(1.0 + torch.abs(score)) * torch.rsqrt(2.0 + score * score)
    return torch.maximum(x, torch.minimum(score, torch.tensor(0.0))) + (h + 1) ** 2 * 0.01


def _empty_rows(b, h, q_idx, kv_idx):
    # rows 0..4 see nothing: output 0, lse -inf
    return (q_idx >= 5) & (kv_idx <= q_idx)


def make_variant(name, Lq, Lkv, H, device, block=32):
    """-> (score_mod, block_mask) for a named variant at these lengths."""
    def bm(mask_mod):
        return create_block_mask(mask_mod, None, None, Lq, Lkv, device=device, BLOCK_SIZE=block)

    if name == "noop":
        return None, None
    if name == "causal":
        return None, bm(generate_causal_mask())
    if name == "sliding_window":
        return None, bm(generate_sliding_window(24))
    if name == "prefix_lm":
        return None, bm(generate_prefix_lm_mask(13))
    if name == "document":
        g = torch.Generator().manual_seed(1)
        ids = torch.sort(torch.randint(0, 4, (max(Lq, Lkv),), generator=g)).values.to(device)
        return None, bm(generate_doc_mask_mod(generate_causal_mask(), ids))
    if name == "alibi":
        return generate_alibi_bias(H), None
    if name == "softcap":
        return generate_tanh_softcap(2.0), bm(generate_causal_mask())
    if name == "relative_bias":
        L = max(Lq, Lkv)
        return generate_relative_bias(torch.randn(H, 2 * L - 1, device=device)), None
    if name == "head_scale":
        return generate_head_scale(torch.rand(H, device=device) + 0.5), None
    if name == "random_blocks":
        nq, nk = -(-Lq // block), -(-Lkv // block)
        return None, bm(generate_random_block_mask_mod(nq, nk, block, 0.4, device=device))
    if name == "score_squared":
        return _score_sq, None
    if name == "trig":
        return _trig, None
    if name == "ops_soup":
        return _ops_soup, bm(generate_sliding_window(40))
    if name == "empty_rows":
        return None, bm(_empty_rows)
    raise KeyError(name)


VARIANTS = [
    "noop", "causal", "sliding_window", "prefix_lm", "document", "alibi", "softcap", "relative_bias",
    "head_scale", "random_blocks", "score_squared", "trig", "ops_soup", "empty_rows",
]


def make_inputs(shape, dtype, device, requires_grad=False):
    B, Hq, Hkv, Lq, Lkv, E, Ev = shape
    q = torch.randn(B, Hq, Lq, E, dtype=dtype, device=device)
    k = torch.randn(B, Hkv, Lkv, E, dtype=dtype, device=device)
    v = torch.randn(B, Hkv, Lkv, Ev, dtype=dtype, device=device)
    if requires_grad:
        for t in (q, k, v):
            t.requires_grad_(True)
    return q, k, v


# ---- score_mods with learnable captured tensors (factory(*tensors) -> score_mod, tensor maker) ----
LEARNABLE_LEN = 50
L = LEARNABLE_LEN


def rel_bias(table):
    def mod(score, b, h, q_idx, kv_idx):
        return score + table[h, q_idx - kv_idx + L - 1]
    return mod


def alibi_param(slopes):
    def mod(score, b, h, q_idx, kv_idx):
        return score + slopes[h] * (kv_idx - q_idx)
    return mod


def head_scale(scales):
    def mod(score, b, h, q_idx, kv_idx):
        return score * scales[h]
    return mod


def two_reads_repeated(table):
    # two reads of one tensor, and indices that repeat many times within a tile
    def mod(score, b, h, q_idx, kv_idx):
        return score + table[(q_idx * kv_idx) % 7] - 0.5 * table[kv_idx % 5] * score
    return mod


def temperature_softcap(temp):
    # a 0-d parameter read directly (its gradient is a sum over every score)
    def mod(score, b, h, q_idx, kv_idx):
        return torch.tanh(score / temp) * temp
    return mod


def bias_and_mask_tensor(bias):
    def mod(score, b, h, q_idx, kv_idx):
        return score + bias[b, h, q_idx, kv_idx]
    return mod


LEARNABLE = {
    "relative_bias_table": (rel_bias, lambda H: [torch.randn(H, 2 * L - 1)]),
    "alibi_slopes": (alibi_param, lambda H: [torch.rand(H) * 0.2]),
    "head_scale": (head_scale, lambda H: [torch.rand(H) + 0.5]),
    "two_reads_repeated": (two_reads_repeated, lambda H: [torch.randn(7)]),
    "temperature_softcap": (temperature_softcap, lambda H: [torch.tensor(3.0)]),
    "full_bias": (bias_and_mask_tensor, lambda H: [torch.randn(2, H, L, L)]),
}




def packed_documents(L, cuts):
    """(ids, mask_mod): causal attention within documents that start at ``cuts`` (ids mutable in place)."""
    ids = torch.zeros(L, dtype=torch.int64)
    for c in cuts:
        ids[c:] += 1

    def document_causal(b, h, q_idx, kv_idx):
        return (ids[q_idx] == ids[kv_idx]) & (q_idx >= kv_idx)
    return ids, document_causal


# BlockMasks whose rows the kernels walk in one loop (test_block_mask_runs_walk*): the first three
# list partial and full blocks as one run each (RUNS), the rest only as one run together (UNION)
RUN_WALK_VARIANTS = ["causal", "prefix_lm", "causal_offset_rows", "wide_window", "document",
                     "full_blocks_around_a_partial_one"]


def run_walk_mask_mod(name, L):
    """mask_mod of a RUN_WALK_VARIANTS entry, for lengths up to L, on 32-blocks."""
    if name == "causal":
        return generate_causal_mask()
    if name == "prefix_lm":
        return generate_prefix_lm_mask(45)
    if name == "causal_offset_rows":  # rows before 60 see nothing (lse -inf), the rest a shifted causal band
        return lambda b, h, qi, ki: qi - 60 >= ki
    if name == "wide_window":  # over two 32-blocks: partial blocks at both ends of the full ones
        return generate_sliding_window(70)
    if name == "document":
        # causal documents of 40, 160 and the rest rows, none aligned to the 32-blocks: rows of the
        # second see a partial block, full ones and the partial diagonal block
        ids = torch.bucketize(torch.arange(L), torch.tensor([40, 200]), right=True)
        return generate_doc_mask_mod(generate_causal_mask(), ids)
    if name == "full_blocks_around_a_partial_one":
        # keys 70-79 hidden from even rows: block 2 is partial between full ones in every row
        return lambda b, h, qi, ki: ~((ki >= 70) & (ki < 80) & (qi % 2 == 0))
    raise KeyError(name)
