"""The runnable examples of the docs (README's quick example, docs/decoding.md, docs/gallery.md)
run as written (on CPU: the README's "cuda" becomes "cpu") and give the attention they promise.
docs/api.md and docs/guide.md hold signatures and fragments, not programs."""
import os
import re

import torch

from inductor_flex.reference import math_attention

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def blocks(path):
    with open(os.path.join(ROOT, path)) as f:
        return re.findall(r"```python\n(.*?)```", f.read(), re.S)


def run(code, name, ns=None):
    ns = {} if ns is None else ns
    exec(compile(code, name, "exec"), ns)
    return ns


def test_readme_quick_example():
    (code,) = blocks("README.md")
    if not torch.cuda.is_available():
        code = code.replace('device="cuda"', 'device="cpu"')
    ns = run(code, "README.md")
    q, k, v = ns["q"], ns["k"], ns["v"]
    assert ns["out"].shape == q.shape
    ref, _, _ = math_attention(q.double(), k.double(), v.double(), ns["alibi"], ns["block_mask"])
    assert (ns["out"].double() - ref).abs().max().item() < 5e-2


def test_decoding_offset_loop_example():
    code = blocks("docs/decoding.md")[0]
    ns = run(code, "docs/decoding.md#offsets")
    pos, q, k, v = ns["pos"], ns["q_step"], ns["k_cache"], ns["v_cache"]
    # the last step attends to keys 0..pos
    ref, _, _ = math_attention(q.double(), k[:, :, :pos + 1].double(), v[:, :, :pos + 1].double())
    assert (ns["out"].double() - ref).abs().max().item() < 5e-2


def test_decoding_paged_cache_example():
    code = blocks("docs/decoding.md")[1]
    ns = run(code, "docs/decoding.md#paged")
    q, k, v = ns["q"], ns["k_new"], ns["v_new"]
    # reading the shuffled-in pages with logical positions equals attention over the contiguous tokens
    ref, _, _ = math_attention(q.double(), k.double(), v.double(), ns["score_mod"])
    assert (ns["out"].double() - ref).abs().max().item() < 5e-2
    assert len(ns["cache"].free_pages) == ns["n_pages"]  # erase gave every page back


def test_gallery_examples_run():
    ns = {}  # the page's first block holds the imports of the others
    for i, code in enumerate(blocks("docs/gallery.md")):
        run(code, f"docs/gallery.md#{i}", ns)
    assert callable(ns["score_mod"]) and callable(ns["mask_mod"])
