"""PyTorch-layout parameter modules for the flax nnx references, so every parameter's path joined with "." is the
torch ``state_dict`` key (``layers.0.attn.q.weight``) and every array has the torch shape (a Linear weight is
(out, in)). ``StateDict`` gives a module ``state_dict()`` / ``load_state_dict()``, all that
``kiln.graphs.checkpoint`` needs from a reference. Weights start as zeros (norms as ones): they always come from a
checkpoint.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx


class Linear(nnx.Module):
    """y = x W^T + b, W (out, in) as torch.nn.Linear."""

    def __init__(self, in_features: int, out_features: int, bias: bool = True):
        self.weight = nnx.Param(jnp.zeros((out_features, in_features), jnp.float32))
        self.bias = nnx.Param(jnp.zeros((out_features,), jnp.float32)) if bias else None

    def __call__(self, x):
        y = x @ self.weight[...].T
        return y if self.bias is None else y + self.bias[...]


class Embedding(nnx.Module):
    def __init__(self, num_embeddings: int, dim: int):
        self.weight = nnx.Param(jnp.zeros((num_embeddings, dim), jnp.float32))

    def __call__(self, ids):
        return jnp.take(self.weight[...], ids, axis=0)  # (..., C); one ONNX Gather


class LayerNorm(nnx.Module):
    """torch.nn.LayerNorm over the last axis: biased variance, eps inside the square root."""

    def __init__(self, dim: int, eps: float):
        self.weight = nnx.Param(jnp.ones((dim,), jnp.float32))
        self.bias = nnx.Param(jnp.zeros((dim,), jnp.float32))
        self.eps = eps

    def __call__(self, x):
        mean = x.mean(-1, keepdims=True)
        var = jnp.square(x - mean).mean(-1, keepdims=True)
        return (x - mean) * jax.lax.rsqrt(var + self.eps) * self.weight[...] + self.bias[...]


class StateDict:
    """``state_dict()`` and ``load_state_dict()`` over a module's ``nnx.Param``s, named by their paths."""

    def _params(self) -> dict[str, nnx.Param]:
        return {".".join(map(str, path)): node for path, node in nnx.iter_graph(self) if isinstance(node, nnx.Param)}

    def state_dict(self) -> dict[str, np.ndarray]:
        return {name: np.asarray(param[...]) for name, param in self._params().items()}

    def load_state_dict(self, state: dict[str, np.ndarray]) -> None:
        """``state`` holds float32 arrays under every name, already checked against the shapes (``load_weights``)."""
        for name, param in self._params().items():
            param[...] = jnp.asarray(state[name], dtype=jnp.float32)
