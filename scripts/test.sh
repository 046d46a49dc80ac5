#!/usr/bin/env bash
# The test command (README and CI): set up, check the import layering, run the suite offline.
# Extra arguments go to pytest, e.g. `bash scripts/test.sh -m "not slow"` or `bash scripts/test.sh tests/runtime`.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
.venv/bin/lint-imports --config pyproject.toml
.venv/bin/python -m pytest "$@"
