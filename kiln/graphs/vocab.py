"""``model.resize_token_embeddings(n)`` for the PyTorch references, as transformers' does.

A torch model class names its token tables in ``token_tables``: the input embedding (always), an untied output
matrix and a vocabulary bias (where it has them), as attribute paths. Resizing keeps the rows there are; rows added
start at the mean of the old rows, plus a tiny draw from their covariance (transformers' ``mean_resizing``: new
tokens then score like an average token instead of at random, and a tied head stays tied because it reads the same
matrix; its own vocabulary bias, as a masked-LM head has, is padded with zeros). The config's ``vocab_size``
follows, so ``save_pretrained`` writes a checkpoint transformers loads.
"""

from __future__ import annotations

import logging

import torch
import torch.nn as nn

from kiln.errors import ConfigError, InputError
from kiln.graphs.checkpoint import replace_config

log = logging.getLogger("kiln")


class TokenEmbeddingsMixin:
    """Mixed into the torch references; ``token_tables = {"input": path, "output": path, "bias": path}``."""

    token_tables: dict = {}

    def get_input_embeddings(self) -> nn.Embedding:
        if "input" not in self.token_tables:
            raise ConfigError(f"{type(self).__name__} has no token embeddings to resize (it does not read token ids).")
        return _get(self, self.token_tables["input"])

    def resize_token_embeddings(self, new_num_tokens: int) -> nn.Embedding:
        """Resize every vocabulary-sized table to ``new_num_tokens`` rows; returns the new input embedding."""
        embed = self.get_input_embeddings()
        if isinstance(new_num_tokens, bool) or not isinstance(new_num_tokens, int) or new_num_tokens < 1:
            raise InputError(f"resize_token_embeddings takes a positive number of tokens, got {new_num_tokens!r}.")
        old = embed.num_embeddings
        if new_num_tokens == old:
            return embed
        if new_num_tokens < old:
            log.warning("Shrinking the vocabulary from %d to %d rows drops the last %d tokens' embeddings; token ids "
                        "from %d up must not be fed any more.", old, new_num_tokens, old - new_num_tokens,
                        new_num_tokens)
        new = nn.Embedding(new_num_tokens, embed.embedding_dim, padding_idx=embed.padding_idx)
        with torch.no_grad():
            new.weight.copy_(_resized(embed.weight, new_num_tokens))
        _set(self, self.token_tables["input"], new)
        head = _get(self, self.token_tables["output"]) if self.token_tables.get("output") else None
        if head is not None:  # an untied LM head: its rows are the vocabulary too
            linear = nn.Linear(head.in_features, new_num_tokens, bias=head.bias is not None)
            with torch.no_grad():
                linear.weight.copy_(_resized(head.weight, new_num_tokens))
                if head.bias is not None:
                    linear.bias.copy_(_resized_bias(head.bias, new_num_tokens))
            _set(self, self.token_tables["output"], linear)
        if self.token_tables.get("bias"):  # the vocabulary bias of a head tied to the embedding: zeros, as transformers
            bias = _get(self, self.token_tables["bias"]).detach()  # pads a tied decoder's bias
            padded = torch.cat([bias, bias.new_zeros(max(new_num_tokens - len(bias), 0))])[:new_num_tokens]
            _set(self, self.token_tables["bias"], nn.Parameter(padded))
        replace_config(self, {"vocab_size": new_num_tokens}, vocab_size=new_num_tokens)
        return new


def _resized(weight: torch.Tensor, rows: int) -> torch.Tensor:
    """``weight`` (V, C) with ``rows`` rows: the old ones kept, new ones at their mean plus a draw from 1e-9 times
    their covariance (transformers' choice; the mean alone where that covariance is not positive definite)."""
    old = weight.detach().float()
    if rows <= len(old):
        return old[:rows].to(weight.dtype)
    mean = old.mean(0)
    centered = old - mean
    covariance = centered.T @ centered / len(old)
    added = rows - len(old)
    try:
        draws = torch.distributions.MultivariateNormal(mean, covariance_matrix=1e-9 * covariance).sample((added,))
    except ValueError:  # not positive definite (e.g. fewer rows than columns): the mean itself
        draws = mean[None].expand(added, -1)
    return torch.cat([old, draws]).to(weight.dtype)


def _resized_bias(bias: torch.Tensor, rows: int) -> torch.Tensor:
    """A vocabulary bias with ``rows`` entries: new ones at the old mean (plus 1e-9 of their spread)."""
    old = bias.detach().float()
    if rows <= len(old):
        return old[:rows].to(bias.dtype)
    added = torch.empty(rows - len(old)).normal_(mean=float(old.mean()), std=1e-9 * float(old.std()))
    return torch.cat([old, added]).to(bias.dtype)


def _get(module, path: str):
    for part in path.split("."):
        module = getattr(module, part)
    return module


def _set(module, path: str, value) -> None:
    *parents, name = path.split(".")
    for part in parents:
        module = getattr(module, part)
    setattr(module, name, value)
