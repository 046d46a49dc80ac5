"""Readable reference implementations of transformer architectures (PyTorch first; JAX and TF siblings later)."""
