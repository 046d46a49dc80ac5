#!/usr/bin/env bash
# The checks that need an NVIDIA GPU, in one go: the kernel tests on CUDA tensors (compiled Triton, not the
# interpreter), the `gpu`-marked tests, and the Triton-vs-SDPA benchmark. For a CUDA machine that already has torch,
# triton, onnx, onnxruntime and transformers (no venv is made: it uses `${PYTHON:-python3}` as it is).
# Logs and the benchmark section go to ${OUT:-/tmp/kiln-gpu}; extra arguments go to both pytest runs.
#   bash scripts/gpu_checks.sh                 # everything
#   SWEEP=1 bash scripts/gpu_checks.sh         # also time the kernel's launch configurations
set -uo pipefail
cd "$(dirname "$0")/.."
out=${OUT:-/tmp/kiln-gpu}
py=${PYTHON:-python3}
mkdir -p "$out"
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
status=0
{
  nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv
  "$py" -c 'import torch, triton, onnxruntime as o; print("torch", torch.__version__, "cuda", torch.version.cuda,
"triton", triton.__version__, "onnxruntime", o.__version__, o.get_available_providers())'
} 2>&1 | tee "$out/machine.txt"
# Every kernel test runs on CUDA tensors when a GPU is present; elsewhere only the gpu-marked tests (listed by file:
# collecting the whole tree would import TensorFlow and the other extras a GPU box may lack).
timeout 300 "$py" -m pytest -q -p no:cacheprovider tests/kernels "$@" 2>&1 | tee "$out/tests-kernels.log" || status=1
gpu_files=$(grep -rl --include='test_*.py' 'mark.gpu' tests | grep -v '^tests/kernels/')
timeout 300 "$py" -m pytest -q -p no:cacheprovider -m gpu $gpu_files "$@" 2>&1 | tee "$out/tests-gpu.log" || status=1
if [ -n "${SWEEP:-}" ]; then
  timeout 300 "$py" benchmarks/bench_triton_attention.py --sweep 2>&1 | tee "$out/sweep.txt" || status=1
fi
cp benchmarks/RESULTS.md "$out/RESULTS.md"
timeout 300 "$py" benchmarks/bench_triton_attention.py --output "$out/RESULTS.md" 2>&1 | tee "$out/bench.txt" || status=1
exit $status
