"""Kernel tests: Triton runs on CPU tensors only in its interpreter, and `gpu` tests need CUDA.

Triton chooses between compiling and interpreting when a kernel is decorated, so the choice is made here, before any
test module imports a kernel: without CUDA, ``TRITON_INTERPRET=1`` (unless the caller set it). With CUDA the same tests
run the compiled kernel on CUDA tensors.
"""

from __future__ import annotations

import os

import pytest
import torch

HAS_CUDA = torch.cuda.is_available()
os.environ.setdefault("TRITON_INTERPRET", "0" if HAS_CUDA else "1")
INTERPRET = os.environ["TRITON_INTERPRET"] == "1"


def pytest_runtest_setup(item: pytest.Item) -> None:
    if item.get_closest_marker("gpu") is not None:
        if not HAS_CUDA:
            pytest.skip("needs an NVIDIA GPU (torch.cuda.is_available() is False)")
        if INTERPRET:
            pytest.skip("TRITON_INTERPRET=1: gpu tests need the compiled kernel")
