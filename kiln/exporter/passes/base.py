"""The shape of every graph pass: candidates -> a match or a skip with its reason -> rewrite -> one result type.

kiln emits attention as one fused node at export, so a pass rewrites a known, traced pattern rather than guessing:
``candidates`` lists the places to look (nodes, or groups of them), ``match`` returns what the rewrite needs or a
:class:`Skip` that says why this place does not have the exact pattern (logged at debug level and counted), and
``rewrite`` changes the graph for one match. ``finish`` runs once after at least one rewrite (removing the nodes the
rewrites left unused, by default). Passes are ``onnx_ir`` in-place passes, so they compose with onnx_ir's own.
"""

from __future__ import annotations

import dataclasses
import logging
from collections import Counter
from collections.abc import Iterable
from typing import Any

import onnx_ir as ir

log = logging.getLogger("kiln")


@dataclasses.dataclass(frozen=True)
class Skip:
    """A candidate the pass leaves alone, and why."""

    reason: str


@dataclasses.dataclass
class PassResult(ir.passes.PassResult):
    """``rewritten`` matches; ``skipped`` candidates by reason; ``details``: counts a pass adds (nodes written...)."""

    name: str = ""
    rewritten: int = 0
    skipped: Counter = dataclasses.field(default_factory=Counter)
    details: dict = dataclasses.field(default_factory=dict)

    def summary(self) -> str:
        skipped = "; ".join(f"{n} x {reason}" for reason, n in self.skipped.most_common())
        return f"{self.name}: {self.rewritten} rewritten" + (f", skipped {skipped}" if skipped else "")


class GraphPass(ir.passes.InPlacePass):
    """Subclasses set ``name`` and implement ``candidates``, ``match`` and ``rewrite``."""

    name = "pass"

    def candidates(self, model: ir.Model) -> Iterable[Any]:
        raise NotImplementedError

    def match(self, candidate) -> Any:
        """What ``rewrite`` needs, or a :class:`Skip`."""
        raise NotImplementedError

    def rewrite(self, model: ir.Model, match, result: PassResult) -> None:
        raise NotImplementedError

    def skipped(self, model: ir.Model, candidate, skip: Skip) -> None:
        """Called for each candidate left alone (most passes have nothing to do)."""

    def finish(self, model: ir.Model, result: PassResult) -> None:
        from onnx_ir.passes.common import RemoveUnusedNodesPass

        RemoveUnusedNodesPass()(model)

    def call(self, model: ir.Model) -> PassResult:
        result = PassResult(model, False, name=self.name)
        for candidate in list(self.candidates(model)):
            found = self.match(candidate)
            if isinstance(found, Skip):
                log.debug("%s: %s left alone: %s", self.name, getattr(candidate, "name", candidate), found.reason)
                result.skipped[found.reason] += 1
                self.skipped(model, candidate, found)
                continue
            self.rewrite(model, found, result)
            result.rewritten += 1
        result.modified = result.rewritten > 0
        if result.modified:
            self.finish(model, result)
        log.info("%s", result.summary())
        return result


def standard_nodes(model: ir.Model, op_type: str) -> list[ir.Node]:
    """Every ``op_type`` node of the standard ONNX domain, in graph order (a snapshot: passes edit the graph)."""
    return [n for n in model.graph if n.op_type == op_type and n.domain in ("", "ai.onnx")]
