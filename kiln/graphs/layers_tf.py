"""PyTorch-layout keras 3 layers for the TensorFlow references (the sibling of ``layers_jax.py``): each weight's
kiln name is its attribute path (``layers.0.attn.q.weight``) with the torch shape (a Linear weight is (out, in)), so
``state_dict()`` / ``load_state_dict()`` are all ``kiln.graphs.checkpoint`` needs. Keras names variables its own way,
so ``Module.state_dict()`` walks the attribute tree as torch does. Layers are built eagerly in ``__init__``.
"""

from __future__ import annotations

import importlib.util
import os
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")  # before TensorFlow's first import: no C++ info/warning banners
# TensorFlow and triton each link their own LLVM: importing triton after TensorFlow aborts the process ("Option
# 'bitcode-mdindex-threshold' registered more than once"), and torch imports triton at its first custom op. With
# triton loaded first, the two coexist (once TensorFlow is in, importing triton here would be the abort).
if "tensorflow" not in sys.modules and importlib.util.find_spec("triton") is not None:
    import triton  # noqa: F401

import keras  # noqa: E402
import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402


class Module(keras.layers.Layer):
    """A keras layer with torch's parameter naming: ``state_dict()`` keys are attribute paths + variable names, own
    variables before children's, as ``torch.nn.Module.state_dict`` orders them. Subclasses create their variables
    in ``__init__``, so the layer is built from the start."""

    def __init__(self):
        super().__init__()
        self.built = True

    def named_parameters(self, prefix: str = ""):
        children = []
        for name, value in vars(self).items():  # attribute order is definition order, as torch registers them
            if name.startswith("_"):
                continue
            if isinstance(value, keras.Variable):
                yield prefix + name, value
            elif isinstance(value, Module):
                children.append((name, value))
            elif isinstance(value, (list, tuple)) and value and all(isinstance(v, Module) for v in value):
                children += [(f"{name}.{i}", v) for i, v in enumerate(value)]
        for name, child in children:
            yield from child.named_parameters(f"{prefix}{name}.")

    def state_dict(self) -> dict[str, np.ndarray]:
        return {name: variable.numpy() for name, variable in self.named_parameters()}

    def load_state_dict(self, state: dict[str, np.ndarray]) -> None:
        """Assign float32 arrays already checked for names and shapes (``kiln.graphs.checkpoint.load_weights``)."""
        for name, variable in self.named_parameters():
            variable.assign(state[name])


class Linear(Module):
    def __init__(self, in_features: int, out_features: int, bias: bool = True):
        super().__init__()
        # PyTorch's layout, (out, in), so that state_dict() needs no transposes.
        self.weight = self.add_weight(shape=(out_features, in_features), initializer="zeros", name="weight")
        self.bias = self.add_weight(shape=(out_features,), initializer="zeros", name="bias") if bias else None

    def call(self, x):
        y = tf.matmul(x, self.weight, transpose_b=True)  # (..., in) @ (out, in)^T
        return y if self.bias is None else y + self.bias


class Embedding(Module):
    def __init__(self, num: int, dim: int):
        super().__init__()
        self.weight = self.add_weight(shape=(num, dim), initializer="zeros", name="weight")

    def call(self, ids):
        return tf.gather(self.weight, ids)


class LayerNorm(Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = self.add_weight(shape=(dim,), initializer="ones", name="weight")
        self.bias = self.add_weight(shape=(dim,), initializer="zeros", name="bias")
        self.eps = eps

    def call(self, x):
        mean = tf.reduce_mean(x, axis=-1, keepdims=True)
        var = tf.reduce_mean(tf.square(x - mean), axis=-1, keepdims=True)  # biased, as torch
        return (x - mean) * tf.math.rsqrt(var + self.eps) * self.weight + self.bias
