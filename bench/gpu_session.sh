#!/usr/bin/env bash
# One GPU-machine session: tests, then benchmarks, logs and JSON under $OUT.
#   bash bench/gpu_session.sh check   # GPU tests + benchmark + demo
#   bash bench/gpu_session.sh bench   # issue-4 benchmark set: head dims 64/128/256 against SDPA FA2 and
#                                     # cuDNN, short sequences at batch 64, the 131072-token causal run
#   bash bench/gpu_session.sh tune    # tile tuning sweep (TUNE_ARGS="--long" for SM90_LONG)
#   bash bench/gpu_session.sh features   # FA2 feature costs (varlen, window, softcap, ALiBi, dropout)
#   bash bench/gpu_session.sh gputests   # only the GPU tests
#   bash bench/gpu_session.sh probe      # the probes behind non-tuned tile choices (bench/probe.py)
#   bash bench/gpu_session.sh gluon      # the Gluon kernels against the tl kernels and SDPA: the ratios
#                                        # behind configs.SM90_GLUON_FWD (and _SHORT) / SM90_GLUON_BWD and the
#                                        # window thresholds
#   bash bench/gpu_session.sh decode     # KV-cache tests, decode benchmark (PROBE=1: tile/split probe
#                                        # first) and the example generation loop
set -uo pipefail
export PYTHONPATH=src PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/flashtile-out}
mkdir -p "$OUT"
case "${1:-check}" in
  check)
    nvidia-smi --query-gpu=name,memory.total,clocks.sm,clocks.max.sm --format=csv | tee "$OUT/gpu.txt"
    python3 -m flashtile.cli info 2>&1 | tee -a "$OUT/gpu.txt"
    # Many processes compile the kernel variants in parallel; the bigmem tests run alone.
    python3 -m pytest -n 8 -q -m "not bigmem" -p no:cacheprovider -p no:benchmark tests 2>&1 | tee "$OUT/tests.log" | tail -30
    python3 -m pytest -q -m bigmem -p no:cacheprovider -p no:benchmark tests 2>&1 | tee -a "$OUT/tests.log" | tail -8
    python3 bench/overhead.py 2>&1 | tee "$OUT/overhead.log"
    python3 bench/bench_attention.py --out "$OUT/bench.json" 2>&1 | tee "$OUT/bench.log"
    python3 -m flashtile.cli demo 2>&1 | tee "$OUT/demo.log"
    ;;
  bench)
    python3 bench/overhead.py 2>&1 | tee "$OUT/overhead.log"
    python3 bench/bench_attention.py --out "$OUT/bench.json" --head-dims 64,128,256 \
      --methods flashtile,sdpa_flash,sdpa_cudnn 2>&1 | tee "$OUT/bench.log"
    python3 bench/bench_attention.py --out "$OUT/short.json" --seqlens 128,256 --batch 64 --head-dims 64,128,256 \
      --methods flashtile,sdpa_flash,sdpa_cudnn 2>&1 | tee "$OUT/short.log"
    python3 bench/bench_attention.py --out "$OUT/long_context.json" --long-context \
      --methods flashtile,sdpa_flash,sdpa_cudnn 2>&1 | tee "$OUT/long_context.log"
    ;;
  features)
    python3 bench/bench_features.py --out "$OUT/features.json" 2>&1 | tee "$OUT/features.log"
    python3 bench/bench_attention.py --out "$OUT/bench.json" --methods flashtile,sdpa_flash,sdpa_cudnn \
      --seqlens "${SEQLENS:-1024,2048,4096,8192,16384}" 2>&1 | tee "$OUT/bench.log"
    ;;
  gputests)
    python3 -m pytest -n 8 -q -m "gpu and not bigmem" -p no:cacheprovider tests 2>&1 | tee "$OUT/tests.log" | tail -30
    ;;
  tune)
    python3 bench/tune.py --out "$OUT/tune.json" ${TUNE_ARGS:-} 2>&1 | tee "$OUT/tune.log"
    ;;
  probe)
    python3 bench/probe.py --out "$OUT/probe.json" 2>&1 | tee "$OUT/probe.log"
    ;;
  gluon)
    python3 bench/gluon_fwd_probe.py --coverage --out "$OUT/gluon_fwd.json" 2>&1 | tee "$OUT/gluon_fwd.log"
    python3 bench/gluon_fwd_probe.py --windows --out "$OUT/gluon_fwd_windows.json" 2>&1 | tee "$OUT/gluon_fwd_windows.log"
    for run in 1 2; do  # configs.SM90_GLUON_FWD_SHORT comes from two runs (bench/common.short_tile_below)
      python3 bench/gluon_fwd_probe.py --tiles --head-dims 64,128 --seqlens 512,1024,2048,4096,8192,16384 \
        --out "$OUT/gluon_fwd_tiles_run$run.json" 2>&1 | tee "$OUT/gluon_fwd_tiles_run$run.log"
    done
    python3 bench/gluon_fwd_probe.py --short-tiles "$OUT"/gluon_fwd_tiles_run[12].json | tee "$OUT/gluon_fwd_short.log"
    python3 bench/gluon_bwd_probe.py --seqlens 512,1024,2048,4096,8192,16384 --out "$OUT/gluon_bwd.json" 2>&1 \
      | tee "$OUT/gluon_bwd.log"
    python3 bench/gluon_bwd_probe.py --windows --out "$OUT/gluon_bwd_windows.json" 2>&1 | tee "$OUT/gluon_bwd_windows.log"
    ;;
  decode)
    timeout 300 python3 -m pytest -n 8 -q -m gpu -p no:cacheprovider tests/test_kvcache.py 2>&1 \
      | tee "$OUT/tests.log" | tail -15
    if [ -n "${PROBE:-}" ]; then
      timeout 200 python3 bench/bench_decode.py --probe --out "$OUT/decode_probe.json" 2>&1 | tee "$OUT/decode_probe.log"
    fi
    timeout 300 python3 bench/bench_decode.py --out "$OUT/decode.json" ${DECODE_ARGS:-} 2>&1 | tee "$OUT/decode.log"
    timeout 200 python3 examples/generate.py 2>&1 | tee "$OUT/generate.log"
    ;;
  *) echo "unknown step $1"; exit 2 ;;
esac
