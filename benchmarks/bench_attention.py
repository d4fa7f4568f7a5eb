#!/usr/bin/env python
"""Attention throughput benchmark: inductor-flex against PyTorch's FlexAttention and SDPA.

Peers
  ours           inductor_flex.flex_attention, eager (fused Triton forward)
  ours_compiled  torch.compile(inductor_flex.flex_attention, fullgraph=True)
  torch_flex     torch.compile(torch.nn.attention.flex_attention.flex_attention) + its create_block_mask
  sdpa_flash     F.scaled_dot_product_attention under SDPBackend.FLASH_ATTENTION  (noop / causal only)
  sdpa_cudnn     F.scaled_dot_product_attention under SDPBackend.CUDNN_ATTENTION  (noop / causal only)

Cases: noop, causal, alibi, softcap, sliding_window, document, prefix_lm.

TFLOP/s count only unmasked work: fwd = 4·B·H·D·(unmasked (q, kv) pairs), fwd+bwd = 3.5 × fwd.
The unmasked pair count is exact: a closed form per case, cross-checked by evaluating the
mask_mod chunk by chunk (never the full S×S grid at once).

Everything runs in one process and never aborts on a failing peer or case: the failure is
recorded as "error: ..." in the table and the JSON, and the run goes on. Results are rewritten
after every (case, S, D), so an interrupted run still leaves its JSON and markdown behind.

    python benchmarks/bench_attention.py --quick --out benchmarks/results
    python benchmarks/bench_attention.py --dims 64,128 --shapes 1024x16,4096x4,16384x1 --max-seconds 1800
    python benchmarks/bench_attention.py --dry-run          # CPU, tiny shapes: checks the harness only
"""
from __future__ import annotations

import argparse
import datetime as _dt
import gc
import json
import os
import platform
import statistics
import subprocess
import sys
import time
import traceback
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional, Tuple

import torch
import torch.nn.functional as F

ALL_CASES = ("noop", "causal", "alibi", "softcap", "sliding_window", "document", "prefix_lm")
ALL_PEERS = ("ours", "ours_compiled", "torch_flex", "sdpa_flash", "sdpa_cudnn")
CASE_ALIASES = {"sliding": "sliding_window", "window": "sliding_window", "doc": "document",
                "document_mask": "document", "prefix": "prefix_lm", "prefixlm": "prefix_lm", "full": "noop"}
SDPA_CASES = {"noop": False, "causal": True}   # case -> is_causal; the only cases SDPA can express
BWD_FLOP_FACTOR = 3.5                           # fwd+bwd flops = 3.5 x fwd flops (fwd 2 GEMMs, bwd 5)
QUICK_CONFIGS = [(4096, 4, 128, c) for c in ("noop", "causal", "alibi", "softcap", "document")] + [
    (1024, 16, 128, "document")]
# CUDA errors after which the context is unusable: every later call would fail too
_FATAL_CUDA = ("illegal memory access", "device-side assert", "unspecified launch failure",
               "an illegal instruction", "misaligned address", "CUDA error: unknown error")


# ------------------------------------------------------------------------------------------ cases
@dataclass
class Case:
    name: str
    S: int
    score_mod: Optional[Callable] = None
    mask_mod: Optional[Callable] = None
    sdpa_causal: Optional[bool] = None      # None: SDPA cannot express this case
    analytic_pairs: Optional[int] = None    # unmasked (q, kv) pairs per (b, h), closed form
    detail: str = ""


def document_ids(S: int, num_docs: int, seed: int) -> torch.Tensor:
    """Non-decreasing document ids of S packed tokens split into num_docs random non-empty docs."""
    n = max(1, min(num_docs, S))
    g = torch.Generator().manual_seed(seed)
    cuts = (torch.randperm(S - 1, generator=g)[: n - 1] + 1).sort().values if n > 1 else torch.empty(0, dtype=torch.long)
    bounds = torch.cat([torch.zeros(1, dtype=torch.long), cuts, torch.full((1,), S, dtype=torch.long)])
    lengths = bounds[1:] - bounds[:-1]
    return torch.repeat_interleave(torch.arange(n, dtype=torch.int32), lengths)


def build_case(name: str, S: int, H: int, device, args) -> Case:
    from inductor_flex import variants as V

    if name == "noop":
        return Case(name, S, sdpa_causal=False, analytic_pairs=S * S)
    if name == "causal":
        return Case(name, S, mask_mod=V.generate_causal_mask(), sdpa_causal=True, analytic_pairs=S * (S + 1) // 2)
    if name == "alibi":
        return Case(name, S, score_mod=V.generate_alibi_bias(H), analytic_pairs=S * S)
    if name == "softcap":
        return Case(name, S, score_mod=V.generate_tanh_softcap(args.softcap), analytic_pairs=S * S,
                    detail=f"cap={args.softcap:g}")
    if name == "sliding_window":
        W = args.window
        pairs = S * (S + 1) // 2 if S <= W else W * (W + 1) // 2 + (S - W) * W
        return Case(name, S, mask_mod=V.generate_sliding_window(W), analytic_pairs=pairs, detail=f"window={W}")
    if name == "document":
        ids = document_ids(S, args.num_docs, args.doc_seed)
        lengths = torch.bincount(ids.to(torch.int64)).tolist()
        pairs = sum(L * (L + 1) // 2 for L in lengths)
        mm = V.generate_doc_mask_mod(V.generate_causal_mask(), ids.to(device))
        return Case(name, S, mask_mod=mm, analytic_pairs=pairs,
                    detail=f"{len(lengths)} docs (seed {args.doc_seed}), causal; lengths {lengths}")
    if name == "prefix_lm":
        P = min(args.prefix, S)
        pairs = P * P + S * (S + 1) // 2 - P * (P + 1) // 2
        return Case(name, S, mask_mod=V.generate_prefix_lm_mask(args.prefix), analytic_pairs=pairs,
                    detail=f"prefix={args.prefix}")
    raise ValueError(f"unknown case {name!r}; known: {', '.join(ALL_CASES)}")


def count_unmasked_pairs(mask_mod: Optional[Callable], S: int, device, chunk_elems: int = 1 << 24) -> int:
    """Exact number of (q, kv) pairs the mask keeps, for b = h = 0, evaluated in row chunks."""
    if mask_mod is None:
        return S * S
    from inductor_flex.mods import eval_mask_grid

    zero = torch.zeros(1, dtype=torch.long, device=device)
    kv = torch.arange(S, device=device)
    rows = max(1, chunk_elems // S)
    total = 0
    with torch.no_grad():
        for q0 in range(0, S, rows):
            q = torch.arange(q0, min(S, q0 + rows), device=device)
            total += int(eval_mask_grid(mask_mod, zero, zero, q, kv).sum().item())
    return total


# ------------------------------------------------------------------------------------------ peers
_compiled: Dict[str, Callable] = {}


def _compiled_fn(key: str, fn: Callable, fullgraph: bool, mode: Optional[str] = None) -> Callable:
    if key not in _compiled:
        _compiled[key] = torch.compile(fn, fullgraph=fullgraph, dynamic=False, mode=mode)
    return _compiled[key]


def make_peer(peer: str, case: Case, S: int, device, args) -> Tuple[Optional[Callable], Optional[str]]:
    """(fn(q, k, v) -> out, None), or (None, reason) when the peer cannot express the case."""
    if peer in ("ours", "ours_compiled"):
        import inductor_flex as ifx

        bm = ifx.create_block_mask(case.mask_mod, None, None, S, S, device=device) if case.mask_mod else None
        opts = args.ours_kernel_options
        kw = {"kernel_options": dict(opts)} if opts else {}
        attn = ifx.flex_attention if peer == "ours" else _compiled_fn("ours", ifx.flex_attention, args.fullgraph,
                                                                           args.compile_mode)
        sm = case.score_mod
        return (lambda q, k, v: attn(q, k, v, score_mod=sm, block_mask=bm, **kw)), None
    if peer == "torch_flex":
        from torch.nn.attention.flex_attention import create_block_mask, flex_attention

        bm = None
        if case.mask_mod is not None:
            try:
                bm = create_block_mask(case.mask_mod, None, None, S, S, device=device, _compile=True)
            except TypeError:  # a torch without _compile
                bm = create_block_mask(case.mask_mod, None, None, S, S, device=device)
        attn = _compiled_fn("torch_flex", flex_attention, args.fullgraph, args.compile_mode)
        sm = case.score_mod
        return (lambda q, k, v: attn(q, k, v, score_mod=sm, block_mask=bm)), None
    if peer in ("sdpa_flash", "sdpa_cudnn"):
        if case.sdpa_causal is None:
            return None, "n/a"
        from torch.nn.attention import SDPBackend, sdpa_kernel

        backend = SDPBackend.FLASH_ATTENTION if peer == "sdpa_flash" else SDPBackend.CUDNN_ATTENTION
        causal = case.sdpa_causal

        def sdpa(q, k, v):
            with sdpa_kernel(backend):
                return F.scaled_dot_product_attention(q, k, v, is_causal=causal)

        return sdpa, None
    raise ValueError(f"unknown peer {peer!r}; known: {', '.join(ALL_PEERS)}")


# ----------------------------------------------------------------------------------------- timing
def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def bench_ms(fn: Callable, device, args, grad_to_none=None) -> float:
    """Median time of fn() in ms, after warmup."""
    if device.type == "cuda":
        try:
            from triton.testing import do_bench

            return float(do_bench(fn, warmup=args.warmup_ms, rep=args.rep_ms, grad_to_none=grad_to_none,
                                  return_mode="median"))
        except ImportError:
            pass
        # CUDA-event fallback: warmup, then median of reps
        for _ in range(3):
            fn()
        _sync(device)
        times = []
        deadline = time.perf_counter() + args.rep_ms / 1e3
        while len(times) < 5 or (time.perf_counter() < deadline and len(times) < 1000):
            if grad_to_none:
                for t in grad_to_none:
                    t.grad = None
            s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            s.record()
            fn()
            e.record()
            e.synchronize()
            times.append(s.elapsed_time(e))
        return statistics.median(times)
    fn()  # CPU: one warmup call, then the median of a few
    times = []
    for _ in range(args.cpu_reps):
        if grad_to_none:
            for t in grad_to_none:
                t.grad = None
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def first_call_s(fn: Callable, device) -> float:
    _sync(device)
    t0 = time.perf_counter()
    fn()
    _sync(device)
    return time.perf_counter() - t0


def peak_mb(fn: Callable, device) -> Optional[float]:
    """Peak CUDA memory above what was allocated before the call, in MiB (None off CUDA)."""
    if device.type != "cuda":
        fn()
        return None
    gc.collect()
    _sync(device)
    torch.cuda.reset_peak_memory_stats(device)
    base = torch.cuda.memory_allocated(device)
    fn()
    _sync(device)
    return (torch.cuda.max_memory_allocated(device) - base) / 2**20


def capture_graph(step: Callable, device, warmup: int = 3) -> Callable:
    """One CUDA graph of step() (after warm-up calls on a side stream, as torch.cuda.graph asks);
    returns its replay. A replay costs the host one launch, so its time is the step's GPU work."""
    side = torch.cuda.Stream(device)
    side.wait_stream(torch.cuda.current_stream(device))
    with torch.cuda.stream(side):
        for _ in range(warmup):
            step()
    torch.cuda.current_stream(device).wait_stream(side)
    _sync(device)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        step()
    _sync(device)
    return graph.replay


def tflops(flops: float, ms: Optional[float]) -> Optional[float]:
    if ms is None or ms <= 0:
        return None
    return flops / (ms * 1e-3) / 1e12


def short_error(e: BaseException, limit: int = 400) -> str:
    """One line: the error's first line plus the lines that say where (dynamo's debug context and
    the user-code frame it names)."""
    lines = [ln.strip() for ln in f"{type(e).__name__}: {e}".splitlines() if ln.strip()]
    if not lines:
        return type(e).__name__
    keep = [lines[0]]
    for i, ln in enumerate(lines[1:], 1):
        if ln.startswith("Developer debug context") or (lines[i - 1].startswith("from user code") and ln.startswith("File")):
            keep.append(ln)
    if len(keep) == 1 and len(lines) > 1:
        keep.append(lines[1])
    msg = " | ".join(keep)
    return msg if len(msg) <= limit else msg[: limit - 3] + "..."


def _is_fatal(e: BaseException) -> bool:
    m = str(e)
    return any(s in m for s in _FATAL_CUDA)


class PeerTimeout(Exception):
    pass


_ALARM = {"fired": False}  # set by the SIGALRM handler: a library may wrap PeerTimeout in its own error


class _Alarm:
    """Raise PeerTimeout in the main thread after `seconds` (0: off). Python-level work only: a
    call stuck inside one C function (a kernel, a compiler subprocess wait) is interrupted when it
    returns to Python."""

    def __init__(self, seconds: float):
        import signal
        import threading

        self.seconds = seconds if hasattr(signal, "setitimer") and threading.current_thread() is threading.main_thread() else 0

    def __enter__(self):
        if self.seconds:
            import signal

            _ALARM["fired"] = False

            def _raise(signum, frame):
                _ALARM["fired"] = True
                raise PeerTimeout(f"peer exceeded --peer-timeout {self.seconds:g}s")

            self._old = signal.signal(signal.SIGALRM, _raise)
            signal.setitimer(signal.ITIMER_REAL, self.seconds)
        return self

    def __exit__(self, *exc):
        if self.seconds:
            import signal

            signal.setitimer(signal.ITIMER_REAL, 0)
            signal.signal(signal.SIGALRM, self._old)
        return False


def _free(device):
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


# ------------------------------------------------------------------------------------- one config
def _eager_forward_tunings() -> dict:
    """The eager forward autotuner's picks so far (key -> Config): which tile config ours ran."""
    try:
        from inductor_flex import kernel as K

        return dict(K._autotuned)
    except Exception:  # noqa: BLE001 - a benchmark annotation, never a failure
        return {}


def run_peer(peer: str, case: Case, q, k, v, dout, device, args, pairs: int, B: int, H: int, D: int,
             outputs: Dict[str, torch.Tensor]) -> dict:
    S = case.S
    fwd_flops = 4.0 * B * H * D * pairs
    r = {"peer": peer, "status": "ok", "fwd_flops": fwd_flops, "fwdbwd_flops": BWD_FLOP_FACTOR * fwd_flops}
    tuned_before = _eager_forward_tunings()
    t0 = time.perf_counter()
    try:
        fn, reason = make_peer(peer, case, S, device, args)
        _sync(device)
    except Exception as e:  # noqa: BLE001 - a failing peer is a result, not a crash
        r.update(status="error", error=short_error(e), traceback=traceback.format_exc(limit=6))
        print(f"    error (setup): {r['error']}", flush=True)
        return r
    r["setup_s"] = time.perf_counter() - t0
    if fn is None:
        r.update(status=reason)
        return r
    qkv = (q, k, v)
    # under CUDA graphs (compile modes reduce-overhead, max-autotune) every call is a new step: the
    # previous call's outputs may be overwritten
    graphs = bool(args.compile_mode) and args.compile_mode != "default" and "no-cudagraphs" not in args.compile_mode
    mark = torch.compiler.cudagraph_mark_step_begin if graphs else (lambda: None)
    if graphs:
        # q, k, v stand for activations made inside a model's graph: static addresses, so a replay
        # does not time copying them into the graph's input buffers
        for t in qkv:
            torch._dynamo.mark_static_address(t)

    def fwd():
        mark()
        with torch.no_grad():
            return fn(q, k, v)

    def fwdbwd():
        mark()
        if graphs or args.cuda_graph:  # a gradient accumulated into would be the previous replay's output
            for t in qkv:
                t.grad = None
        out = fn(q, k, v)
        out.backward(dout)

    def timed(step: Callable, key: str, grad_to_none=None) -> float:
        # --cuda-graph: the step's GPU time with no host work between kernels, for every peer alike
        if not args.cuda_graph:
            return bench_ms(step, device, args, grad_to_none=grad_to_none)
        replay = capture_graph(step, device)
        r[key + "_graphed"] = True
        return bench_ms(replay, device, args)

    # forward
    try:
        r["first_fwd_s"] = first_call_s(fwd, device)
        out = fwd()
        if args.check:
            outputs[peer] = out.detach().clone()  # (a CUDA graph's output is overwritten by its next replay)
            r["out_finite"] = bool(torch.isfinite(out).all().item())
        del out
        r["peak_fwd_mb"] = peak_mb(fwd, device)
        r["fwd_ms"] = timed(fwd, "fwd")
        r["fwd_tflops"] = tflops(fwd_flops, r["fwd_ms"])
        picked = [str(c) for key, c in _eager_forward_tunings().items() if key not in tuned_before]
        if picked:
            r["forward_configs"] = picked
            print(f"    {peer} forward config: {', '.join(picked)}", flush=True)
    except Exception as e:  # noqa: BLE001
        r["fwd_error"] = short_error(e)
        r["fwd_traceback"] = traceback.format_exc(limit=6)
        print(f"    error (fwd): {r['fwd_error']}", flush=True)
        if _is_fatal(e):
            r["fatal"] = True
            return r
        if isinstance(e, PeerTimeout) or _ALARM["fired"]:
            r.update(status="error", error=r["fwd_error"], timed_out=True)
            return r
    _free(device)
    # forward + backward (fresh grads each call)
    if not args.fwd_only:
        try:
            for t in qkv:
                t.grad = None
            r["first_fwdbwd_s"] = first_call_s(fwdbwd, device)
            for t in qkv:
                t.grad = None
            r["peak_fwdbwd_mb"] = peak_mb(fwdbwd, device)
            r["fwdbwd_ms"] = timed(fwdbwd, "fwdbwd", grad_to_none=list(qkv))
            r["fwdbwd_tflops"] = tflops(BWD_FLOP_FACTOR * fwd_flops, r["fwdbwd_ms"])
        except Exception as e:  # noqa: BLE001
            r["fwdbwd_error"] = short_error(e)
            r["fwdbwd_traceback"] = traceback.format_exc(limit=6)
            print(f"    error (fwd+bwd): {r['fwdbwd_error']}", flush=True)
            if _is_fatal(e):
                r["fatal"] = True
        for t in qkv:
            t.grad = None
    if "fwd_error" in r and ("fwdbwd_error" in r or args.fwd_only):
        r["status"] = "error"
        r["error"] = r["fwd_error"]
    elif "fwd_error" in r or "fwdbwd_error" in r:
        r["status"] = "partial"
    del fn
    _free(device)
    return r


def run_config(case_name: str, S: int, B: int, D: int, device, dtype, args, density_cache: dict) -> dict:
    H = args.heads
    cfg = {"case": case_name, "S": S, "B": B, "H": H, "D": D, "dtype": str(dtype).replace("torch.", ""),
           "peers": []}
    t_cfg = time.perf_counter()
    if hasattr(torch, "_dynamo"):
        torch._dynamo.reset()  # fresh compile per config: honest first-call times, no recompile limits
    case = build_case(case_name, S, H, device, args)
    cfg["detail"] = case.detail
    key = (case_name, S)
    if key not in density_cache:
        counted = count_unmasked_pairs(case.mask_mod, S, device) if args.count_density else None
        if counted is not None and case.analytic_pairs is not None and counted != case.analytic_pairs:
            print(f"  warning: {case_name} S={S}: counted {counted} unmasked pairs, closed form says "
                  f"{case.analytic_pairs}; using the count", flush=True)
        density_cache[key] = (counted if counted is not None else case.analytic_pairs, counted, case.analytic_pairs)
    pairs, counted, analytic = density_cache[key]
    cfg.update(unmasked_pairs=pairs, density=pairs / (S * S), counted_pairs=counted, analytic_pairs=analytic)

    torch.manual_seed(args.seed)
    q, k, v = (torch.randn(B, H, S, D, device=device, dtype=dtype, requires_grad=True) for _ in range(3))
    dout = torch.randn(B, H, S, D, device=device, dtype=dtype)
    outputs: Dict[str, torch.Tensor] = {}
    for peer in args.peers:
        print(f"  [{time.perf_counter() - args._t0:7.1f}s] {case_name} S={S} B={B} D={D}: {peer} ...", flush=True)
        try:
            with _Alarm(args.peer_timeout):
                r = run_peer(peer, case, q, k, v, dout, device, args, pairs, B, H, D, outputs)
        except PeerTimeout as e:  # raised outside run_peer's own handlers (e.g. between stages)
            r = {"peer": peer, "status": "error", "error": short_error(e)}
            print(f"    error: {r['error']}", flush=True)
            for t in (q, k, v):
                t.grad = None
            _free(device)
        cfg["peers"].append(r)
        if r.get("fatal"):
            cfg["fatal"] = True
            break
    # accuracy: max |out - ref| against the first reference peer that produced an output
    if args.check and outputs:
        ref = next((p for p in ("torch_flex", "sdpa_cudnn", "sdpa_flash", "ours") if p in outputs), None)
        cfg["ref_peer"] = ref
        if ref is not None:
            ro = outputs[ref].float()
            for r in cfg["peers"]:
                o = outputs.get(r["peer"])
                if o is not None:
                    try:
                        r["max_abs_diff"] = float((o.float() - ro).abs().max().item())
                    except Exception as e:  # noqa: BLE001
                        r["max_abs_diff_error"] = short_error(e)
            del ro
    del q, k, v, dout, outputs, case
    _free(device)
    cfg["wall_s"] = time.perf_counter() - t_cfg
    return cfg


# ---------------------------------------------------------------------------------------- reports
def _f(x, nd=1) -> str:
    if x is None:
        return "-"
    if x != x:
        return "nan"
    return f"{x:.{nd}f}" if abs(x) >= 10 ** (1 - nd) or x == 0 else f"{x:.2g}"


def _cell_err(msg: str, width: int = 110) -> str:
    msg = msg.replace("|", "/").replace("\n", " ")
    return "error: " + (msg if len(msg) <= width else msg[: width - 3] + "...")


def _pair(a: str, b: Optional[str], fwd_only: bool) -> str:
    return a if fwd_only or b is None else f"{a} / {b}"


def config_table(cfg: dict, fwd_only: bool) -> str:
    by = {r["peer"]: r for r in cfg["peers"]}

    def ratio(r, other, key):
        o = by.get(other)
        if o is None or r.get(key) is None or o.get(key) is None or not o[key]:
            return "-"
        return f"{r[key] / o[key]:.2f}"

    head = (f"### {cfg['case']}  S={cfg['S']} B={cfg['B']} H={cfg['H']} D={cfg['D']} {cfg['dtype']}  "
            f"density={cfg['density']:.4f}" + (f"  ({cfg['detail']})" if cfg.get("detail") else ""))
    if len(head) > 300:
        head = head[:297] + "..."
    cols = ["peer", "fwd TFLOP/s", "fwd+bwd TFLOP/s", "ratio /torch_flex (fwd / f+b)", "ratio /cudnn (fwd / f+b)",
            "peak MB (fwd / f+b)", "first call s (fwd / f+b)", f"max abs diff vs {cfg.get('ref_peer') or '-'}"]
    if fwd_only:
        cols = [c.replace(" (fwd / f+b)", "") for c in cols]
        del cols[2]
    lines = [head, "", "| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for r in cfg["peers"]:
        st = r.get("status")
        if st == "n/a":
            cells = [r["peer"]] + ["n/a"] * (len(cols) - 1)
        elif st == "error" and "fwd_error" not in r:
            cells = [r["peer"], _cell_err(r.get("error", "?"))] + ["-"] * (len(cols) - 2)
        else:
            fwd = _cell_err(r["fwd_error"]) if "fwd_error" in r else _f(r.get("fwd_tflops"))
            if "fwdbwd_error" in r:
                fb = "error: (same)" if r["fwdbwd_error"] == r.get("fwd_error") else _cell_err(r["fwdbwd_error"])
            elif r.get("timed_out") and r.get("fwdbwd_tflops") is None:
                fb = "skipped (timeout)"
            else:
                fb = _f(r.get("fwdbwd_tflops"))
            cells = [r["peer"], fwd]
            if not fwd_only:
                cells.append(fb)
            cells += [
                _pair(ratio(r, "torch_flex", "fwd_tflops"), ratio(r, "torch_flex", "fwdbwd_tflops"), fwd_only),
                _pair(ratio(r, "sdpa_cudnn", "fwd_tflops"), ratio(r, "sdpa_cudnn", "fwdbwd_tflops"), fwd_only),
                _pair(_f(r.get("peak_fwd_mb"), 0), _f(r.get("peak_fwdbwd_mb"), 0), fwd_only),
                _pair(_f(r.get("first_fwd_s"), 2), _f(r.get("first_fwdbwd_s"), 2), fwd_only),
                "-" if r.get("max_abs_diff") is None else f"{r['max_abs_diff']:.2e}"
                + ("" if r.get("out_finite", True) else " (non-finite!)"),
            ]
        lines.append("| " + " | ".join(cells) + " |")
    if cfg.get("fatal"):
        lines.append("")
        lines.append("CUDA context broken by a peer in this config: remaining peers and configs skipped.")
    return "\n".join(lines)


def summary_table(results: List[dict], fwd_only: bool) -> str:
    cols = ["case", "S", "B", "D", "density", "ours fwd", "torch_flex fwd", "ours/torch_flex fwd"]
    if not fwd_only:
        cols += ["ours f+b", "torch_flex f+b", "ours/torch_flex f+b"]
    lines = ["## Summary (TFLOP/s)", "", "| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]

    def val(r, key):
        if r is None:
            return None
        return r.get(key)

    for cfg in results:
        by = {r["peer"]: r for r in cfg["peers"]}
        o, t = by.get("ours"), by.get("torch_flex")
        cells = [cfg["case"], str(cfg["S"]), str(cfg["B"]), str(cfg["D"]), f"{cfg['density']:.3f}"]
        for key in ("fwd_tflops",) + (() if fwd_only else ("fwdbwd_tflops",)):
            a, b = val(o, key), val(t, key)
            cells += [_f(a), _f(b), "-" if a is None or not b else f"{a / b:.2f}"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def environment(device) -> dict:
    env = {
        "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "host": platform.node(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torch_cuda": torch.version.cuda,
        "device": str(device),
    }
    try:
        import triton

        env["triton"] = triton.__version__
    except Exception as e:  # noqa: BLE001
        env["triton"] = f"unavailable ({short_error(e)})"
    try:
        import inductor_flex

        env["inductor_flex"] = inductor_flex.__version__
    except Exception as e:  # noqa: BLE001
        env["inductor_flex"] = f"unavailable ({short_error(e)})"
    try:
        root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
        env["git_commit"] = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True,
                                           timeout=10).stdout.strip() or None
        dirty = subprocess.run(["git", "status", "--porcelain"], cwd=root, capture_output=True, text=True,
                               timeout=10).stdout.strip()
        env["git_dirty"] = bool(dirty)
    except Exception:  # noqa: BLE001
        env["git_commit"] = None
    if device.type == "cuda":
        p = torch.cuda.get_device_properties(device)
        env.update(gpu=torch.cuda.get_device_name(device), gpu_capability=f"{p.major}.{p.minor}",
                   gpu_memory_gb=round(p.total_memory / 2**30, 1), cudnn=torch.backends.cudnn.version())
    else:
        env["gpu"] = None
        env["cpu"] = platform.processor() or platform.machine()
    return env


def write_reports(path_base: str, meta: dict, results: List[dict], skipped: List[str], fwd_only: bool,
                  finished: bool) -> None:
    os.makedirs(os.path.dirname(path_base) or ".", exist_ok=True)
    doc = dict(meta, finished=finished, skipped=skipped, results=results)
    tmp = path_base + ".json.tmp"
    with open(tmp, "w") as f:
        json.dump(doc, f, indent=1, default=str)
    os.replace(tmp, path_base + ".json")
    env = meta["environment"]
    md = [f"# Attention benchmark: {env.get('gpu') or env.get('cpu')}", "",
          f"- date {env['date']}, torch {env['torch']}, triton {env.get('triton')}, "
          f"inductor_flex {env.get('inductor_flex')} (git {str(env.get('git_commit'))[:10]}"
          f"{', dirty' if env.get('git_dirty') else ''})",
          f"- command: `{meta['command']}`",
          *(["- timing: every peer's step captured in one CUDA graph and its replay timed (`--cuda-graph`): "
             "GPU time with no host launch work"] if meta["settings"].get("cuda_graph") else []),
          "- TFLOP/s count unmasked work only: fwd = 4·B·H·D·pairs, fwd+bwd = 3.5 × fwd; "
          "ratios are this peer's TFLOP/s over the named peer's",
          f"- status: {'finished' if finished else 'INCOMPLETE (interrupted or still running)'}", ""]
    if results:
        md += [summary_table(results, fwd_only), ""]
    for cfg in results:
        md += [config_table(cfg, fwd_only), ""]
    if skipped:
        md += ["## Skipped", ""] + [f"- {s}" for s in skipped] + [""]
    tmp = path_base + ".md.tmp"
    with open(tmp, "w") as f:
        f.write("\n".join(md))
    os.replace(tmp, path_base + ".md")


# ------------------------------------------------------------------------------------------- main
def add_case_arguments(ap: argparse.ArgumentParser, case: str = "causal", S: int = 4096, B: int = 4) -> None:
    """--case/--S/--B/--H/--D for the one-case tools (profile_kernels.py, sweep_backward.py, the
    document probes)."""
    ap.add_argument("--case", default=case, choices=ALL_CASES)
    ap.add_argument("--S", type=int, default=S)
    ap.add_argument("--B", type=int, default=B)
    ap.add_argument("--H", type=int, default=16)
    ap.add_argument("--D", type=int, default=128)


def probe_setup(args, device):
    """(case, q, k, v, dout) of a one-case tool's arguments: the case with the benchmark's default
    settings, bf16 inputs of seed 0, q/k/v requiring grad."""
    case = build_case(args.case, args.S, args.H, device,
                      argparse.Namespace(num_docs=8, doc_seed=0, window=1024, prefix=1024, softcap=30.0))
    g = torch.Generator(device=device).manual_seed(0)
    q, k, v, dout = (torch.randn(args.B, args.H, args.S, args.D, device=device, dtype=torch.bfloat16, generator=g)
                     for _ in range(4))
    for t in (q, k, v):
        t.requires_grad_()
    return case, q, k, v, dout


def _csv(s: str) -> List[str]:
    return [x.strip() for x in s.split(",") if x.strip()]


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dims", default="64,128", help="head dims, comma separated (default 64,128)")
    p.add_argument("--shapes", default="1024x16,4096x4,16384x1", help="SxB list (default 1024x16,4096x4,16384x1)")
    p.add_argument("--heads", type=int, default=16, help="H (default 16)")
    p.add_argument("--cases", default=",".join(ALL_CASES), help=f"comma list of {', '.join(ALL_CASES)}")
    p.add_argument("--peers", default=None, help=f"comma list of {', '.join(ALL_PEERS)} (default: all)")
    p.add_argument("--dtype", default=None, choices=("bf16", "fp16", "fp32"), help="default bf16 (fp32 in --dry-run)")
    p.add_argument("--fwd-only", action="store_true", help="skip forward+backward")
    p.add_argument("--quick", action="store_true",
                   help="tiny subset: S=4096 B=4 D=128 noop,causal,alibi,softcap,document + document S=1024 B=16")
    p.add_argument("--dry-run", action="store_true",
                   help="CPU harness check: S=64 B=1 H=2 D=32 fp32, peer ours with BACKEND MATH")
    p.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results"),
                   help="directory for the JSON and markdown (default benchmarks/results)")
    p.add_argument("--tag", default=None, help="file name stem (default bench_attention_<gpu>_<utc time>)")
    p.add_argument("--max-seconds", type=float, default=float(os.environ.get("BENCH_MAX_SECONDS", 0) or 0),
                   help="time budget; configs not started when it runs out are skipped (env BENCH_MAX_SECONDS; "
                        "0 = none). A config already running is finished.")
    p.add_argument("--peer-timeout", type=float, default=float(os.environ.get("BENCH_PEER_TIMEOUT", 0) or 0),
                   help="seconds one peer may spend on one config before it is recorded as an error "
                        "(SIGALRM; env BENCH_PEER_TIMEOUT; 0 = off)")
    p.add_argument("--window", type=int, default=None, help="sliding window size (default 1024; dry run 16)")
    p.add_argument("--prefix", type=int, default=None, help="prefix-LM prefix length (default 1024; dry run 16)")
    p.add_argument("--softcap", type=float, default=30.0, help="soft cap (default 30)")
    p.add_argument("--num-docs", type=int, default=None, help="documents per packed sequence (default 8; dry run 4)")
    p.add_argument("--doc-seed", type=int, default=0, help="seed of the document split (default 0)")
    p.add_argument("--seed", type=int, default=0, help="seed of q, k, v, dout")
    p.add_argument("--warmup-ms", type=int, default=25, help="do_bench warmup (ms)")
    p.add_argument("--rep-ms", type=int, default=100, help="do_bench repetition time (ms)")
    p.add_argument("--cpu-reps", type=int, default=3, help="timed reps per measurement on CPU")
    p.add_argument("--ours-kernel-options", default=None,
                   help='JSON dict passed as kernel_options to ours / ours_compiled, e.g. \'{"FAST_TANH": true}\'')
    p.add_argument("--compile-mode", default=None,
                   help="torch.compile mode of the compiled peers (ours_compiled, torch_flex), e.g. reduce-overhead: "
                        "CUDA graphs, for steps short enough that the host's launch work sets their pace")
    p.add_argument("--cuda-graph", action="store_true",
                   help="time each peer's step (forward; forward+backward) as one replayed CUDA graph, captured "
                        "after its warm-up: the GPU time of the step with no host launch work, the same for every "
                        "peer (eager ours included). Not with --compile-mode's graph modes")
    p.add_argument("--no-fullgraph", dest="fullgraph", action="store_false",
                   help="compile peers without fullgraph=True (then a graph break may silently run eager code)")
    p.add_argument("--no-check", dest="check", action="store_false",
                   help="skip the max-abs-diff check between peers' outputs")
    p.add_argument("--no-count-density", dest="count_density", action="store_false",
                   help="trust the closed-form density instead of counting the mask")
    p.add_argument("--device", default=None, help="default cuda (cpu in --dry-run)")
    args = p.parse_args(argv)

    if args.dry_run:
        args.device = args.device or "cpu"
        args.dtype = args.dtype or "fp32"
        args.heads = 2 if args.heads == 16 else args.heads
        args.peers = args.peers or "ours"
        if args.ours_kernel_options is None:
            args.ours_kernel_options = '{"BACKEND": "MATH"}'
        args.window = 16 if args.window is None else args.window
        args.prefix = 16 if args.prefix is None else args.prefix
        args.num_docs = 4 if args.num_docs is None else args.num_docs
    args.device = args.device or "cuda"
    if args.cuda_graph and (args.device == "cpu" or (args.compile_mode or "default") != "default"):
        p.error("--cuda-graph needs a CUDA device and no --compile-mode other than default "
                "(those modes make CUDA graphs of their own)")
    args.dtype = args.dtype or "bf16"
    args.window = 1024 if args.window is None else args.window
    args.prefix = 1024 if args.prefix is None else args.prefix
    args.num_docs = 8 if args.num_docs is None else args.num_docs
    args.peers = _csv(args.peers) if args.peers else list(ALL_PEERS)
    for pr in args.peers:
        if pr not in ALL_PEERS:
            p.error(f"unknown peer {pr!r}; known: {', '.join(ALL_PEERS)}")
    args.ours_kernel_options = json.loads(args.ours_kernel_options) if args.ours_kernel_options else None

    cases = [CASE_ALIASES.get(c, c) for c in _csv(args.cases)]
    for c in cases:
        if c not in ALL_CASES:
            p.error(f"unknown case {c!r}; known: {', '.join(ALL_CASES)}")
    if args.dry_run:
        configs = [(64, 1, 32, c) for c in cases]
    elif args.quick:
        configs = list(QUICK_CONFIGS)
    else:
        dims = [int(d) for d in _csv(args.dims)]
        shapes = []
        for s in _csv(args.shapes):
            S, _, B = s.lower().partition("x")
            shapes.append((int(S), int(B or 1)))
        configs = [(S, B, D, c) for (S, B) in shapes for D in dims for c in cases]
    args.configs = configs
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    args._t0 = time.perf_counter()
    device = torch.device(args.device)
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[args.dtype]
    if device.type == "cuda" and not torch.cuda.is_available():
        print("error: CUDA is not available (use --dry-run for a CPU check of the harness)", file=sys.stderr)
        return 2
    if hasattr(torch, "_dynamo"):
        from torch._dynamo import config as dcfg

        for name, val in (("recompile_limit", 1024), ("cache_size_limit", 1024),
                          ("accumulated_recompile_limit", 1 << 16), ("accumulated_cache_size_limit", 1 << 16)):
            try:
                setattr(dcfg, name, val)
            except Exception:  # noqa: BLE001 - names differ between torch versions
                pass
    env = environment(device)
    stamp = _dt.datetime.now(_dt.timezone.utc).strftime("%Y%m%d-%H%M%S")
    gpu = (env.get("gpu") or "cpu").replace("NVIDIA ", "").split()[0] or "gpu"
    tag = args.tag or f"bench_attention_{'dryrun_' if args.dry_run else ''}{gpu}_{stamp}"
    base = os.path.join(args.out, tag)
    meta = {
        "environment": env,
        "command": " ".join([os.path.basename(sys.argv[0])] + (argv if argv is not None else sys.argv[1:])),
        "settings": {k: v for k, v in vars(args).items() if not k.startswith("_") and k != "configs"},
        "configs": [dict(S=S, B=B, D=D, case=c) for (S, B, D, c) in args.configs],
        "flop_model": "fwd = 4*B*H*D*unmasked_pairs; fwd+bwd = 3.5*fwd",
    }
    print(f"# {env.get('gpu') or env.get('cpu')} | torch {env['torch']} | triton {env.get('triton')} | "
          f"{len(args.configs)} configs x {len(args.peers)} peers ({', '.join(args.peers)})"
          + (f" | budget {args.max_seconds:.0f}s" if args.max_seconds else ""), flush=True)

    results: List[dict] = []
    skipped: List[str] = []
    density_cache: dict = {}
    fatal = False
    interrupted = False
    try:
        for S, B, D, case in args.configs:
            label = f"{case} S={S} B={B} D={D}"
            elapsed = time.perf_counter() - args._t0
            if fatal:
                skipped.append(f"{label} (CUDA context broken earlier)")
                continue
            if args.max_seconds and elapsed > args.max_seconds:
                skipped.append(f"{label} (time budget {args.max_seconds:.0f}s exceeded at {elapsed:.0f}s)")
                continue
            try:
                cfg = run_config(case, S, B, D, device, dtype, args, density_cache)
            except Exception as e:  # noqa: BLE001 - e.g. the mask itself cannot be built or inputs OOM
                cfg = {"case": case, "S": S, "B": B, "H": args.heads, "D": D, "dtype": args.dtype, "density": float("nan"),
                       "peers": [], "error": short_error(e), "traceback": traceback.format_exc(limit=8)}
                print(f"error: {label}: {cfg['error']}", flush=True)
                fatal = _is_fatal(e)
                _free(device)
            fatal = fatal or bool(cfg.get("fatal"))
            results.append(cfg)
            if cfg["peers"]:
                print("\n" + config_table(cfg, args.fwd_only) + "\n", flush=True)
            write_reports(base, meta, results, skipped, args.fwd_only, finished=False)
    except KeyboardInterrupt:
        interrupted = True
        print("\ninterrupted: writing what was measured so far", flush=True)
    if skipped:
        print("skipped:\n  " + "\n  ".join(skipped), flush=True)
    if results:
        print("\n" + summary_table(results, args.fwd_only), flush=True)
    meta["total_s"] = time.perf_counter() - args._t0
    write_reports(base, meta, results, skipped, args.fwd_only, finished=not interrupted)
    print(f"\nwrote {base}.json and {base}.md ({meta['total_s']:.1f}s)", flush=True)
    return 130 if interrupted else 0


if __name__ == "__main__":
    sys.exit(main())
