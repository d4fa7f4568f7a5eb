"""The Gluon forward's host side on CPU: which BlockMasks count as causal for it, and that each of its
modes builds for sm_90 (the kernel runs in test_gluon_forward_gpu.py; Gluon has no interpreter)."""
import os
import subprocess
import sys

import pytest
import torch

from inductor_flex import compat, create_block_mask
from inductor_flex import gluon_forward as G
from inductor_flex.variants import generate_causal_mask, generate_prefix_lm_mask, generate_sliding_window


def _strict_causal(b, h, q_idx, kv_idx):
    return q_idx > kv_idx


def _causal_but_batch1(b, h, q_idx, kv_idx):
    # causal's blocks, but batch 1's diagonal excluded
    return (q_idx >= kv_idx) & ((b == 0) | (q_idx != kv_idx))


def _causal_but_head2(b, h, q_idx, kv_idx):
    return (q_idx >= kv_idx) & ((h != 2) | (q_idx - kv_idx != 5))


# name: (mask_mod, BlockMask B, H, BLOCK_SIZE, (Lq, Lkv), call's (B, Hq), causal?)
CASES = {
    "causal": (generate_causal_mask(), None, None, 128, (512, 512), (2, 3), True),
    "causal_per_batch_head": (generate_causal_mask(), 2, 3, 128, (512, 512), (2, 3), True),
    "causal_one_tile": (generate_causal_mask(), None, None, 128, (128, 128), (1, 1), True),
    "causal_64_blocks": (generate_causal_mask(), None, None, 64, (512, 512), (1, 1), False),
    "strict_causal": (_strict_causal, None, None, 128, (512, 512), (1, 1), False),
    "sliding_window_256": (generate_sliding_window(256), None, None, 128, (512, 512), (1, 1), False),
    "prefix_lm_128": (generate_prefix_lm_mask(128), None, None, 128, (512, 512), (1, 1), False),
    "causal_lq_ne_lkv": (generate_causal_mask(), None, None, 128, (256, 512), (1, 1), False),
    "batch_1_differs": (_causal_but_batch1, None, None, 128, (384, 384), (2, 1), False),
    "head_2_differs": (_causal_but_head2, None, None, 128, (384, 384), (1, 4), False),
    "head_2_differs_not_called": (_causal_but_head2, None, None, 128, (384, 384), (1, 2), True),
}


@pytest.mark.parametrize("name", list(CASES))
def test_causal_block_mask_recognition(name):
    mask_mod, bB, bH, block, (Lq, Lkv), (B, Hq), want = CASES[name]
    bm = create_block_mask(mask_mod, bB, bH, Lq, Lkv, device="cpu", BLOCK_SIZE=block)
    got = Lq == Lkv and G.is_causal_block_mask(bm, B, Hq, Lq)
    assert got == want


def test_causal_recognition_skips_oversized_checks(monkeypatch):
    """Past the evaluation budget the kernel is not used, rather than checked in part."""
    bm = create_block_mask(generate_causal_mask(), None, None, 512, 512, device="cpu")
    assert G.is_causal_block_mask(bm, 2, 2, 512)
    monkeypatch.setattr(G, "_MAX_CHECK", 2 * 2 * 512 * 128 - 1)
    assert not G.is_causal_block_mask(bm, 2, 2, 512)


def test_gluon_path_off_without_cuda():
    assert not G.available(torch.device("cpu"))


@pytest.mark.skipif(torch.cuda.is_available(), reason="the GPU suite runs the kernel itself")
@pytest.mark.skipif(not compat.gluon_hopper_ready(), reason="this Triton has no Gluon warp specialization")
def test_gluon_forward_compiles_for_sm90():
    """Every mode (dense, causal) x head dim (64, 128) x dtype builds to sm_90 cubin, within the
    227 KB of shared memory a Hopper block may use."""
    script = (
        "import torch\n"
        "from inductor_flex import gluon_forward as G\n"
        "for causal in (False, True):\n"
        "    for d in (64, 128):\n"
        "        for dt in (torch.bfloat16, torch.float16):\n"
        "            k = G.cross_compile(causal, d, dt)\n"
        "            assert k.metadata.shared <= 232448, k.metadata.shared\n"
        "            assert 'wgmma.mma_async' in k.asm['ptx'] and 'setmaxnreg' in k.asm['ptx']\n"
        "            print('ok', causal, d, dt)\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    res = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=900)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    assert res.stdout.count("ok ") == 8


def test_identity_score_mod_detected_in_dynamo_subgraphs():
    """Under torch.compile the HOP's score_mod is Dynamo's subgraph: a call without a score_mod (and
    one whose score_mod returns the score) counts as identity for the compiled route to the Gluon
    kernel; any computation does not."""
    import inductor_flex as ifx
    from inductor_flex.hop import flex_attention_hop

    seen = []

    def backend(gm, inputs):
        for n in gm.graph.nodes:
            if n.op == "call_function" and n.target is flex_attention_hop:
                seen.append(G.is_identity_score(getattr(gm, n.args[3].target)))
        return gm.forward

    q = torch.randn(1, 2, 64, 16)
    mods = (None, lambda s, b, h, qi, kv: s * 2, lambda s, b, h, qi, kv: s, lambda s, b, h, qi, kv: s + qi - qi)
    for sm in mods:
        torch._dynamo.reset()
        fn = torch.compile(lambda q, k, v: ifx.flex_attention(q, k, v, score_mod=sm), backend=backend, fullgraph=True)
        fn(q, q, q)
    assert seen == [True, False, True, False]


@pytest.mark.parametrize("mode", ["dense", "causal"])
def test_kernel_source_shows_the_gluon_kernel_where_it_runs(mode, monkeypatch):
    """kernel_source returns the module a call runs: the Gluon kernel's where the plan takes it
    (faked here: it needs a Hopper GPU), the template's with GLUON=False."""
    pytest.importorskip("triton.experimental.gluon")
    if not compat.gluon_hopper_ready():
        pytest.skip("this Triton has no Gluon warp specialization")
    import inductor_flex

    monkeypatch.setattr(G, "plan_mode", lambda plan, q, k, v: None if plan.opts.get("GLUON") is False else mode)
    q = torch.randn(1, 2, 256, 64)
    bm = create_block_mask(generate_causal_mask(), None, None, 256, 256, device="cpu") if mode == "causal" else None
    src = inductor_flex.kernel_source(q, q, q, block_mask=bm)
    assert f"mode '{mode}'" in src and "def flex_fwd_gluon(" in src and "warp_specialize" in src
    tmpl = inductor_flex.kernel_source(q, q, q, block_mask=bm, kernel_options={"GLUON": False})
    assert "def flex_fwd_kernel(" in tmpl and "flex_fwd_gluon" not in tmpl
    # a layout the kernel cannot read through TMA: the template runs, and is shown
    qt = q.transpose(1, 2).contiguous().transpose(1, 2)
    assert "def flex_fwd_kernel(" in inductor_flex.kernel_source(qt, qt, qt, block_mask=bm)
