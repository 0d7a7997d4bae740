#!/usr/bin/env bash
# Everything a lent GPU should run, in one call (the device tool's `run`), results under $OUT:
#   bash benchmarks/device_run.sh            # CUDA kernel tests, bench_linear and tune_fused on the DiT shapes
#   SHAPES=8192x3072x3072 bash benchmarks/device_run.sh
#   STEPS="bench tune" bash benchmarks/device_run.sh   # some of: tests bench tune (a device call has 600 s;
#                                                      # the three defaults add up to more: split them)
# The device image has its own torch/Triton; the package is installed there without dependencies.
set -u
OUT=${OUT:-/tmp/lynx-device-out}
mkdir -p "$OUT"
python3 -m pip install -q --no-deps --no-build-isolation -e . > "$OUT/install.log" 2>&1 || tail -5 "$OUT/install.log"
nvidia-smi --query-gpu=name,driver_version,clocks.max.sm --format=csv > "$OUT/gpu.csv" 2>&1
python3 -c "import torch, triton; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'triton', triton.__version__)" \
  | tee "$OUT/versions.txt"
STEPS=${STEPS:-tests bench tune}
step() { [[ " $STEPS " == *" $1 "* ]]; }
if step tests; then
timeout "${TEST_TIMEOUT:-240}" python3 -m pytest -q -p no:cacheprovider tests/test_fused_cuda.py \
  tests/test_kernel_selection.py tests/test_triton_kernels.py tests/test_triton_op.py > "$OUT/tests.log" 2>&1
echo "kernel tests: exit $?"; grep -E "passed|failed|error" "$OUT/tests.log" | tail -3
grep -E "^(FAILED|ERROR)" "$OUT/tests.log" | head -20
fi
if step bench; then
timeout "${BENCH_TIMEOUT:-300}" python3 benchmarks/bench_linear.py --out "$OUT" ${SHAPES:+--shapes "$SHAPES"} \
  > "$OUT/bench_linear.log" 2>&1
echo "bench_linear: exit $?"; tail -40 "$OUT/bench_linear.log"
fi
if step tune; then
# Times each tile configuration of the fused kernel; it exits with the reason when the kernel cannot run.
timeout "${TUNE_TIMEOUT:-240}" python3 benchmarks/tune_fused.py --out "$OUT" ${SHAPES:+--shapes "$SHAPES"} \
  > "$OUT/tune_fused.log" 2>&1
echo "tune_fused: exit $?"; tail -30 "$OUT/tune_fused.log"
fi
