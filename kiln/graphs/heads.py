"""Pruning attention heads, as transformers' ``prune_heads`` did (transformers 5 removed it; 4.57 is the oracle).

Light: configs read ``pruned_heads`` through it; torch is imported where a torch model is pruned.

``model.prune_heads({layer: [heads]})`` removes the heads' rows from the query/key/value projections and their
columns from the output projection, and records them in ``config.pruned_heads`` (head indices as in the unpruned
model), which ``save_pretrained`` writes and a reload reads: each layer is then built with its own head count, and
every exported graph takes it (each layer's fused Attention node carries its own). A family's attention module
implements ``prune(heads)`` for its layout; grouped-query attention (LLaMA family) can only lose whole groups: a
key/value head with every query head that reads it.
"""

from __future__ import annotations

from kiln.errors import ConfigError, InputError


def read_pruned_heads(raw: dict, layers: int, heads: int, group: int = 1) -> dict[int, tuple[int, ...]]:
    """config.json's ``pruned_heads`` ({"layer": [heads]}, keys as strings in JSON) checked against the model: layer
    and head indices in range, no layer left without heads, whole groups of ``group`` query heads."""
    value = raw.get("pruned_heads") or {}
    if not isinstance(value, dict):
        raise ConfigError(f"config.json 'pruned_heads' must map layer indices to lists of heads, got {value!r:.100}.")
    pruned = {}
    for key, listed in value.items():
        try:
            layer = int(key)
        except (TypeError, ValueError):
            raise ConfigError(f"config.json 'pruned_heads' has the key {key!r:.50}; keys are layer indices.") from None
        if not isinstance(listed, (list, tuple)) or not all(isinstance(h, int) and not isinstance(h, bool) for h in listed):
            raise ConfigError(f"config.json 'pruned_heads' for layer {layer} must be a list of head indices.")
        pruned[layer] = tuple(sorted(set(listed)))
    check(pruned, layers, heads, group, where="config.json 'pruned_heads'", error=ConfigError)
    return {layer: heads_ for layer, heads_ in sorted(pruned.items()) if heads_}


def check(pruned: dict, layers: int, heads: int, group: int, where: str, error: type = InputError) -> None:
    for layer, listed in pruned.items():
        if not 0 <= layer < layers:
            raise error(f"{where}: layer {layer} does not exist (the model has layers 0 to {layers - 1}).")
        bad = [h for h in listed if not 0 <= h < heads]
        if bad:
            raise error(f"{where}: layer {layer} has no head {bad[0]} (heads 0 to {heads - 1}).")
        if len(set(listed)) >= heads:
            raise error(f"{where}: pruning every head of layer {layer} leaves it no attention; keep one.")
        if group > 1:
            groups = {h // group for h in listed}
            partial = [g for g in sorted(groups) if not all(g * group + i in listed for i in range(group))]
            if partial:
                g = partial[0]
                raise error(f"{where}: layer {layer} prunes part of a grouped-query group: query heads "
                                 f"{list(range(g * group, (g + 1) * group))} share key/value head {g}, so they go "
                                 "together or not at all.")


def prune_linear(layer, index, dim: int):
    """The torch ``nn.Linear`` ``layer`` keeping the rows (dim 0: outputs) or columns (dim 1: inputs) in ``index``;
    the bias follows the rows."""
    import torch
    import torch.nn as nn

    weight = layer.weight.index_select(dim, index).detach().clone()
    bias = layer.bias.detach().clone() if layer.bias is not None else None
    if bias is not None and dim == 0:
        bias = bias[index]
    out_features, in_features = weight.shape
    new = nn.Linear(in_features, out_features, bias=bias is not None)
    with torch.no_grad():
        new.weight.copy_(weight)
        if bias is not None:
            new.bias.copy_(bias)
    return new


def head_rows(heads: list[int], head_dim: int):
    """The projection rows of ``heads`` (each ``head_dim`` wide), in order, as a torch index."""
    import torch

    return torch.cat([torch.arange(h * head_dim, (h + 1) * head_dim) for h in heads]) if heads else torch.zeros(0, dtype=torch.long)


class PruneHeadsMixin:
    """``prune_heads`` for a torch reference whose layers' attention modules are listed by ``attention_modules()``
    and implement ``prune(current_heads)``; the config has ``pruned_heads`` and ``heads_per_group``."""

    def prune_heads(self, heads_to_prune: dict) -> None:
        config = self.config
        if not isinstance(heads_to_prune, dict) or not heads_to_prune:
            raise InputError("prune_heads takes {layer: [head indices]}, e.g. {0: [1, 2]}.")
        heads, group = config.num_attention_heads, config.heads_per_group
        requested = {}
        for layer, listed in heads_to_prune.items():
            if isinstance(listed, int):
                listed = [listed]
            if not isinstance(listed, (list, tuple, set)) or not all(isinstance(h, int) and not isinstance(h, bool)
                                                                    for h in listed):
                raise InputError(f"prune_heads: layer {layer} needs a list of head indices, got {listed!r:.100}.")
            requested[int(layer)] = sorted(set(listed))
        merged = {}
        for layer, listed in requested.items():
            done = set(config.pruned_heads.get(layer, ()))
            twice = sorted(done & set(listed))
            if twice:
                raise InputError(f"prune_heads: head(s) {twice} of layer {layer} were pruned already.")
            merged[layer] = sorted(done | set(listed))
        check(merged, config.num_hidden_layers, heads, group, where="prune_heads")
        modules = self.attention_modules()
        for layer, listed in requested.items():
            remaining = [h for h in range(heads) if h not in config.pruned_heads.get(layer, ())]
            modules[layer].prune([remaining.index(h) for h in listed])
        from kiln.graphs.checkpoint import replace_config

        pruned = dict(sorted({**config.pruned_heads, **{layer: tuple(h) for layer, h in merged.items()}}.items()))
        replace_config(self, {"pruned_heads": {str(k): list(v) for k, v in pruned.items()}}, pruned_heads=pruned)
