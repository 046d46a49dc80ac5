"""``kiln prune MODEL OUT --keep 0.75``: score the attention heads, prune the least important, export, report.

Importance is the measured effect of masking each head: with the head masked (``head_mask``, the references'
transformers-style argument) the model runs on the accuracy gate's sentences, and the head scores the damage it
does to the task's output, 1 - cosine between the masked and the unmasked outputs (pooled hidden states for
embeddings; logits for the heads of classifiers, QA and language models), averaged over the sentences. That is the
masking variant of Michel et al. 2019 ("Are Sixteen Heads Really Better than One?"); their other score, the gradient
of the loss with respect to the head mask, needs labels, and the tasks here are unlabelled. Grouped-query models
(LLaMA family) are scored and pruned by whole groups (a key/value head with its query heads). The least damaging
heads go, globally, until ``keep`` of them remain, every layer keeping one at least; the pruned checkpoint is
exported like any other, and the report (also in kiln.json, ``pruning``) gives the heads kept per layer, the
accuracy of the pruned artifact against the unpruned model on the precision gate's metric, and the speed-up of the
pruned artifact over the unpruned one, timed here.
"""

from __future__ import annotations

import logging
import tempfile
import time
from pathlib import Path

import numpy as np

from kiln import hub
from kiln.errors import InputError

log = logging.getLogger("kiln")
METHOD = "masking effect: 1 - cosine of the task output with the head masked, on the accuracy gate's sentences"


def prune(model, output, keep: float = 0.75, task: str = "feature-extraction", save_checkpoint=None,
          rounds: int = 10, **options) -> dict:
    """Prune ``model`` (a checkpoint) to ``keep`` of its heads and export it to ``output``; returns kiln.json, whose
    ``pruning`` entry is the report. ``options`` go to ``kiln.export`` (batch, seq, precision, ...)."""
    if isinstance(keep, bool) or not isinstance(keep, (int, float)) or not 0 < keep < 1:
        raise InputError(f"--keep is the fraction of heads to keep, between 0 and 1 (e.g. 0.75); got {keep!r}.")
    from kiln.exporter.export import export
    from kiln.graphs import registry
    from kiln.graphs.checkpoint import read_state_dict

    checkpoint = hub.resolve(model, options.get("revision"))
    raw = hub.read_config(checkpoint)
    arch = registry.architecture(raw)
    arch.check_task(raw["model_type"], task)
    state = read_state_dict(checkpoint.weight_files)
    reference = registry.build(raw, task, state).eval()
    if not hasattr(reference, "prune_heads"):
        raise InputError(f"model_type {raw['model_type']!r} has no head pruning in kiln (the BERT and LLaMA families "
                         "have it).")
    if reference.config.pruned_heads:
        raise InputError("This checkpoint has pruned heads already; prune the original, unpruned checkpoint.")
    spec = _spec(arch, reference, task)
    from kiln.exporter.precision import gate_feed

    feed = gate_feed(spec, checkpoint.path)
    scores = head_importance(reference, feed, task)
    selection = choose(scores, keep, reference.config.heads_per_group)
    log.info("Pruning %d of %d heads: %s", sum(map(len, selection.values())), scores.size, selection)
    runner = _runner(reference, spec)  # the unpruned model, for the accuracy against it
    pruned = registry.build(raw, task, state).eval()
    pruned.prune_heads(selection)
    pruned_spec = _spec(arch, pruned, task)  # a pruned decoder's cache has fewer heads in pruned layers
    with tempfile.TemporaryDirectory(prefix="kiln-prune-") as tmp:
        directory = Path(save_checkpoint) if save_checkpoint else Path(tmp) / "pruned"
        pruned.save_pretrained(directory)
        hub.copy_preprocessing_files(checkpoint.path, directory)
        manifest = export(str(directory), output, task=task, **options)
        export(str(checkpoint.origin[0] if checkpoint.origin else checkpoint.path), Path(tmp) / "unpruned",
               task=task, **{k: v for k, v in options.items() if k != "keep_failed"})
        report = _report(scores, selection, reference.config, runner, (spec, pruned_spec), Path(output),
                         Path(tmp) / "unpruned", checkpoint, keep, rounds)
    from kiln.artifact import update_manifest

    def record(m: dict) -> None:
        m["pruning"] = report

    manifest = update_manifest(output, record)
    if not report["accuracy"]["passed"]:
        metric = next(iter(report["accuracy"]))
        log.warning("The pruned model's %s against the unpruned one is %.4f, below the %s the precision gate asks of "
                    "a reduced precision: keep more heads if that matters.", metric, report["accuracy"][metric],
                    report["accuracy"]["gate"])
    return manifest


def _spec(arch, reference, task: str):
    from kiln.exporter.specs import spec_for

    return spec_for(arch.spec, reference, task)


def _runner(model, spec):
    """The reference on a feed; the gate's feeds have an empty cache, so a decoder's (whose shapes a pruned graph
    changes) is left out: the reference starts from none, the same thing."""
    from kiln.exporter.trace.torch import reference_runner

    run = reference_runner(model, [o.name for o in spec.outputs])
    return lambda feed: run({k: v for k, v in feed.items() if not k.startswith("past_key_values.")})


def head_importance(model, feed: dict, task: str) -> np.ndarray:
    """(layers, heads) damage of masking each head (groups: every head of a group gets the group's score)."""
    import torch

    from kiln.exporter.specs import model_inputs

    config = model.config
    layers, heads, group = config.num_hidden_layers, config.num_attention_heads, config.heads_per_group
    inputs = model_inputs(list(feed), [torch.from_numpy(v) for v in feed.values()])
    mask = torch.as_tensor(feed.get("attention_mask"))

    def output(head_mask) -> torch.Tensor:
        with torch.no_grad():
            out = model(**inputs, head_mask=head_mask)
        if "last_hidden_state" in out:  # embeddings: mean-pooled over the real tokens
            w = mask[..., None].float()
            return (out["last_hidden_state"] * w).sum(1) / w.sum(1)
        if "start_logits" in out:
            return torch.cat([out["start_logits"], out["end_logits"]], dim=-1)
        logits = out["logits"]
        return logits.flatten(1) if logits.dim() == 2 else (logits * mask[:, -logits.shape[1]:, None]).flatten(1)

    base = output(None)
    scores = np.zeros((layers, heads))
    for layer in range(layers):
        for first in range(0, heads, group):
            head_mask = torch.ones(layers, heads)
            head_mask[layer, first:first + group] = 0
            cosine = torch.nn.functional.cosine_similarity(output(head_mask), base, dim=-1)
            scores[layer, first:first + group] = float((1 - cosine).mean())
    return scores


def choose(scores: np.ndarray, keep: float, group: int = 1) -> dict[int, list[int]]:
    """The heads to prune: the least damaging units (heads, or groups of ``group``) until ``keep`` of them remain,
    each layer keeping one unit at least."""
    layers, heads = scores.shape
    units = [(scores[layer, first], layer, first) for layer in range(layers) for first in range(0, heads, group)]
    total = len(units)
    to_prune = total - max(layers, int(round(keep * total)))
    left = {layer: heads // group for layer in range(layers)}
    selection: dict[int, list[int]] = {}
    for _, layer, first in sorted(units):
        if to_prune <= 0:
            break
        if left[layer] == 1:
            continue
        left[layer] -= 1
        selection.setdefault(layer, []).extend(range(first, first + group))
        to_prune -= 1
    return {layer: sorted(h) for layer, h in sorted(selection.items())}


def _report(scores, selection, config, runner, specs, pruned: Path, unpruned: Path, checkpoint, keep, rounds) -> dict:
    from kiln.artifact import MODEL_FILE
    from kiln.exporter.precision import accuracy, gate_feed
    from kiln.runtime.engines.onnxruntime import OnnxRuntimeEngine

    figures = accuracy(runner, specs[1], pruned / MODEL_FILE, pruned)
    engines = {name: (OnnxRuntimeEngine(path / MODEL_FILE, spinning=False), gate_feed(spec, pruned))
               for name, path, spec in (("unpruned", unpruned, specs[0]), ("pruned", pruned, specs[1]))}
    times = {name: [] for name in engines}
    try:
        for _ in range(2):  # warm-up
            for engine, feed in engines.values():
                engine.run(feed)
        for _ in range(rounds):  # interleaved, so that both see the same machine
            for name, (engine, feed) in engines.items():
                started = time.perf_counter()
                engine.run(feed)
                times[name].append(time.perf_counter() - started)
    finally:
        for engine, _ in engines.values():
            engine.close()
    median = {name: float(np.median(t)) * 1000 for name, t in times.items()}
    layers = config.num_hidden_layers
    return {
        "method": METHOD, "keep": keep, "source": checkpoint.source,
        "heads_kept": [config.num_attention_heads - len(selection.get(i, [])) for i in range(layers)],
        "pruned_heads": {str(k): v for k, v in selection.items()},
        "importance": np.round(scores, 6).tolist(),
        "accuracy": figures,
        "latency_ms": {name: round(ms, 3) for name, ms in median.items()},
        "speedup": round(median["unpruned"] / median["pruned"], 3),
        "timed_on": f"the accuracy gate's sentences in one batch, onnxruntime CPU, median of {rounds} interleaved rounds",
    }
