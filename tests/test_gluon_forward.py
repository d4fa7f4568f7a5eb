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
    227 KB of shared memory a Hopper block may use; so do softcap's and ALiBi's hooked kernels."""
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
        "from inductor_flex.printer import print_mod\n"
        "from inductor_flex.variants import generate_alibi_bias, generate_tanh_softcap\n"
        "for mod in (generate_tanh_softcap(30.0), generate_alibi_bias(16)):\n"
        "    src = G.hooked_source(print_mod(mod, 'score_mod', 'cpu', fast_tanh=True))\n"
        "    for causal in (False, True):\n"
        "        k = G.cross_compile(causal, 128, torch.bfloat16, hooked=src)\n"
        "        assert k.metadata.shared <= 232448, k.metadata.shared\n"
        "        ptx = k.asm['ptx']\n"
        "        assert 'wgmma.mma_async' in ptx and ('tanh.approx.f32' in ptx) == mod.__name__.startswith('softcap')\n"
        "        print('ok', mod.__name__, causal)\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    res = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=900)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    assert res.stdout.count("ok ") == 12


def _hook(source: str) -> str:
    return source[source.index("# >>> score hook"):source.index("# <<< score hook")]


def test_score_mod_printed_into_the_gluon_hook():
    """A score_mod's printed Triton becomes score_hook in a copy of the kernel's module: Gluon
    throughout, the rest of the module untouched; what Gluon cannot say keeps the template."""
    pytest.importorskip("triton.experimental.gluon")
    from inductor_flex.printer import print_mod
    from inductor_flex.variants import generate_alibi_bias, generate_head_scale, generate_tanh_softcap

    plain = G._module_source()
    src = G.hooked_source(print_mod(generate_tanh_softcap(30.0), "score_mod", "cpu", fast_tanh=True))
    hook = _hook(src)
    assert "def score_hook(qk, sm_scale, b, h, q_idx, kv_idx, caps):" in hook
    assert "return score_mod_scaled(qk, sm_scale, b, h, q_idx, kv_idx)" in hook
    assert "tanh.approx.f32" in hook and "gl.inline_asm_elementwise" in hook
    assert "tl." not in hook and "@triton.jit" not in hook and "softcap_30" in hook
    assert src.replace(hook, "") == plain.replace(_hook(plain), "")
    alibi = _hook(G.hooked_source(print_mod(generate_alibi_bias(16), "score_mod", "cpu")))
    assert "gl.exp2(" in alibi and "kv_idx - q_idx" in alibi

    sig = print_mod(lambda s, b, h, q, kv: torch.sigmoid(s), "score_mod", "cpu")
    assert "tl.sigmoid" in sig.source and G.hooked_source(sig) is None  # Gluon has no sigmoid
    caps = print_mod(generate_head_scale(torch.rand(4)), "score_mod", "cpu")
    assert G.hooked_source(caps) is None  # captured tensors: G.CAPTURED_OK


def test_gluon_dialect_gives_created_tiles_the_score_layout():
    pytest.importorskip("triton.experimental.gluon")
    src = ("@triton.jit\ndef score_mod_scaled(qk, qk_scale, b, h, q_idx, kv_idx):\n"
           "    t0 = tl.full([1, 1], 0, tl.int32) + tl.where(h < 0, h + 4, h)\n"
           "    return tl.where(q_idx >= kv_idx, qk + t0, tl.full(qk.shape, float('-inf'), tl.float32)), 1.0\n")
    out = G.gluon_dialect(src)
    assert out.startswith("@gluon.jit\ndef score_mod_scaled(qk, qk_scale, b, h, q_idx, kv_idx):\n"
                          "    _layout: gl.constexpr = qk.type.layout\n")
    assert "gl.full([1, 1], 0, gl.int32, _layout) + gl.where(h < 0, h + 4, h)" in out
    assert "gl.full(qk.shape, float('-inf'), gl.float32, _layout)" in out and "tl." not in out


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


def test_compiled_route_takes_score_mods_with_a_gluon_form(monkeypatch):
    """Under torch.compile a dense call with a score_mod goes to the custom op (whose plan runs the
    hooked kernel) when the mod prints to Gluon, captures no tensor and the length is from
    MIN_LEN_SCORE on; otherwise the Inductor template keeps it. (Hopper faked: the decision only.)"""
    pytest.importorskip("triton.experimental.gluon")
    if not compat.gluon_hopper_ready():
        pytest.skip("this Triton has no Gluon warp specialization")
    from inductor_flex.variants import generate_tanh_softcap

    monkeypatch.setattr(G, "available", lambda device: True)
    no_mask = (4096, 4096, None, None, None, None, None, None, None, None, 128, 128, None)

    def serves(score_mod, L=4096, bufs=(), opts=None):
        q = torch.empty(1, 2, L, 128, dtype=torch.bfloat16)
        return G.serves_compiled(q, q, q, score_mod, no_mask, opts or {}, bufs)

    softcap = generate_tanh_softcap(30.0)
    assert serves(softcap)
    assert not serves(softcap, L=G.MIN_LEN_SCORE[128] // 2)
    assert not serves(lambda s, b, h, q, kv: torch.sigmoid(s))
    assert not serves(lambda s, b, h, q, kv, t: s * t[h], bufs=(torch.ones(2),))
    assert not serves(softcap, opts={"GLUON": False})
    from inductor_flex.hop import identity_score

    assert serves(identity_score, L=G.MIN_LEN[128])


def test_compiled_op_recovers_the_printed_score_functions():
    """The custom op gets the rendered template's source; the hook is rebuilt from the score
    functions in it, the same as from the PrintedMod the eager path holds."""
    pytest.importorskip("triton.experimental.gluon")
    from inductor_flex.kernel import ForwardPlan
    from inductor_flex.printer import identity_mod, print_mod
    from inductor_flex.variants import generate_tanh_softcap

    sm = print_mod(generate_tanh_softcap(30.0), "score_mod", "cpu", fast_tanh=True)
    shell = ForwardPlan.__new__(ForwardPlan)
    shell.score, shell.mask = sm, identity_mod("mask_mod")
    rendered = ForwardPlan._render_uncached(shell)
    assert G.printed_score(rendered) == G.printed_score(sm.source) != ""
    assert "def mask_mod(" not in G.printed_score(rendered)
