"""The decode kernel on the GPU (H100): bf16 / fp16 numerics vs the float64 oracle, including the
benchmark shape, paged vs contiguous, and CUDA graph capture of a decode step."""
import pytest
import torch

from inductor_flex import BlockMask, create_block_mask, flex_attention
from inductor_flex import decode as D
from inductor_flex.paged import PagedKVCache
from inductor_flex.reference import math_attention
from inductor_flex.validation import validate_kernel_options

from cases import make_inputs, make_variant
from conftest import assert_close_to_reference

pytestmark = pytest.mark.gpu
DECODE = {"BACKEND": "TRITON_DECODE"}


def _need_cuda():
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")


def assert_matches_reference(out, lse, q, k, v, score_mod=None, block_mask=None):
    ref_out, ref_lse, _ = math_attention(q.double(), k.double(), v.double(), score_mod, block_mask)
    low_out, low_lse, _ = math_attention(q, k, v, score_mod, block_mask)
    assert_close_to_reference(out, ref_out, low_out, q.dtype, "out")
    assert_close_to_reference(lse, ref_lse, low_lse, q.dtype, "lse")


def check(q, k, v, score_mod=None, block_mask=None, opts=DECODE):
    out, lse = flex_attention(q, k, v, score_mod=score_mod, block_mask=block_mask, enable_gqa=q.shape[1] != k.shape[1],
                              return_lse=True, kernel_options=opts)
    torch.cuda.synchronize()
    assert_matches_reference(out, lse, q, k, v, score_mod, block_mask)
    return out, lse


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("S", [8192, 1000], ids=lambda s: f"S{s}")
def test_benchmark_shape(S, dtype):
    _need_cuda()
    q, k, v = make_inputs((8, 32, 8, 1, S, 128, 128), dtype, "cuda")
    check(q, k, v)
    check(q, k, v, opts={"BACKEND": "AUTO"})


@pytest.mark.parametrize("variant", ["causal", "sliding_window", "document", "alibi", "softcap",
                                     "relative_bias", "random_blocks", "empty_rows"])
@pytest.mark.parametrize("group,Lq", [(1, 1), (4, 4), (8, 16)], ids=["gqa1-Lq1", "gqa4-Lq4", "gqa8-Lq16"])
def test_variants_bf16(variant, group, Lq):
    _need_cuda()
    Lkv = 3001
    q, k, v = make_inputs((2, 4 * group, 4, Lq, Lkv, 128, 128), torch.bfloat16, "cuda")
    score_mod, bm = make_variant(variant, Lq, Lkv, 4 * group, "cuda", block=128)
    check(q, k, v, score_mod, bm, opts={**DECODE, "SPLIT_KV": 3, "BLOCK_N": 64})  # pinned: no autotuning


@pytest.mark.parametrize("variant", ["noop", "causal", "document", "softcap", "empty_rows"])
@pytest.mark.parametrize("split", [1, 3], ids=lambda s: f"split{s}")
def test_tma_descriptor_loads_bf16(variant, split):
    # kernel_options USE_TMA: K/V tiles through tensor descriptors; odd S_kv, E=40 / Ev=24 (rows and
    # columns past the tensor come back 0) and the benchmark's head dim
    _need_cuda()
    for shape in ((2, 16, 4, 3, 3001, 40, 24), (2, 32, 8, 1, 4099, 128, 128)):
        q, k, v = make_inputs(shape, torch.bfloat16, "cuda")
        score_mod, bm = make_variant(variant, shape[3], shape[4], shape[1], "cuda", block=128)
        check(q, k, v, score_mod, bm, opts={**DECODE, "USE_TMA": True, "SPLIT_KV": split, "BLOCK_N": 64})


def test_paged_matches_contiguous_bf16():
    _need_cuda()
    B, Hq, Hkv, E, L, ps = 4, 32, 8, 128, 5000, 128
    cache = PagedKVCache(B * 40 + 3, ps, B, device="cuda")
    g = torch.Generator().manual_seed(0)
    cache.free_pages = [cache.free_pages[i] for i in torch.randperm(cache.n_pages, generator=g).tolist()]
    for b in range(B):
        cache.reserve(b, L)
    q, k, v = make_inputs((B, Hq, Hkv, 1, L, E, E), torch.bfloat16, "cuda")
    k_pool = torch.zeros(1, Hkv, cache.capacity, E, dtype=torch.bfloat16, device="cuda")
    v_pool = torch.zeros_like(k_pool)
    idx = torch.arange(B, device="cuda")
    cache.assign(idx, torch.arange(L, device="cuda")[None].expand(B, L), k, v, k_pool, v_pool)
    bm = create_block_mask(lambda b, h, qi, kv: kv < L, None, None, 1, L, device="cuda", BLOCK_SIZE=128)
    phys = cache.convert_logical_block_mask(bm, idx)
    paged = flex_attention(q, k_pool.expand(B, -1, -1, -1), v_pool.expand(B, -1, -1, -1), block_mask=phys,
                           enable_gqa=True, kernel_options=DECODE)
    contiguous = flex_attention(q, k, v, block_mask=bm, enable_gqa=True, kernel_options=DECODE)
    ref, _, _ = math_attention(q.double(), k.double(), v.double(), None, bm)
    low, _, _ = math_attention(q, k, v, None, bm)
    assert_close_to_reference(paged, ref, low, torch.bfloat16, "paged")
    assert_close_to_reference(contiguous, ref, low, torch.bfloat16, "contiguous")


def test_cuda_graph_replays_new_offsets():
    _need_cuda()
    B, Hq, Hkv, E, MAX = 2, 16, 4, 128, 2048
    offset = torch.zeros((), dtype=torch.int64, device="cuda")

    def causal_at_offset(b, h, q_idx, kv_idx):
        return q_idx + offset >= kv_idx

    # one BlockMask row listing every kv block as partial: mask_mod masks per position, so the same
    # graph serves every offset
    n = MAX // 128
    bm = BlockMask.from_kv_blocks(torch.full((1, 1, 1), n, dtype=torch.int32, device="cuda"),
                                  torch.arange(n, dtype=torch.int32, device="cuda").view(1, 1, 1, n),
                                  BLOCK_SIZE=128, mask_mod=causal_at_offset, seq_lengths=(1, MAX))
    q = torch.randn(B, Hq, 1, E, dtype=torch.bfloat16, device="cuda")
    k = torch.randn(B, Hkv, MAX, E, dtype=torch.bfloat16, device="cuda")
    v = torch.randn_like(k)
    flex_attention(q, k, v, block_mask=bm, enable_gqa=True, kernel_options=DECODE)  # warm up: compile, plan
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = flex_attention(q, k, v, block_mask=bm, enable_gqa=True, kernel_options=DECODE)
    for pos in (5, 700, 2047):
        offset.fill_(pos)
        graph.replay()
        torch.cuda.synchronize()
        ref, _, _ = math_attention(q.double(), k[:, :, :pos + 1].double(), v[:, :, :pos + 1].double())
        low, _, _ = math_attention(q, k[:, :, :pos + 1], v[:, :, :pos + 1])
        assert_close_to_reference(out, ref, low, torch.bfloat16, f"pos {pos}")
    assert D.stats["plans"] >= 1


@pytest.mark.parametrize("split", [5, 32], ids=lambda s: f"split{s}")
def test_in_kernel_merge_is_deterministic(split):
    # the last share of a group merges every share's stores: a visibility race would show up as
    # results that change from one launch to the next, or differ from the one-share kernel
    _need_cuda()
    q, k, v = make_inputs((8, 32, 8, 1, 8192, 128, 128), torch.bfloat16, "cuda")
    opts = {**DECODE, "SPLIT_KV": split, "BLOCK_N": 64}
    first = flex_attention(q, k, v, enable_gqa=True, kernel_options=opts)
    for _ in range(50):
        again = flex_attention(q, k, v, enable_gqa=True, kernel_options=opts)
        assert torch.equal(again, first)
    one = flex_attention(q, k, v, enable_gqa=True, kernel_options={**DECODE, "SPLIT_KV": 1, "BLOCK_N": 64})
    assert (one.float() - first.float()).abs().max().item() < 2e-2
    check(q, k, v, opts=opts)


def _two_queries_one_plan():
    """Two decode steps of one plan (same shapes, 8 shares merged in-kernel), their results
    computed one after the other, and two side streams to run them on at once."""
    q, k, v = make_inputs((4, 32, 8, 1, 4096, 128, 128), torch.bfloat16, "cuda")
    q2 = torch.randn_like(q)
    opts = {**DECODE, "SPLIT_KV": 8, "BLOCK_N": 64}
    want = [flex_attention(x, k, v, enable_gqa=True, kernel_options=opts) for x in (q, q2)]
    return (q, q2), k, v, opts, want, [torch.cuda.Stream(), torch.cuda.Stream()]


def test_two_streams_do_not_share_merge_counters_or_scratch():
    _need_cuda()
    (q, q2), k, v, opts, want, streams = _two_queries_one_plan()
    torch.cuda.synchronize()
    outs = [[], []]
    for _ in range(20):
        for i, (s, x) in enumerate(zip(streams, (q, q2))):
            with torch.cuda.stream(s):
                outs[i].append(flex_attention(x, k, v, enable_gqa=True, kernel_options=opts))
    torch.cuda.synchronize()
    for i in range(2):
        for o in outs[i]:
            assert torch.equal(o, want[i])
    # the plan kept one merge scratch per stream it ran on (the default stream and the two side ones)
    plan = D.get_plan(q, k, v, None, None, validate_kernel_options(opts))
    assert sorted(s for s, _ in plan.parts) == sorted({torch.cuda.current_stream().cuda_stream,
                                                       *(s.cuda_stream for s in streams)})


@pytest.mark.parametrize("variant", ["noop", "causal", "alibi", "softcap", "document"])
def test_compiled_decode_bf16(variant):
    # torch.compile of a decode step runs the split-KV decode op (lowering/decode.py)
    from torch._inductor.utils import run_and_get_code

    _need_cuda()
    S = 8192 if variant == "noop" else 3001
    q, k, v = make_inputs((8, 32, 8, 1, S, 128, 128), torch.bfloat16, "cuda")
    score_mod, bm = make_variant(variant, 1, S, 32, "cuda", block=128)
    fn = torch.compile(lambda q, k, v: flex_attention(q, k, v, score_mod=score_mod, block_mask=bm, enable_gqa=True,
                                                      return_lse=True), fullgraph=True)
    (out, lse), code = run_and_get_code(fn, q, k, v)
    assert "inductor_flex.flex_decode" in code[0] and "def flex_decode_kernel" in code[0]
    assert_matches_reference(out, lse, q, k, v, score_mod, bm)


def test_two_graphs_of_one_plan_replay_concurrently():
    # each captured launch has its own merge counters, so graphs of one plan may overlap
    _need_cuda()
    queries, k, v, opts, want, streams = _two_queries_one_plan()
    graphs, outs = [], []
    for x in queries:
        g = torch.cuda.CUDAGraph()
        with torch.cuda.graph(g):
            outs.append(flex_attention(x, k, v, enable_gqa=True, kernel_options=opts))
        graphs.append(g)
    torch.cuda.synchronize()
    for _ in range(20):
        for g, s in zip(graphs, streams):
            with torch.cuda.stream(s):
                g.replay()
        torch.cuda.synchronize()
        for o, w in zip(outs, want):
            assert torch.equal(o, w)


@pytest.mark.parametrize("masked", [False, True], ids=["dense", "offset_causal"])
def test_reduce_overhead_decode_steps(masked):
    """A compiled decode step under mode="reduce-overhead" (CUDA graphs): the kernel's cached
    helpers (arrival counters, the dense default BlockMask, launch views) stay out of the graphs'
    memory pool, nothing makes Inductor skip the graphs, and replays with a new query and offset
    match the reference."""
    from torch._dynamo.utils import counters

    _need_cuda()
    B, Hq, Hkv, S, D = 2, 8, 2, 1000, 64
    k = torch.randn(B, Hkv, S, D, device="cuda", dtype=torch.bfloat16)
    v = torch.randn_like(k)
    offset = torch.zeros((), dtype=torch.int64, device="cuda")

    def causal_at_offset(b, h, q_idx, kv_idx):
        return q_idx + offset >= kv_idx

    full = create_block_mask(lambda b, h, q_idx, kv_idx: q_idx >= kv_idx, None, None, S, S, device="cuda")
    torch._dynamo.reset()
    counters.clear()

    def step(q, bm):
        return flex_attention(q, k, v, block_mask=bm, enable_gqa=True)

    compiled = torch.compile(step, mode="reduce-overhead", fullgraph=True)
    for i, pos in enumerate((300, 301, 517, 999)):
        torch.compiler.cudagraph_mark_step_begin()
        q = torch.randn(B, Hq, 1, D, device="cuda", dtype=torch.bfloat16)
        bm = None
        if masked:
            offset.fill_(pos)
            bm = full[:, :, pos // 128]
            bm.mask_mod = causal_at_offset
        out = compiled(q, bm).clone()
        ref_mask = None
        if masked:
            ref_mask = create_block_mask(lambda b, h, q_idx, kv_idx: pos >= kv_idx, None, None, 1, S, device="cuda")
        ref, _, _ = math_attention(q.double(), k.double(), v.double(), None, ref_mask)
        low, _, _ = math_attention(q, k, v, None, ref_mask)
        assert_close_to_reference(out, ref, low, torch.bfloat16, f"out (step {i}, position {pos})")
    assert not counters["inductor"]["cudagraph_skips"], dict(counters["inductor"])
    assert counters["inductor"]["cudagraph_recorded_non_static_inputs"] > 0, dict(counters["inductor"])


def test_force_use_flex_attention_runs_the_forward_kernel_eager_and_compiled():
    # PyTorch's knob: short queries on the forward kernel, never the decode kernel or op
    _need_cuda()
    from torch._inductor.utils import run_and_get_code

    q, k, v = make_inputs((2, 8, 2, 1, 1000, 64, 64), torch.bfloat16, "cuda")
    opts = {"FORCE_USE_FLEX_ATTENTION": True}
    before = D.stats["plans"] + D.stats["plan_hits"]
    with torch.no_grad():
        out, lse = flex_attention(q, k, v, enable_gqa=True, return_lse=True, kernel_options=opts)
    torch.cuda.synchronize()
    assert D.stats["plans"] + D.stats["plan_hits"] == before
    assert_matches_reference(out, lse, q, k, v)
    fn = torch.compile(lambda q, k, v: flex_attention(q, k, v, enable_gqa=True, return_lse=True, kernel_options=opts),
                       fullgraph=True)
    with torch.no_grad():
        (out, lse), code = run_and_get_code(fn, q, k, v)
    assert "flex_decode" not in "".join(code)
    assert_matches_reference(out, lse, q, k, v)
