#!/usr/bin/env bash
# One call on a GPU machine: fp16/CUDA-graph correctness (tests/gpu), the SD 1.5 throughput table, then the SDXL and
# SD3 shapes (bench/gpu_families.py).
# Prepare here first: `make gpu-wheels` (diffusers + importlib_metadata wheels into .cache/wheels), then run
#   bash bench/gpu.sh "$OUT"      with .cache/wheels carried to the GPU machine.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT_DIR=${1:-${OUT:-bench-out}}
PY=${PY:-python3}
mkdir -p "$OUT_DIR"
export PYTHONPATH=$PWD HF_HUB_OFFLINE=1 HF_HUB_DISABLE_PROGRESS_BARS=1 TOKENIZERS_PARALLELISM=false
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$OUT_DIR/device.txt"
if ! $PY -c "import diffusers" 2>/dev/null; then
  $PY -m pip install -q --no-index --no-deps .cache/wheels/*.whl || { echo "gpu.sh: carry .cache/wheels (make gpu-wheels)"; exit 2; }
fi
$PY -c "import torch, diffusers, transformers; print('torch', torch.__version__, 'diffusers', diffusers.__version__, 'transformers', transformers.__version__)"
echo "== correctness: tests/gpu"
timeout 240 $PY -m pytest -q -p no:cacheprovider tests/gpu 2>&1 | tail -25 | tee "$OUT_DIR/gpu_tests.txt"
tests_rc=${PIPESTATUS[0]}
echo "== throughput"
timeout 300 $PY bench/gpu_bench.py --out "$OUT_DIR" ${GPU_BENCH_ARGS:-} 2>&1 | grep -v -i torchvision | tee "$OUT_DIR/gpu_bench.txt"
bench_rc=${PIPESTATUS[0]}
echo "== families: SDXL and SD3 medium shapes (random weights)"
timeout 240 $PY bench/gpu_families.py --out "$OUT_DIR" ${GPU_FAMILIES_ARGS:-} 2>&1 | grep -v -i torchvision | tee "$OUT_DIR/gpu_families.txt"
families_rc=${PIPESTATUS[0]}
echo "tests rc=$tests_rc bench rc=$bench_rc families rc=$families_rc"
exit $(( tests_rc || bench_rc || families_rc ))
