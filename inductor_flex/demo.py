"""A guided tour of inductor-flex: ``python -m inductor_flex.demo`` (or ``bash scripts/demo.sh``).

For four attention variants (causal, sliding window, ALiBi, document mask) it runs
``flex_attention`` twice, once through the fused Triton kernel (BACKEND "TRITON") and once
through the math path (BACKEND "MATH"), compares both to a float64 reference and prints a table.
Then it draws the document mask's BlockMask and shows the start of the generated kernel.

On a CUDA machine: bfloat16, B=2, H=8, S=2048, D=64, the default 128x128 mask blocks.
Without CUDA: float32, B=1, H=2, S=200 (an odd length, so the kernel's edge masking is
exercised), D=64, 32x32 mask blocks, and the kernel runs in Triton's interpreter
(TRITON_INTERPRET=1), so its timings say nothing about GPU speed.

Exit status: 0 when every error is within tolerance, 1 otherwise.
"""
from __future__ import annotations

import os
import sys

import torch

_HAS_CUDA = torch.cuda.is_available()
if not _HAS_CUDA and "TRITON_INTERPRET" not in os.environ:
    # must precede the first import of triton: @triton.jit picks the interpreter at decoration time
    os.environ["TRITON_INTERPRET"] = "1"
    if "triton" in sys.modules:
        # `python -m inductor_flex.demo` imports the package, and triton with it, before this module
        # runs: start again, with the interpreter chosen before that first import
        os.execv(sys.executable, [sys.executable, "-m", "inductor_flex.demo", *sys.argv[1:]])

import argparse  # noqa: E402
import time  # noqa: E402
from typing import Callable, List, Optional  # noqa: E402

import inductor_flex  # noqa: E402
from inductor_flex import create_block_mask, flex_attention  # noqa: E402
from inductor_flex.reference import math_attention  # noqa: E402
from inductor_flex.variants import (  # noqa: E402
    generate_alibi_bias,
    generate_causal_mask,
    generate_doc_mask_mod,
    generate_sliding_window,
)

# max |out - out_fp64| allowed, per input dtype
TOLERANCE = {torch.float32: 1e-4, torch.bfloat16: 3e-2, torch.float16: 5e-3}


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _time_ms(fn: Callable[[], torch.Tensor], device: torch.device, reps: int) -> tuple:
    """One warm-up call (compiles / autotunes / prints the mods), then the mean of ``reps`` calls."""
    out = fn()
    _sync(device)
    t0 = time.perf_counter()
    for _ in range(reps):
        out = fn()
    _sync(device)
    return out, (time.perf_counter() - t0) * 1e3 / reps


def _random_doc_ids(S: int, n_docs: int, device: torch.device, seed: int = 11) -> torch.Tensor:
    """document_ids for S packed tokens split into n_docs documents of random (non-empty) lengths."""
    g = torch.Generator().manual_seed(seed)
    cuts = torch.randperm(S - 1, generator=g)[: n_docs - 1].sort().values + 1
    lengths = torch.diff(torch.cat([torch.tensor([0]), cuts, torch.tensor([S])]))
    return torch.repeat_interleave(torch.arange(n_docs), lengths).to(device), lengths.tolist()


def _kernel_usable(device: torch.device) -> Optional[str]:
    """None if the Triton kernel can run here, else why not."""
    if device.type == "cuda":
        return None
    from inductor_flex.kernel import interpreter_enabled

    if not interpreter_enabled():
        return ("CPU tensors need Triton's interpreter, but TRITON_INTERPRET is "
                f"{os.environ.get('TRITON_INTERPRET')!r}; unset it or set it to 1")
    return None


def main(argv: Optional[List[str]] = None) -> int:
    p = argparse.ArgumentParser(prog="python -m inductor_flex.demo", description=__doc__.splitlines()[0])
    p.add_argument("--seq-len", type=int, default=None, help="sequence length (default 2048 on CUDA, 200 on CPU)")
    p.add_argument("--source-lines", type=int, default=25, help="lines of generated kernel source to print")
    args = p.parse_args(argv)

    torch.manual_seed(0)
    device = torch.device("cuda" if _HAS_CUDA else "cpu")
    if _HAS_CUDA:
        B, H, S, D, dtype, block, window, reps = 2, 8, args.seq_len or 2048, 64, torch.bfloat16, 128, 256, 10
    else:
        B, H, S, D, dtype, block, window, reps = 1, 2, args.seq_len or 200, 64, torch.float32, 32, 64, 1
    tol = TOLERANCE[dtype]
    where = torch.cuda.get_device_name(device) if _HAS_CUDA else "CPU (kernel in the Triton interpreter)"
    print(f"inductor-flex {inductor_flex.__version__} demo | torch {torch.__version__} | {where}")
    print(f"shapes: B={B} H={H} S={S} D={D} dtype={str(dtype).replace('torch.', '')} "
          f"mask BLOCK_SIZE={block} | tolerance vs float64: {tol:g}\n")

    q, k, v = (torch.randn(B, H, S, D, device=device, dtype=dtype) for _ in range(3))
    q64, k64, v64 = q.double(), k.double(), v.double()

    doc_ids, doc_lengths = _random_doc_ids(S, 4, device)
    variants = [
        ("causal", None, generate_causal_mask()),
        (f"sliding window {window}", None, generate_sliding_window(window)),
        ("ALiBi", generate_alibi_bias(H), None),
        ("document (causal)", None, generate_doc_mask_mod(generate_causal_mask(), doc_ids)),
    ]

    skip_kernel = _kernel_usable(device)
    if skip_kernel:
        print(f"note: skipping the Triton kernel rows: {skip_kernel}\n")
    backends = ([] if skip_kernel else ["TRITON"]) + ["MATH"]

    rows, failed, masks = [], False, {}
    for name, score_mod, mask_mod in variants:
        bm = None
        if mask_mod is not None:
            bm = create_block_mask(mask_mod, None, None, S, S, device=device, BLOCK_SIZE=block)
            masks[name] = bm
        sparsity = bm.sparsity() if bm is not None else 0.0
        ref = math_attention(q64, k64, v64, score_mod, bm)[0]
        for backend in backends:
            def call(backend=backend):
                return flex_attention(q, k, v, score_mod=score_mod, block_mask=bm,
                                      kernel_options={"BACKEND": backend})

            with torch.no_grad():
                out, ms = _time_ms(call, device, reps)
            diff = (out.double() - ref).abs()
            err = diff.max().item() if torch.isfinite(diff).all() else float("inf")
            ok = err <= tol
            failed |= not ok
            rows.append((name, backend, err, ms, sparsity, ok))

    header = ("variant", "backend", "max abs err vs fp64", "time ms", "sparsity%")
    widths = (max(len(header[0]), *(len(r[0]) for r in rows)), 8, 20, 10, 9)
    line = " | ".join(h.ljust(w) for h, w in zip(header, widths))
    print(line)
    print("-" * len(line))
    for name, backend, err, ms, sparsity, ok in rows:
        cells = (name, backend, f"{err:.2e}" + ("" if ok else "  FAIL"), f"{ms:.2f}", f"{sparsity:.1f}")
        print(" | ".join(c.ljust(w) for c, w in zip(cells, widths)))
    if not _HAS_CUDA:
        print("(CPU timings: TRITON is the interpreter executing the kernel in Python, not a speed figure)")

    doc_name = variants[3][0]
    print(f"\nBlockMask of the document mask (document lengths {doc_lengths}):")
    print("  '██' full block (mask_mod skipped), '░░' partial block (mask_mod applied), '  ' skipped")
    print(masks[doc_name].to_string())

    if not skip_kernel:
        causal_bm = masks["causal"]
        src = inductor_flex.kernel_source(q, k, v, block_mask=causal_bm, kernel_options={"BACKEND": "TRITON"})
        lines = src.splitlines()
        n = args.source_lines
        print(f"\ninductor_flex.kernel_source(...) for the causal case: first {n} of {len(lines)} lines")
        print("\n".join("    " + ln for ln in lines[:n]))
        start = next((i for i, ln in enumerate(lines) if ln.startswith("# ---- hooks")), None)
        if start is not None and start >= n:
            end = next((i for i in range(start + 1, len(lines)) if lines[i].startswith("def _load_tile")), start + 12)
            print("    ...")
            print("\n".join("    " + ln for ln in lines[start:end - 1]).rstrip())
            print("    ...")

    print("\nPASS: every error is within tolerance" if not failed else f"\nFAIL: an error exceeds {tol:g}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
