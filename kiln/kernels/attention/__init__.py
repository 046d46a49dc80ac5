"""Scaled-dot-product attention: the NumPy reference (spec) and its implementations."""
