#!/usr/bin/env bash
# One device-tool call's worth of GPU work, in stages, every result under $OUT (default
# benchmarks/results) named <gpu>_<date>_<stage>. Each stage has its own time limit, so a slow
# one cannot eat the call; the stages of one call should fit its 10 minutes.
#
#   bash benchmarks/gpu_session.sh suite decode          # first call: install, GPU suite, decode
#   bash benchmarks/gpu_session.sh attn4096              # second call: the D=128 S=4096 table
#   bash benchmarks/gpu_session.sh attn1024g attn16384   # third call
#
# Stages: suite (pytest -m gpu, ~4 min; its file names the commit, gpu_suite_<sha>), decode (~2.5 min), host (~1 min, eager decode and paged
# host time under cProfile, one file), attn4096 (~7 min), attn1024g (~4 min,
# graphed), attn16384 (~3 min), d64 (~4 min). The device tool returns at most 8 files per call:
# suite + decode + host make 8.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-benchmarks/results}
mkdir -p "$OUT"
python -m pip install --no-deps --no-build-isolation --no-index -q . >/dev/null 2>&1 || echo "[gpu_session] install failed"
GPU=$(python -c "import torch; n = torch.cuda.get_device_name(); print('h200' if 'H200' in n else 'h100' if 'H100' in n else n.split()[-1].lower())")
TAG=${GPU}_$(date -u +%Y-%m-%d)
PEERS=ours,ours_compiled,torch_flex
run() {  # run <stage> <seconds> <command...>
  local stage=$1 limit=$2; shift 2
  echo "[gpu_session] $stage (limit ${limit}s)"
  timeout "$limit" "$@" > "$OUT/${TAG}_${stage}.txt" 2>&1
  echo "[gpu_session] $stage rc=$?"; tail -3 "$OUT/${TAG}_${stage}.txt"
}
for stage in "$@"; do
  case $stage in
    suite) run "gpu_suite_$(git rev-parse --short HEAD 2>/dev/null || echo nogit)" 330 bash -c "cd tests && python -m pytest . -m gpu -n 8 --dist load -p no:logging -q --tb=short" ;;
    decode) run decode_rotate 200 python benchmarks/bench_decode.py --out "$OUT/${TAG}_decode_rotate.json"
            run decode_flush 70 python benchmarks/bench_decode.py --l2 flush --seqs 8192,65536 --out "$OUT/${TAG}_decode_flush.json" ;;
    host) run profile_host 120 bash -c "python benchmarks/profile_host.py --case decode --top 25 &&
                                        python benchmarks/profile_host.py --case paged --top 25" ;;
    attn4096) run d128_s4096 560 python benchmarks/bench_attention.py --dims 128 --shapes 4096x4 --max-seconds 480 \
                --peers $PEERS,sdpa_cudnn --out "$OUT" --tag "${TAG}_d128_s4096" ;;
    attn1024g) run d128_s1024_graphed 300 python benchmarks/bench_attention.py --cuda-graph --dims 128 --shapes 1024x16 \
                 --cases softcap,document,noop,causal --max-seconds 240 --peers $PEERS,sdpa_cudnn --out "$OUT" \
                 --tag "${TAG}_d128_s1024_graphed" ;;
    attn16384) run d128_s16384 240 python benchmarks/bench_attention.py --dims 128 --shapes 16384x1 --cases noop,causal \
                 --max-seconds 200 --peers $PEERS,sdpa_cudnn --out "$OUT" --tag "${TAG}_d128_s16384" ;;
    d64) run d64_s4096 300 python benchmarks/bench_attention.py --dims 64 --shapes 4096x4 --max-seconds 240 \
           --peers $PEERS --out "$OUT" --tag "${TAG}_d64_s4096" ;;
    *) echo "[gpu_session] unknown stage $stage (suite, decode, host, attn4096, attn1024g, attn16384, d64)"; exit 2 ;;
  esac
done
