"""torch.compile captures flex_attention whole: the HOP with the mods as subgraphs, vs float64."""
import pytest
import torch
import torch._dynamo.testing

from inductor_flex import AuxRequest, create_block_mask, flex_attention
from inductor_flex.hop import flex_attention_backward_hop, flex_attention_hop
from inductor_flex.reference import math_attention
from inductor_flex.variants import generate_causal_mask, generate_doc_mask_mod

from cases import SHAPES, VARIANTS, make_inputs, make_variant
from conftest import assert_close_to_reference, compile_counter, record_calls

BACKENDS = ["eager", "aot_eager"]


def _hop_nodes(gm):
    return [n for n in gm.graph.nodes if n.op == "call_function" and n.target is flex_attention_hop]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("shape", ["odd37_E40", "gqa4x2_E64_Ev32"])
@pytest.mark.parametrize("variant", VARIANTS)
def test_fullgraph_matches_reference(variant, shape, backend):
    dims = SHAPES[shape]
    B, Hq, Hkv, Lq, Lkv, E, Ev = dims
    q, k, v = make_inputs(dims, torch.float32, "cpu")
    score_mod, block_mask = make_variant(variant, Lq, Lkv, Hq, "cpu")

    def attn(q, k, v):
        return flex_attention(q, k, v, score_mod=score_mod, block_mask=block_mask, enable_gqa=Hq != Hkv,
                              return_lse=True)

    cnt = compile_counter(backend)
    out, lse = torch.compile(attn, backend=cnt, fullgraph=True)(q, k, v)
    assert cnt.frame_count == 1 and cnt.op_count >= 1
    assert len(_hop_nodes(cnt.graphs[0])) == 1
    ref_out, ref_lse, _ = math_attention(q.double(), k.double(), v.double(), score_mod, block_mask)
    low_out, low_lse, _ = math_attention(q, k, v, score_mod, block_mask)
    assert_close_to_reference(out, ref_out, low_out, torch.float32, "out")
    assert_close_to_reference(lse, ref_lse, low_lse, torch.float32, "lse")


def _doc_setup(L, n_docs=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.sort(torch.randint(0, n_docs, (L,), generator=g)).values
    bm = create_block_mask(generate_doc_mask_mod(generate_causal_mask(), ids), None, None, L, L, device="cpu",
                           BLOCK_SIZE=16)
    return bm


def _biased(q, k, v, bm, table):
    def rel_bias(score, b, h, q_idx, kv_idx):
        return score + table[h, kv_idx - q_idx + q.shape[2] - 1]

    return flex_attention(q, k, v, score_mod=rel_bias, block_mask=bm)


def test_captured_tensors_are_operands_not_constants():
    L = 48
    bm, table = _doc_setup(L), torch.randn(2, 2 * L - 1)
    q, k, v = make_inputs((1, 2, 2, L, L, 16, 16), torch.float32, "cpu")
    cnt = compile_counter("eager")
    torch.compile(_biased, backend=cnt, fullgraph=True)(q, k, v, bm, table)
    gm = cnt.graphs[0]
    (node,) = _hop_nodes(gm)
    score_bufs, mask_bufs = node.args[7], node.args[8]
    # the bias table feeds score_mod; document ids and offsets feed mask_mod: all graph inputs
    assert len(score_bufs) == 1 and score_bufs[0].op == "placeholder"
    assert len(mask_bufs) == 2 and all(b.op == "placeholder" for b in mask_bufs)
    assert not any(n.op == "get_attr" and isinstance(getattr(gm, n.target), torch.Tensor) for n in gm.graph.nodes)
    # the mods are FX subgraph modules
    assert isinstance(getattr(gm, node.args[3].target), torch.fx.GraphModule)
    assert isinstance(getattr(gm, node.args[4][-1].target), torch.fx.GraphModule)


@pytest.mark.parametrize("backend", BACKENDS)
def test_new_values_and_new_block_mask_do_not_recompile(backend):
    L = 48
    cnt = compile_counter(backend)
    compiled = torch.compile(_biased, backend=cnt, fullgraph=True)
    for seed in range(3):
        torch.manual_seed(seed)
        bm, table = _doc_setup(L, seed=seed), torch.randn(2, 2 * L - 1)
        q, k, v = make_inputs((1, 2, 2, L, L, 16, 16), torch.float32, "cpu")
        out = compiled(q, k, v, bm, table)
        ref = _biased(q.double(), k.double(), v.double(), bm, table)
        assert (out.double() - ref).abs().max() < 1e-5
    assert cnt.frame_count == 1


@pytest.mark.parametrize("backend", BACKENDS)
def test_dynamic_sequence_length_does_not_recompile(backend):
    cnt = compile_counter(backend)
    compiled = torch.compile(_biased, backend=cnt, fullgraph=True, dynamic=True)
    # 5 documents: the offsets' size never equals a block count here (duck sizing would tie them)
    for L in (40, 57, 72, 90):
        bm, table = _doc_setup(L, n_docs=5, seed=L), torch.randn(2, 2 * L - 1)
        q, k, v = make_inputs((1, 2, 2, L, L, 16, 16), torch.float32, "cpu")
        out = compiled(q, k, v, bm, table)
        ref = _biased(q.double(), k.double(), v.double(), bm, table)
        assert (out.double() - ref).abs().max() < 1e-5
    assert cnt.frame_count == 1
    (node,) = _hop_nodes(cnt.graphs[0])
    assert isinstance(node.args[0].meta["example_value"].shape[2], torch.SymInt)


@pytest.mark.parametrize("backend", BACKENDS)
def test_forward_backward_with_captured_grad(backend):
    L = 37
    bm = _doc_setup(L)
    table = torch.randn(2, 2 * L - 1, requires_grad=True)
    q, k, v = make_inputs((1, 2, 2, L, L, 24, 16), torch.float32, "cpu", requires_grad=True)

    def loss_fn(q, k, v):
        out, aux = flex_attention(q, k, v, score_mod=lambda s, b, h, m, n: s + table[h, n - m + L - 1],
                                  block_mask=bm, return_aux=AuxRequest(lse=True))
        return (out * out).sum() + aux.lse.sum() * 0.5

    cnt = compile_counter(backend)
    loss = torch.compile(loss_fn, backend=cnt, fullgraph=True)(q, k, v)
    grads = torch.autograd.grad(loss, (q, k, v, table))
    assert cnt.frame_count == 1
    leaves = [t.detach().double().requires_grad_(True) for t in (q, k, v, table)]
    q64, k64, v64, t64 = leaves
    out, lse, _ = math_attention(q64, k64, v64, lambda s, b, h, m, n: s + t64[h, n - m + L - 1], bm)
    ref = torch.autograd.grad((out * out).sum() + lse.sum() * 0.5, leaves)
    low = torch.autograd.grad(loss_fn(q, k, v), (q, k, v, table))
    for name, g, r, lo in zip(("dq", "dk", "dv", "dtable"), grads, ref, low):
        assert_close_to_reference(g, r, lo, torch.float32, name)


def test_aot_graph_holds_both_hops():
    """aot_eager's joint graph: forward HOP in the forward, backward HOP with its subgraphs in the backward."""
    from functorch.compile import make_boxed_func
    from torch._dynamo.backends.common import aot_autograd

    graphs = []

    def grab(gm, inputs):
        graphs.append(gm)
        return make_boxed_func(gm)

    L = 32
    bm = _doc_setup(L)
    q, k, v = make_inputs((1, 2, 2, L, L, 16, 16), torch.float32, "cpu", requires_grad=True)
    out = torch.compile(lambda q, k, v: flex_attention(q, k, v, block_mask=bm, score_mod=lambda s, b, h, m, n: s * 2),
                        backend=aot_autograd(fw_compiler=grab, bw_compiler=grab), fullgraph=True)(q, k, v)
    out.sum().backward()
    fw, bw = graphs
    assert any(n.target is flex_attention_hop for n in fw.graph.nodes)
    (bwd,) = [n for n in bw.graph.nodes if n.target is flex_attention_backward_hop]
    fw_graph, joint_graph = getattr(bw, bwd.args[7].target), getattr(bw, bwd.args[8].target)
    assert isinstance(fw_graph, torch.fx.GraphModule) and isinstance(joint_graph, torch.fx.GraphModule)
    # the joint of s * 2 is grad * 2
    score, grad = torch.tensor(1.5), torch.tensor(3.0)
    idx = [torch.tensor(0, dtype=torch.int32)] * 4
    assert joint_graph(score, *idx, grad)[0].item() == 6.0


def test_no_graph_break_inside_a_model():
    L = 40
    bm = _doc_setup(L)

    class Block(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.proj = torch.nn.Linear(32, 32)

        def forward(self, x):
            B, S, _ = x.shape
            qkv = self.proj(x).view(B, S, 2, 16).transpose(1, 2)
            return flex_attention(qkv, qkv, qkv, block_mask=bm).transpose(1, 2).reshape(B, S, 32) + x

    model = Block()
    x = torch.randn(1, L, 32)
    explanation = torch._dynamo.explain(model)(x)
    assert explanation.graph_break_count == 0 and explanation.graph_count == 1
    torch.testing.assert_close(torch.compile(model, backend="aot_eager", fullgraph=True)(x), model(x))


@pytest.mark.parametrize("variant", ["causal", "document", "relative_bias", "softcap"])
def test_eager_backend_runs_the_fused_kernel(variant, monkeypatch):
    """Under backend="eager" the HOP's eager rule takes the eager backend choice: here the Triton
    kernel (in the interpreter on CPU), with the traced mods and their operands printed into it."""
    from inductor_flex import kernel as K

    dims = SHAPES["odd37_E40"]
    B, Hq, Hkv, Lq, Lkv, E, Ev = dims
    q, k, v = make_inputs(dims, torch.float32, "cpu")
    score_mod, block_mask = make_variant(variant, Lq, Lkv, Hq, "cpu")
    launched = record_calls(monkeypatch, K, "run_forward", lambda plan, *a, **kw: plan.source)
    out = torch.compile(lambda q, k, v: flex_attention(q, k, v, score_mod=score_mod, block_mask=block_mask,
                                                       kernel_options={"BACKEND": "TRITON"}),
                        backend="eager", fullgraph=True)(q, k, v)
    monkeypatch.undo()
    assert len(launched) == 1 and "def flex_fwd_kernel" in launched[0]
    ref, _, _ = math_attention(q.double(), k.double(), v.double(), score_mod, block_mask)
    low, _, _ = math_attention(q, k, v, score_mod, block_mask)
    assert_close_to_reference(out, ref, low, torch.float32, "out")


@pytest.mark.parametrize("flag", [None, False], ids=["default", "refine_off"])
def test_compiled_call_takes_the_refinement_create_block_mask_kept(flag):
    # mask_mod cannot run while tracing: a document mask carries its 64 x 64 refinement into the graph
    S = 512
    ids = torch.zeros(S, dtype=torch.long)
    for cut in (100, 230, 300):
        ids[cut:] += 1
    bm = create_block_mask(generate_doc_mask_mod(generate_causal_mask(), ids), None, None, S, S, device="cpu")
    assert bm.refined is not None and bm.refined.BLOCK_SIZE == (64, 64)
    opts = None if flag is None else {"REFINE_BLOCK_MASK": flag}
    graphs = []

    def backend(gm, inputs):
        graphs.append(gm)
        return gm

    q, k, v = make_inputs((1, 2, 2, S, S, 32, 32), torch.float32, "cpu")
    out = torch.compile(lambda q, k, v: flex_attention(q, k, v, block_mask=bm, kernel_options=opts),
                        backend=backend, fullgraph=True)(q, k, v)
    (node,) = _hop_nodes(graphs[0])
    assert tuple(node.args[4][10:12]) == ((64, 64) if flag is None else (128, 128))
    ref, _, _ = math_attention(q.double(), k.double(), v.double(), None, bm)
    low, _, _ = math_attention(q, k, v, None, bm)
    assert_close_to_reference(out, ref, low, torch.float32)
