#!/usr/bin/env bash
# The one call a lent GPU machine gets: bench/gpu.py (issue 30, item 7), then the test suite on CUDA.
# First, here: `bash bench/gpu_carry.sh`; then the device tool's `run` with
#   command "bash bench/gpu_check.sh", carry ["runs/gpu-carry"], timeout_s 600.
# bench/gpu.py first, since its figures exist nowhere else (<= 5 min); the suite gets what is left. Logs,
# gpu.json and the BENCHMARKS.md it rewrote come back under $OUT; copy the last two into the repo here.
set -uo pipefail
carry=runs/gpu-carry
out=${OUT:-runs/gpu-check}
mkdir -p "$out"
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/uvc-site "$carry"/wheels/*.whl \
    || { echo "no wheels in $carry: run bash bench/gpu_carry.sh here and carry $carry"; exit 2; }
export PYTHONPATH="$PWD/src:/tmp/uvc-site" UVC_FASHION_MNIST="$PWD/$carry/fashion-mnist" PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$out/device.txt"
python3 -c 'import torch, timm; print("torch", torch.__version__, "timm", timm.__version__)' | tee -a "$out/device.txt"
timeout 300 python3 bench/gpu.py 2>&1 | tee "$out/gpu.log"
gpu=$?
cp bench/results/gpu.json BENCHMARKS.md "$out/" 2>/dev/null
OMP_NUM_THREADS=1 timeout 240 python3 -m pytest -q -n 14 -p no:cacheprovider 2>&1 | tee "$out/tests.log"
tests=$?
echo "bench/gpu.py exit $gpu, tests exit $tests (124: stopped at its time limit)"
[ "$gpu" = 0 ] && [ "$tests" = 0 ]
