"""BlockMask construction: full vs partial blocks, round trips, combinators, slicing."""
import math

import pytest
import torch
from hypothesis import given, settings, strategies as st

from inductor_flex import BlockMask, and_masks, create_block_mask, create_mask, noop_mask, or_masks
from inductor_flex.block_mask import refine_block_mask

from cases import packed_documents
from inductor_flex.variants import generate_causal_mask, generate_sliding_window


def brute_force_blocks(mask_mod, Lq, Lkv, qbs, kbs):
    """(partial, full) from the dense mask, restricted to valid positions."""
    dense = create_mask(mask_mod, 1, 1, Lq, Lkv, device="cpu")[0, 0]
    nq, nk = math.ceil(Lq / qbs), math.ceil(Lkv / kbs)
    partial = torch.zeros(nq, nk, dtype=torch.bool)
    full = torch.zeros(nq, nk, dtype=torch.bool)
    for i in range(nq):
        for j in range(nk):
            tile = dense[i * qbs:(i + 1) * qbs, j * kbs:(j + 1) * kbs]
            full[i, j] = bool(tile.all())
            partial[i, j] = bool(tile.any()) and not bool(tile.all())
    return partial, full


@pytest.mark.parametrize("Lq,Lkv,bs", [(100, 100, 32), (130, 77, 16), (64, 200, (16, 32)), (33, 33, 64)],
                         ids=["100x100_b32", "130x77_b16", "64x200_b16x32", "33x33_b64"])
@pytest.mark.parametrize("name", ["causal", "sliding_window_20"])
def test_full_and_partial_blocks_exact(name, Lq, Lkv, bs):
    mm = generate_causal_mask() if name == "causal" else generate_sliding_window(20)
    bm = create_block_mask(mm, None, None, Lq, Lkv, device="cpu", BLOCK_SIZE=bs)
    qbs, kbs = bm.BLOCK_SIZE
    partial, full = brute_force_blocks(mm, Lq, Lkv, qbs, kbs)
    assert torch.equal(bm.partial_blocks()[0, 0], partial)
    assert torch.equal(bm.full_blocks()[0, 0], full)
    assert torch.equal(bm.to_dense()[0, 0].bool(), partial | full)


def test_kv_indices_list_selected_blocks_first_in_order():
    bm = create_block_mask(generate_causal_mask(), 2, 3, 96, 96, device="cpu", BLOCK_SIZE=32)
    assert bm.kv_num_blocks.shape == (2, 3, 3) and bm.kv_indices.shape == (2, 3, 3, 3)
    assert bm.kv_num_blocks.dtype == torch.int32 and bm.kv_indices.dtype == torch.int32
    # causal at block granularity: the diagonal block is partial, those left of it full
    assert bm.kv_num_blocks[0, 0].tolist() == [1, 1, 1]
    assert bm.full_kv_num_blocks[0, 0].tolist() == [0, 1, 2]
    assert bm.kv_indices[0, 0, :, 0].tolist() == [0, 1, 2]
    assert bm.full_kv_indices[0, 0, 2, :2].tolist() == [0, 1]


def test_q_side_is_transpose_of_kv_side():
    bm = create_block_mask(generate_sliding_window(40), None, 2, 150, 170, device="cpu", BLOCK_SIZE=32)
    part, full = bm.partial_blocks(), bm.full_blocks()
    from inductor_flex.block_mask import _dense_from_indices

    q_part = _dense_from_indices(bm.q_num_blocks, bm.q_indices, bm.num_blocks[0])
    q_full = _dense_from_indices(bm.full_q_num_blocks, bm.full_q_indices, bm.num_blocks[0])
    assert torch.equal(q_part, part.transpose(-1, -2))
    assert torch.equal(q_full, full.transpose(-1, -2))


def test_from_kv_blocks_round_trip():
    bm = create_block_mask(generate_causal_mask(), None, None, 128, 128, device="cpu", BLOCK_SIZE=32)
    bm2 = BlockMask.from_kv_blocks(bm.kv_num_blocks, bm.kv_indices, bm.full_kv_num_blocks, bm.full_kv_indices,
                                   BLOCK_SIZE=32, mask_mod=bm.mask_mod, seq_lengths=(128, 128))
    assert torch.equal(bm2.to_dense(), bm.to_dense())
    assert torch.equal(bm2.q_num_blocks, bm.q_num_blocks)
    assert torch.equal(bm2.partial_blocks(), bm.partial_blocks())


def test_from_kv_blocks_hand_written():
    num = torch.tensor([[[1, 2]]], dtype=torch.int32)
    idx = torch.tensor([[[[1, 0], [0, 1]]]], dtype=torch.int32)
    bm = BlockMask.from_kv_blocks(num, idx, BLOCK_SIZE=16)
    assert bm.to_dense()[0, 0].tolist() == [[0, 1], [1, 1]]
    assert bm.shape == (1, 1, 32, 32)
    assert bm.q_num_blocks[0, 0].tolist() == [1, 2]


def test_and_or_masks():
    causal = generate_causal_mask()

    def even(b, h, q_idx, kv_idx):
        return kv_idx % 2 == 0

    dense_c = create_mask(causal, 1, 1, 20, 20, device="cpu")
    dense_e = create_mask(even, 1, 1, 20, 20, device="cpu")
    assert torch.equal(create_mask(and_masks(causal, even), 1, 1, 20, 20, device="cpu"), dense_c & dense_e)
    assert torch.equal(create_mask(or_masks(causal, even), 1, 1, 20, 20, device="cpu"), dense_c | dense_e)
    assert create_mask(noop_mask, 1, 1, 5, 7, device="cpu").all()


def test_slicing_batch_head_and_q_block():
    def per_head(b, h, q_idx, kv_idx):
        return (q_idx >= kv_idx) | (h == 1)

    bm = create_block_mask(per_head, 2, 2, 64, 64, device="cpu", BLOCK_SIZE=16)
    h1 = bm[:, 1]
    assert h1.kv_num_blocks.shape[:2] == (2, 1)
    assert h1.to_dense().all()
    row = bm[0, 0, 2]
    assert row.kv_indices.shape == (1, 1, 1, 4)
    assert row.to_dense()[0, 0, 0].tolist() == [1, 1, 1, 0]
    with pytest.raises(IndexError):
        bm[5]


def test_sparsity_repr_to_string_and_to():
    bm = create_block_mask(generate_causal_mask(), None, None, 256, 256, device="cpu", BLOCK_SIZE=64)
    assert bm.sparsity() == pytest.approx(100 * 6 / 16)
    r = repr(bm)
    assert "BlockMask(" in r and "causal" in r and "sparsity=37.50%" in r
    pic = bm.to_string()
    lines = pic.splitlines()[1:]
    assert lines[0] == "|░░      |" and lines[-1] == "|██████░░|"
    assert bm.to("cpu").kv_indices.device.type == "cpu"


def test_build_never_materialises_full_mask(monkeypatch):
    # shrink the chunk so a 2048x2048 build must take several chunks; each chunk's grid is bounded
    import inductor_flex.block_mask as bmod

    seen = []
    real = bmod.eval_mask_grid

    def spy(mm, b, h, q, kv):
        seen.append(q.numel() * kv.numel())
        return real(mm, b, h, q, kv)

    monkeypatch.setattr(bmod, "eval_mask_grid", spy)
    monkeypatch.setattr(bmod, "_BUILD_CHUNK_ELEMS", 128 * 2048)
    bm = create_block_mask(generate_causal_mask(), None, None, 2048, 2048, device="cpu", BLOCK_SIZE=128)
    assert len(seen) == 16 and max(seen) == 128 * 2048
    assert bm.full_kv_num_blocks[0, 0, -1].item() == 15


@settings(max_examples=30, deadline=None)
@given(Lq=st.integers(1, 90), Lkv=st.integers(1, 90), qbs=st.sampled_from([8, 16, 32]),
       kbs=st.sampled_from([8, 16, 32]), w=st.integers(1, 40), kind=st.sampled_from(["causal", "window", "mod"]))
def test_hypothesis_blocks_match_brute_force(Lq, Lkv, qbs, kbs, w, kind):
    if kind == "causal":
        mm = generate_causal_mask()
    elif kind == "window":
        mm = generate_sliding_window(w)
    else:
        def mm(b, h, q_idx, kv_idx):
            return (q_idx + kv_idx) % (w + 1) != 0

    bm = create_block_mask(mm, None, None, Lq, Lkv, device="cpu", BLOCK_SIZE=(qbs, kbs))
    partial, full = brute_force_blocks(mm, Lq, Lkv, qbs, kbs)
    assert torch.equal(bm.partial_blocks()[0, 0], partial)
    assert torch.equal(bm.full_blocks()[0, 0], full)


# ---- refine_block_mask: the same mask on a finer grid, mask_mod evaluated inside partial blocks only
def _assert_same_blocks(a, b):
    assert a.BLOCK_SIZE == b.BLOCK_SIZE and a.num_blocks == b.num_blocks and a.seq_lengths == b.seq_lengths
    assert torch.equal(a.partial_blocks(), b.partial_blocks())
    assert torch.equal(a.full_blocks(), b.full_blocks())
    assert torch.equal(a.q_num_blocks, b.q_num_blocks) and torch.equal(a.full_q_num_blocks, b.full_q_num_blocks)


def _doc_mask(L, cuts):
    return packed_documents(L, cuts)[1]


def _head_stride_mask(b, h, q_idx, kv_idx):
    return (q_idx - kv_idx) % (h + b + 2) == 0


@pytest.mark.parametrize("Lq,Lkv", [(256, 256), (250, 177), (192, 192), (40, 300)],
                         ids=["256x256", "250x177", "192x192_tail_block", "40x300"])
@pytest.mark.parametrize("name", ["document", "causal", "sliding_window_50", "per_batch_head"])
@pytest.mark.parametrize("fine", [32, (16, 32), 8], ids=["to32", "to16x32", "to8"])
def test_refine_matches_building_at_the_fine_size(name, Lq, Lkv, fine):
    mm = {"document": _doc_mask(max(Lq, Lkv), [17, 90, 91, 160]), "causal": generate_causal_mask(),
          "sliding_window_50": generate_sliding_window(50), "per_batch_head": _head_stride_mask}[name]
    B, H = (2, 3) if name == "per_batch_head" else (None, None)
    coarse = create_block_mask(mm, B, H, Lq, Lkv, device="cpu", BLOCK_SIZE=64)
    _assert_same_blocks(refine_block_mask(coarse, fine),
                        create_block_mask(mm, B, H, Lq, Lkv, device="cpu", BLOCK_SIZE=fine))


def test_refine_evaluates_only_partial_blocks(monkeypatch):
    import inductor_flex.block_mask as bmod

    seen = []
    real = bmod.eval_mask_blocks

    def spy(mm, b, h, q, kv):
        seen.append((q.shape, kv.shape))
        return real(mm, b, h, q, kv)

    coarse = create_block_mask(generate_causal_mask(), None, None, 512, 512, device="cpu", BLOCK_SIZE=128)
    monkeypatch.setattr(bmod, "eval_mask_blocks", spy)
    fine = refine_block_mask(coarse, 64)
    # the 4 diagonal blocks are the only partial ones: 4 tiles of 128 x 128 evaluated, not 512 x 512
    assert seen == [((4, 128), (4, 128))]
    assert int(fine.partial_blocks().sum()) == 8 and int(fine.full_blocks().sum()) == 28


def test_refine_rejects_a_size_that_does_not_divide():
    coarse = create_block_mask(generate_causal_mask(), None, None, 256, 256, device="cpu", BLOCK_SIZE=128)
    with pytest.raises(ValueError, match="must divide the mask's BLOCK_SIZE"):
        refine_block_mask(coarse, 48)


def test_refine_explains_a_failing_mask_mod():
    def broken(b, h, q_idx, kv_idx):
        return q_idx.float().nonexistent()  # noqa

    coarse = BlockMask.from_kv_blocks(torch.ones(1, 1, 2, dtype=torch.int32), torch.tensor([[[[0, 1], [1, 0]]]]),
                                      BLOCK_SIZE=64, mask_mod=broken)
    with pytest.raises(Exception, match="broken"):
        refine_block_mask(coarse, 32)


def test_create_block_mask_keeps_a_refinement_only_when_it_pays():
    L = 512
    doc = _doc_mask(L, [100, 230, 300])
    bm = create_block_mask(doc, None, None, L, L, device="cpu")
    _assert_same_blocks(bm.refined, create_block_mask(doc, None, None, L, L, device="cpu", BLOCK_SIZE=64))
    assert bm.to("cpu").refined is not None
    # causal S=1024: 64-blocks cover 94% of the 128-blocks' area, under the 10% saving asked
    assert create_block_mask(generate_causal_mask(), None, None, 1024, 1024, device="cpu").refined is None
    assert create_block_mask(doc, None, None, L, L, device="cpu", BLOCK_SIZE=64).refined is None
    assert create_block_mask(None, None, None, L, L, device="cpu").refined is None


@pytest.mark.parametrize("S", [256, 384, 512, 640, 896])
def test_causal_masks_never_keep_a_refinement(S):
    # a quarter block saved per row at every length: under the half-block rule on both sides of the
    # area share's 0.9 crossing (S=512 -> 640), so dynamic lengths do not change the BlockMask's pytree
    assert create_block_mask(generate_causal_mask(), None, None, S, S, device="cpu").refined is None


def test_no_refinement_kept_for_a_broadcast_mask_that_reads_the_head():
    def chunks_per_head(b, h, q_idx, kv_idx):
        w = 20 + 12 * h  # causal chunks, wider on later heads
        return (q_idx // w == kv_idx // w) & (q_idx >= kv_idx)

    assert create_block_mask(chunks_per_head, None, None, 512, 512, device="cpu").refined is None
    per_head = create_block_mask(chunks_per_head, 1, 2, 512, 512, device="cpu")
    _assert_same_blocks(per_head.refined, create_block_mask(chunks_per_head, 1, 2, 512, 512, device="cpu",
                                                            BLOCK_SIZE=64))


def _runs_by_hand(num, idx):
    return all(idx[r, :n].tolist() == list(range(int(idx[r, 0]), int(idx[r, 0]) + n))
               for r, n in enumerate(num.tolist()))


@pytest.mark.parametrize("name, expected", [
    ("causal", (True, True)), ("prefix_lm", (True, True)), ("narrow_window", (True, True)),
    ("wide_window", (False, False)),
    # a query block's partial kv blocks sit at its document's start and at the diagonal, full ones
    # between them (not one run); each kv block's query blocks are one run of each kind
    ("documents", (False, True)),
])
def test_block_runs(name, expected):
    """block_runs: whether every query block's partial kv blocks, and its full ones, are one
    ascending run each (side "kv"), and every kv block's query blocks (side "q"): what lets the
    kernels walk them with no index loads. Read by create_block_mask; checked against the lists."""
    from inductor_flex.block_mask import block_runs
    from inductor_flex.variants import generate_prefix_lm_mask

    L = 1024
    _, documents = packed_documents(L, [200, 450, 700])
    mods = {
        "causal": generate_causal_mask(), "prefix_lm": generate_prefix_lm_mask(300),
        # a window under two blocks: no full block between its partial ends
        "narrow_window": generate_sliding_window(100), "wide_window": generate_sliding_window(300),
        "documents": documents,
    }
    bm = create_block_mask(mods[name], None, None, L, L, device="cpu", BLOCK_SIZE=128)
    for side, lists in (("kv", ((bm.kv_num_blocks, bm.kv_indices), (bm.full_kv_num_blocks, bm.full_kv_indices))),
                        ("q", ((bm.q_num_blocks, bm.q_indices), (bm.full_q_num_blocks, bm.full_q_indices)))):
        by_hand = all(_runs_by_hand(num[0, 0], idx[0, 0]) for num, idx in lists)
        assert getattr(bm, "_runs_" + side) == block_runs(bm, side) == by_hand == expected[side == "q"], side


def test_block_runs_reads_only_the_listed_blocks_and_their_order():
    from inductor_flex.block_mask import block_runs

    def blocks(num, idx):
        num = torch.tensor(num, dtype=torch.int32).view(1, 1, -1)
        idx = torch.tensor(idx, dtype=torch.int32).view(1, 1, len(idx), -1)
        return BlockMask.from_kv_blocks(num, idx, BLOCK_SIZE=128)

    assert block_runs(blocks([2, 0, 3], [[2, 3, 0, 1], [3, 0, 1, 2], [1, 2, 3, 0]]))  # past num: ignored
    assert not block_runs(blocks([2, 3], [[3, 2, 0, 1], [0, 1, 2, 3]]))  # descending
    assert not block_runs(blocks([3, 1], [[0, 1, 3, 2], [0, 1, 2, 3]]))  # a gap


def test_full_from_mask_mod_follows_how_the_mask_was_built():
    """full_from_mask_mod: create_block_mask's full blocks are where its mask_mod holds, so a kernel
    may evaluate it there; kept by to(), slicing and refinement, and off for lists given by hand."""
    from inductor_flex.block_mask import refine_block_mask

    bm = create_block_mask(generate_causal_mask(), None, None, 256, 256, device="cpu", BLOCK_SIZE=128)
    assert bm.full_from_mask_mod
    assert bm.to("cpu").full_from_mask_mod and bm[:, :, 1:].full_from_mask_mod
    assert refine_block_mask(bm, 64).full_from_mask_mod
    def chunks(b, h, q_idx, kv_idx):  # causal within chunks of 50: the 64-grid saves enough to keep
        return (q_idx // 50 == kv_idx // 50) & (q_idx >= kv_idx)

    fine = create_block_mask(chunks, None, None, 256, 256, device="cpu", BLOCK_SIZE=128)
    assert fine.refined is not None and fine.refined.full_from_mask_mod  # the attached refinement too
    by_hand = BlockMask.from_kv_blocks(bm.kv_num_blocks, bm.kv_indices, bm.full_kv_num_blocks, bm.full_kv_indices,
                                       BLOCK_SIZE=128, mask_mod=bm.mask_mod)
    assert not by_hand.full_from_mask_mod
    assert not refine_block_mask(by_hand, 64).full_from_mask_mod


@pytest.mark.parametrize("name, expected", [
    ("causal", True), ("prefix_lm", True), ("narrow_window", True), ("wide_window", True), ("documents", True),
    ("gap", False),
])
def test_union_run(name, expected):
    """union_run: whether each query block's partial and full kv blocks together are one run (a wide
    window's partial blocks at both ends of its full ones are; blocks on both sides of a gap are
    not); checked against the lists."""
    from inductor_flex.block_mask import union_run
    from inductor_flex.variants import generate_prefix_lm_mask

    L = 1024
    _, documents = packed_documents(L, [200, 450, 700])
    mods = {
        "causal": generate_causal_mask(), "prefix_lm": generate_prefix_lm_mask(300),
        "narrow_window": generate_sliding_window(100), "wide_window": generate_sliding_window(300),
        "documents": documents, "gap": lambda b, h, q, kv: (kv < 200) | (kv >= 700),
    }
    bm = create_block_mask(mods[name], None, None, L, L, device="cpu", BLOCK_SIZE=128)
    rows = []
    for r in range(bm.kv_num_blocks.shape[-1]):
        blocks = sorted(bm.kv_indices[0, 0, r, :int(bm.kv_num_blocks[0, 0, r])].tolist()
                        + bm.full_kv_indices[0, 0, r, :int(bm.full_kv_num_blocks[0, 0, r])].tolist())
        rows.append(blocks == list(range(blocks[0], blocks[0] + len(blocks))) if blocks else True)
    assert bm._union_kv == union_run(bm) == all(rows) == expected


def test_union_run_needs_ascending_lists():
    from inductor_flex.block_mask import union_run

    num = torch.tensor([2, 1], dtype=torch.int32).view(1, 1, 2)
    idx = torch.tensor([[1, 0, 2], [0, 1, 2]], dtype=torch.int32).view(1, 1, 2, 3)
    assert not union_run(BlockMask.from_kv_blocks(num, idx, BLOCK_SIZE=128))  # [1, 0]: a run, not ascending
    idx = torch.tensor([[0, 1, 2], [0, 1, 2]], dtype=torch.int32).view(1, 1, 2, 3)
    assert union_run(BlockMask.from_kv_blocks(num, idx, BLOCK_SIZE=128))
