#!/usr/bin/env bash
# Everything a lent GPU should run, in one call (the device tool's `run`); results under $OUT.
# With no arguments it answers, in this order, in about 8 minutes on an H100 or H200:
#   1. tests   Do the CUDA tests pass? (pytest -m "gpu or triton")       -> $OUT/tests.json, tests.log
#   2. linear  bench_linear on 8192x3072x3072, 4096x3072x12288, 4096x12288x3072:
#              dense, cuSPARSELt, Triton and fused, end to end            -> $OUT/bench_linear_cuda_<date>.json
#   3. dit     bench_dit on the Flux-shaped model with the default options (measured selection),
#              against plain Inductor                                      -> $OUT/bench_dit_cuda_<date>.json
# and prints a short table of all three last (benchmarks/device_summary.py).
#   STEPS="linear dit" bash benchmarks/device_run.sh     # some of: tests linear dit tune
#   SHAPES=8192x3072x3072 STEPS=linear bash benchmarks/device_run.sh
# Each step has its own timeout (TEST_TIMEOUT, LINEAR_TIMEOUT, DIT_TIMEOUT, TUNE_TIMEOUT seconds).
# The device image has its own torch/Triton; the package is installed there without dependencies.
set -u
OUT=${OUT:-/tmp/lynx-device-out}
mkdir -p "$OUT"
export LYNX_TIMING_CACHE="$OUT/timings.json"   # the measured selection's times come back with the results
python3 -m pip install -q --no-deps --no-build-isolation -e . > "$OUT/install.log" 2>&1 || tail -5 "$OUT/install.log"
nvidia-smi --query-gpu=name,driver_version,clocks.max.sm --format=csv > "$OUT/gpu.csv" 2>&1
python3 -c "import torch, triton; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'triton', triton.__version__)" \
  | tee "$OUT/versions.txt"
STEPS=${STEPS:-tests linear dit}
SHAPES=${SHAPES:-8192x3072x3072,4096x3072x12288,4096x12288x3072}
step() { [[ " $STEPS " == *" $1 "* ]]; }
if step tests; then
  timeout "${TEST_TIMEOUT:-150}" python3 -m pytest -q -p no:cacheprovider -m "gpu or triton" tests \
    --junitxml="$OUT/tests.xml" > "$OUT/tests.log" 2>&1
  echo "tests: exit $?"; grep -E "passed|failed|error" "$OUT/tests.log" | tail -2
  grep -E "^(FAILED|ERROR)" "$OUT/tests.log" | head -20
fi
if step linear; then
  timeout "${LINEAR_TIMEOUT:-120}" python3 benchmarks/bench_linear.py --out "$OUT" --shapes "$SHAPES" \
    --routes dense,lynx_cusparselt,lynx_triton,lynx_fused --low-rank off > "$OUT/bench_linear.log" 2>&1
  echo "bench_linear: exit $?"; tail -20 "$OUT/bench_linear.log"
fi
if step dit; then
  timeout "${DIT_TIMEOUT:-210}" python3 benchmarks/bench_dit.py --iters 10 --out "$OUT" > "$OUT/bench_dit.log" 2>&1
  echo "bench_dit: exit $?"; tail -8 "$OUT/bench_dit.log"
fi
if step tune; then
  # Times each tile configuration of the fused kernel; it exits with the reason when the kernel cannot run.
  timeout "${TUNE_TIMEOUT:-240}" python3 benchmarks/tune_fused.py --out "$OUT" --shapes "$SHAPES" \
    > "$OUT/tune_fused.log" 2>&1
  echo "tune_fused: exit $?"; tail -30 "$OUT/tune_fused.log"
fi
python3 benchmarks/device_summary.py "$OUT"
