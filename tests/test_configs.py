"""lowering/configs.py and the forward's warp-specialization rules (inductor_flex/kernel.py): which
candidates a call may time, and which layouts the specialized kernel may read."""
import torch

from inductor_flex import BlockMask, create_block_mask
from inductor_flex import kernel as K
from inductor_flex.lowering.configs import Config, filter_warp_specialize, forward_configs, warp_specialize_supported
from inductor_flex.variants import generate_alibi_bias, generate_causal_mask, generate_sliding_window

PLAIN = Config(128, 64, 8, 3)
WS = Config(128, 128, 4, 2, True)


def test_warp_specialized_candidates_follow_the_option():
    both = [PLAIN, WS]
    assert filter_warp_specialize(both, {}) == both
    assert filter_warp_specialize(both, {"WARP_SPECIALIZE": False}) == [PLAIN]
    assert filter_warp_specialize(both, {"WARP_SPECIALIZE": True}) == [WS]
    # where it cannot build, the option is overridden; asking for it then leaves the plain ones
    assert filter_warp_specialize(both, {"WARP_SPECIALIZE": True}, applies=False) == [PLAIN]
    assert filter_warp_specialize([PLAIN], {"WARP_SPECIALIZE": True}) == [PLAIN]


def test_no_warp_specialization_off_hopper():
    assert not warp_specialize_supported(torch.device("cpu"))
    configs = forward_configs(128, 128, torch.bfloat16, (128, 128), torch.device("cpu"))
    assert configs and not any(c.warp_specialize for c in configs)
    assert Config(1, 2, 3, 4) == Config(1, 2, 3, 4, False)  # four-field configs stay unspecialized


def test_rows_layout():
    t = torch.empty(2, 3, 40, 64)
    assert K.rows_layout(t)
    assert not K.rows_layout(t.transpose(1, 2).contiguous().transpose(1, 2))  # [B, L, H, D] storage
    assert not K.rows_layout(t[:, :, :33])  # a slice of the length: heads 40 rows apart, not 33
    assert K.rows_layout(t[:1, :1, :33])  # one head: only its own rows are read
    assert not K.rows_layout(t[:, :1])  # one head of three, two batches: batch stride 3 heads


def test_warp_specialization_applies_without_captured_tensors_to_block_masks_of_runs():
    q = torch.randn(1, 2, 1024, 64)
    kv = torch.randn(1, 2, 1024, 64)

    def plan(score_mod=None, block_mask=None, **opts):
        return K.ForwardPlan(q, kv, kv, score_mod, block_mask, None, {"BACKEND": "TRITON", **opts})

    def mask(mask_mod, block=128):
        return create_block_mask(mask_mod, None, None, 1024, 1024, device="cpu", BLOCK_SIZE=block)

    assert K.ws_applies(plan())
    assert K.ws_applies(plan(generate_alibi_bias(2)))  # slopes computed from h: nothing captured
    bias = torch.randn(2)
    assert not K.ws_applies(plan(lambda s, b, h, qi, ki: s + bias[h]))
    causal = mask(generate_causal_mask())
    assert K.ws_applies(plan(None, causal, REFINE_BLOCK_MASK=False))
    assert not K.ws_applies(plan(None, causal, REFINE_BLOCK_MASK=False, KV_RUNS=False))
    assert not K.ws_applies(plan(None, mask(generate_causal_mask(), 64)))  # the 128-tiles do not divide
    # a window over two blocks wide: partial blocks at both ends of the full ones, not two runs, but
    # one run together (block_mask.union_run), which the specialized loop walks where the full
    # blocks came from the mask_mod; not for the same lists given by hand
    window = mask(generate_sliding_window(300))
    assert K.ws_applies(plan(None, window, REFINE_BLOCK_MASK=False))
    by_hand = BlockMask.from_kv_blocks(window.kv_num_blocks, window.kv_indices, window.full_kv_num_blocks,
                                       window.full_kv_indices, BLOCK_SIZE=128, mask_mod=window.mask_mod)
    assert not K.ws_applies(plan(None, by_hand, REFINE_BLOCK_MASK=False))
    # blocks on both sides of a gap: no run at all
    assert not K.ws_applies(plan(None, mask(lambda b, h, qi, ki: (ki < 200) | (ki >= 700)), REFINE_BLOCK_MASK=False))
    limit = torch.tensor(300)
    assert not K.ws_applies(plan(None, mask(lambda b, h, qi, ki: ki < limit), REFINE_BLOCK_MASK=False))


def test_the_specialized_loop_runs_mask_mod_on_full_blocks_only_where_they_came_from_it():
    """MASK_ON_FULL: create_block_mask's full blocks are where its mask_mod holds, so the specialized
    loop may evaluate it on every tile; for lists given by hand it keeps mask_mod off full blocks."""
    q = torch.randn(1, 2, 512, 64, dtype=torch.bfloat16)
    opts = {"BACKEND": "TRITON", "BLOCK_M": 128, "BLOCK_N": 128, "num_warps": 4, "num_stages": 2,
            "WARP_SPECIALIZE": True}
    causal = create_block_mask(generate_causal_mask(), None, None, 512, 512, device="cpu")
    by_hand = BlockMask.from_kv_blocks(causal.kv_num_blocks, causal.kv_indices, causal.full_kv_num_blocks,
                                       causal.full_kv_indices, BLOCK_SIZE=128, mask_mod=causal.mask_mod)

    def consts(block_mask):
        plan = K.ForwardPlan(q, q, q, None, block_mask, None, opts)
        plan.interpret = False  # as on the GPU: the interpreter alone never specializes
        return K.forward_launch(plan, q, q, q, torch.empty_like(q), q, q, plan.pinned)[2]

    assert consts(causal)["WARP_SPECIALIZE"] and consts(causal)["MASK_ON_FULL"]
    assert consts(by_hand)["WARP_SPECIALIZE"] and not consts(by_hand)["MASK_ON_FULL"]
    plain = dict(opts, WARP_SPECIALIZE=False)
    plan = K.ForwardPlan(q, q, q, None, causal, None, plain)
    assert not K.forward_launch(plan, q, q, q, torch.empty_like(q), q, q, plan.pinned)[2]["MASK_ON_FULL"]


def test_a_pinned_warp_specialized_config_launches_plain_where_it_cannot_build():
    q = torch.randn(1, 2, 256, 64, dtype=torch.bfloat16)
    causal = create_block_mask(generate_causal_mask(), None, None, 256, 256, device="cpu")
    opts = {"BACKEND": "TRITON", "BLOCK_M": 128, "BLOCK_N": 128, "num_warps": 4, "num_stages": 2,
            "WARP_SPECIALIZE": True}
    out, lse = torch.empty_like(q), torch.empty(1, 2, 256)

    def launched_specialized(block_mask, dtype=torch.bfloat16):
        x = q.to(dtype)
        plan = K.ForwardPlan(x, x, x, None, block_mask, None, opts)
        plan.interpret = False  # as on the GPU: the interpreter alone never specializes
        assert plan.pinned.warp_specialize
        return K.forward_launch(plan, x, x, x, out.to(dtype), lse, lse, plan.pinned)[2]["WARP_SPECIALIZE"]

    assert launched_specialized(None)
    assert launched_specialized(causal)  # its kv blocks are runs (block_mask.block_runs)
    limit = torch.tensor(100)  # a mask_mod's load inside the specialized loop: not built
    assert not launched_specialized(create_block_mask(lambda b, h, qi, ki: ki < limit, None, None, 256, 256,
                                                      device="cpu"))
    assert not launched_specialized(None, torch.float32)
