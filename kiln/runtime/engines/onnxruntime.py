"""onnxruntime engine: CPU by default, CUDA when asked for (or "auto") and the provider is installed."""

from __future__ import annotations

import contextlib
import logging
import os
import threading
from pathlib import Path

import numpy as np
import onnxruntime as ort

from kiln.artifact import MANIFEST, load_manifest
from kiln.errors import ArtifactError, InputError
from kiln.runtime.engines.base import TensorInfo, cache_buffer, check_head_mask, output_names

log = logging.getLogger("kiln")

_ORT_DTYPES = {
    "tensor(float)": "float32", "tensor(float16)": "float16", "tensor(double)": "float64", "tensor(bfloat16)": "bfloat16",
    "tensor(int64)": "int64", "tensor(int32)": "int32", "tensor(int8)": "int8", "tensor(uint8)": "uint8",
    "tensor(bool)": "bool",
}


# onnxruntime graph optimizers that slow kiln's graphs down on the CPU provider, by measurement. SkipLayerNormFusion
# turns Add + LayerNormalization into com.microsoft.SkipLayerNormalization, whose CPU kernel runs 4x slower than the
# pair it replaces (8x128x384: 1.39 vs 0.33 ms; all-MiniLM-L6-v2 b8 s128 fp32 -5%,
# int8 -6%, b1 s16 int8 -10%; benchmarks/RESULTS.md). GPU providers keep it: a different kernel, not measured here.
CPU_DISABLED_OPTIMIZERS = ("SkipLayerNormFusion",)


def providers_for(device: str) -> list[str]:
    available = ort.get_available_providers()
    if device == "cpu":
        return ["CPUExecutionProvider"]
    if device in ("cuda", "auto"):
        if "CUDAExecutionProvider" in available:
            return ["CUDAExecutionProvider", "CPUExecutionProvider"]
        if device == "cuda":
            raise InputError("device='cuda' needs onnxruntime-gpu (CUDAExecutionProvider is not available). "
                             "Install it with: pip uninstall onnxruntime && pip install 'kiln[gpu]'")
        log.info("device='auto': CUDAExecutionProvider not available, running on CPU")
        return ["CPUExecutionProvider"]
    raise InputError(f"Unknown device {device!r}; use 'cpu', 'cuda' or 'auto'.")


class OnnxRuntimeEngine:
    """One InferenceSession; ``run`` is safe to call from several threads at once (onnxruntime guarantees it)."""

    name = "onnxruntime"

    def __init__(self, path: str | os.PathLike, device: str = "cpu", threads: int | None = None,
                 axes: dict | None = None, spinning: bool = True, manifest: dict | None = None):
        """``axes``: dynamic axis name -> {"min", "max"}, the ranges the graph was exported and validated for; by
        default read from the manifest. ``manifest``: the artifact's kiln.json, already loaded; by default read from
        beside ``path`` (none for a bare ONNX file). ``spinning=False`` stops the
        intra-op threads from busy-waiting after each run: a little more latency for back-to-back calls, but no
        cores burnt between them (for processes that share the CPU with other work, and fair benchmarks)."""
        path = Path(path)
        if not path.is_file():
            raise ArtifactError(f"No ONNX model at {path}. Re-export the artifact.")
        if manifest is None:
            manifest = load_manifest(path.parent) if (path.parent / MANIFEST).is_file() else {}
        if axes is None:
            axes = manifest.get("dynamic_axes")
        self.path, self.axes = path, dict(axes or {})
        options = ort.SessionOptions()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        # Errors only: onnxruntime warns about shape-inference details of outputs it then produces correctly.
        options.log_severity_level = 3
        if threads:
            options.intra_op_num_threads = int(threads)
            options.inter_op_num_threads = 1
        if not spinning:
            options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        self.providers = providers_for(device)
        disabled = list(CPU_DISABLED_OPTIMIZERS) if self.providers[0] == "CPUExecutionProvider" else []
        try:
            self.session = ort.InferenceSession(str(path), options, providers=self.providers,
                                                disabled_optimizers=disabled)
        except Exception as err:  # onnxruntime raises its own Fail/InvalidGraph/... types from pybind
            raise ArtifactError(f"onnxruntime could not load {path}: {str(err).strip()[:500]}. "
                                "The file may be corrupt or need a newer onnxruntime; re-export or upgrade.") from err
        self._inputs = [TensorInfo(i.name, _ORT_DTYPES.get(i.type, i.type), tuple(i.shape)) for i in self.session.get_inputs()]
        self._outputs = [TensorInfo(o.name, _ORT_DTYPES.get(o.type, o.type), tuple(o.shape)) for o in self.session.get_outputs()]
        self._output_infos = {o.name: o for o in self._outputs}
        # a decoder whose KV cache is written in place (kiln.exporter.passes.cache_in_place): past -> present
        self._buffered = {i.name: "present." + i.name.removeprefix("past_key_values.") for i in self._inputs
                          if len(i.shape) == 4 and i.shape[2] == "cache_capacity"
                          and "present." + i.name.removeprefix("past_key_values.") in self._output_infos}
        # the inputs with a batch axis, for a run that has to go row by row (_row_by_row)
        ids = next((i for i in self._inputs if i.name == "input_ids"), None)
        self._batched = frozenset(i.name for i in self._inputs if ids is not None and i.shape and
                                  i.shape[0] == ids.shape[0]) if self._buffered else frozenset()
        # Initializers that may be fed like inputs (onnxruntime's "overridable" ones): those kiln.json lists, or all
        # of them for a bare graph, e.g. the validator's before kiln.json exists.
        listed = {t["name"] for t in manifest.get("optional_inputs") or []} if "optional_inputs" in manifest else None
        self._optional = [TensorInfo(i.name, _ORT_DTYPES.get(i.type, i.type), tuple(i.shape))
                          for i in self.session.get_overridable_initializers() if listed is None or i.name in listed]
        self._optional_names = frozenset(info.name for info in self._optional)
        self._local = threading.local()  # one IO binding per thread: a binding holds the state of the call in flight

    def inputs(self) -> list[TensorInfo]:
        return list(self._inputs)

    def optional_inputs(self) -> list[TensorInfo]:
        return list(self._optional)

    def outputs(self) -> list[TensorInfo]:
        return list(self._outputs)

    def run(self, feed: dict, outputs: list[str] | None = None, keep=(), into: dict | None = None) -> dict:
        """As the Engine protocol says; kept outputs are OrtValues, fed back without a copy through numpy. ``into``
        (output name -> a C-contiguous array of its shape): the output is written into that array, returned as it is;
        an array that is also in the feed is bound once as both, so the graph updates it in place (a decoder's KV
        cache buffer, ``kiln.exporter.passes.cache_in_place``)."""
        into = into or {}
        if self._buffered:
            feed, into = self._exact_buffers(feed, into)
            if self._row_by_row(feed):
                return self._run_rows(feed, outputs, keep, into)
        handles = {name: value for name, value in feed.items() if isinstance(value, ort.OrtValue)}
        arrays = {name: value for name, value in feed.items() if name not in handles} if handles else feed
        checked, sizes = check_feed(self._inputs, arrays, self.axes, optional=self._optional, handles=handles)
        known = self._output_infos
        names = output_names(list(known), outputs, (*keep, *into))
        with self._errors():
            if keep or handles or into:
                results = self._run_bound(checked, handles, names, keep, into)
            else:
                results = dict(zip(names, self.session.run(names, checked)))
        check_outputs([known[name] for name in names if name not in keep], results, sizes, self.path)
        return results

    def _exact_buffers(self, feed: dict, into: dict) -> tuple[dict, dict]:
        """An in-place decoder fed the concatenating convention (each past exactly the positions before this step,
        as the validator and the accuracy gate feed it): each such past copied into a buffer of past + sequence
        positions, which the graph fills and returns as the present, ``concat(past, new)``. Pasts whose present the
        caller gives a buffer for (``DecoderSession``) are left as they are."""
        feed, into = dict(feed), dict(into)
        steps = np.shape(feed.get("input_ids", ()))[1:2]
        for past, present in self._buffered.items():
            cache = feed.get(past)
            if present in into or cache is None or isinstance(cache, ort.OrtValue) or not steps:
                continue
            cache = np.asarray(cache)
            if cache.ndim != 4:
                continue  # check_feed names the wrong rank
            feed[past] = into[present] = cache_buffer(cache, cache.shape[2] + steps[0])
        return feed, into

    def _row_by_row(self, feed: dict) -> bool:
        """Whether onnxruntime's GroupQueryAttention (passes/cache_in_place.py) needs this feed one row at a time: its
        CPU kernel takes several tokens over a non-empty cache (chunked prefill, prompt lookup's verification, a
        batch joining with a long prompt) for a batch of one only."""
        ids, mask = feed.get("input_ids"), feed.get("attention_mask")
        if ids is None or mask is None or not self._batched:
            return False
        (rows, steps), width = np.shape(ids)[:2], np.shape(mask)[1]
        return rows > 1 and steps > 1 and width > steps

    def _run_rows(self, feed: dict, outputs, keep, into: dict) -> dict:
        """``run`` for each row of the batch, writing into each row of ``into``'s arrays (the cache buffers: a row of a
        C-contiguous buffer is one), the other outputs stacked."""
        rows = np.shape(feed["input_ids"])[0]
        feed = {name: value.numpy() if isinstance(value, ort.OrtValue) else value for name, value in feed.items()}
        parts = []
        for row in range(rows):
            part = {name: (value[row:row + 1] if name in self._batched else value) for name, value in feed.items()}
            parts.append(self.run(part, outputs, (), {name: array[row:row + 1] for name, array in into.items()}))
        results = {}
        for name in parts[0]:
            if name in into:
                results[name] = into[name]
            else:
                stacked = np.concatenate([part[name] for part in parts])
                results[name] = ort.OrtValue.ortvalue_from_numpy(stacked) if name in keep else stacked
        return results

    def _run_bound(self, checked: dict, handles: dict, names: list[str], keep, into: dict) -> dict:
        """One run through this thread's IO binding: outputs stay OrtValues, and those in ``keep`` are returned as
        such, so that a KV cache goes from one step's outputs to the next step's inputs without numpy in between;
        those in ``into`` are written into the given arrays."""
        binding = getattr(self._local, "binding", None)
        if binding is None:
            binding = self._local.binding = self.session.io_binding()
        binding.clear_binding_inputs()
        binding.clear_binding_outputs()
        # an OrtValue over each target array (no copy on the CPU), bound as input too where the feed holds it
        targets = {id(array): ort.OrtValue.ortvalue_from_numpy(array) for array in into.values()}
        held = []  # onnxruntime reads bound CPU arrays in place: keep each alive until the run is done
        for name, value in checked.items():
            if id(value) in targets:
                binding.bind_ortvalue_input(name, targets[id(value)])
                continue
            value = np.asarray(value, order="C")  # not ascontiguousarray: it makes a 0-d array 1-d
            held.append(value)
            # bind_cpu_input looks for a graph input of that name; an OrtValue binds an initializer too
            if name in self._optional_names:
                binding.bind_ortvalue_input(name, ort.OrtValue.ortvalue_from_numpy(value))
            else:
                binding.bind_cpu_input(name, value)
        for name, value in handles.items():
            binding.bind_ortvalue_input(name, value)
        for name in names:
            if name in into:
                binding.bind_ortvalue_output(name, targets[id(into[name])])
            else:
                binding.bind_output(name, "cpu")
        self.session.run_with_iobinding(binding)
        values = binding.get_outputs()  # OrtValues in bind order
        return {name: into[name] if name in into else value if name in keep else value.numpy()
                for name, value in zip(names, values)}

    @contextlib.contextmanager
    def _errors(self):
        try:
            yield
        except Exception as err:  # onnxruntime's pybind error types; the feed itself passed kiln's checks
            message = str(err).strip()[:500]
            if isinstance(err, _INVALID_ARGUMENT):  # a value the graph cannot take, e.g. a token id >= vocab size
                raise InputError(f"onnxruntime rejected the feed: {message}. Check the input values (token ids "
                                 "must be below the vocabulary size).") from err
            raise ArtifactError(f"onnxruntime failed to run {self.path}: {message}. The feed passed kiln's checks, "
                                "so the graph may be damaged: verify the artifact (kiln run --verify) or re-export "
                                "it.") from err

    def release(self) -> None:
        """Drop what this thread's IO binding still holds from its last run: its inputs and outputs (for a decoder,
        the whole KV cache), which would otherwise stay alive in every thread that ever ran with ``keep``."""
        binding = getattr(self._local, "binding", None)
        if binding is not None:
            binding.clear_binding_inputs()
            binding.clear_binding_outputs()

    def close(self) -> None:
        self.session, self._local = None, threading.local()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


_INVALID_ARGUMENT = getattr(getattr(ort.capi, "onnxruntime_pybind11_state", None), "InvalidArgument", ())


def check_feed(inputs: list[TensorInfo], feed: dict, axes: dict | None = None, *, optional: list[TensorInfo] = (),
               handles: dict | None = None) -> tuple[dict, dict]:
    """The feed as arrays of the graph's dtypes, checked before onnxruntime sees it, whose own errors name a node
    deep inside the graph (or, for a mismatched batch, broadcast silently). Returns (arrays, named axis sizes).

    Checks: every input present and no unknown ones; dtypes (a same-kind cast is allowed, e.g. int32 -> int64);
    rank; fixed dimensions; a named axis the same size in every input; named axes inside ``axes`` (the ranges the
    artifact was exported and validated for); ids and masks not negative (a negative id would index from the end
    of a table without any error). ``optional`` inputs are checked when fed. ``handles`` (name -> a value an earlier
    run kept) count as present and are not checked: the engine made them, and a decode step must stay cheap."""
    handles = handles or {}
    names = {info.name for info in (*inputs, *optional)}
    extra = sorted(set(feed) - names) + sorted(set(handles) - names)
    if extra:
        takes = [info.name for info in inputs] + [f"{info.name} (optional)" for info in optional]
        raise InputError(f"The feed has input(s) {extra} that the graph does not take; its inputs are {takes}.")
    checked, sizes = {}, {}  # sizes: axis name -> (size, the input that set it)
    for info in (*inputs, *(info for info in optional if info.name in feed)):
        if info.name in handles:
            continue
        if info.name not in feed:
            raise InputError(f"Engine input {info.name!r} is missing from the feed (got {sorted({*feed, *handles})}).")
        try:
            value = np.asarray(feed[info.name])
        except ValueError as err:  # ragged nested lists
            raise InputError(f"Engine input {info.name!r} is not a rectangular array ({err}).") from None
        if value.dtype.name != info.dtype:
            try:
                castable = np.can_cast(value.dtype, info.dtype, casting="same_kind")
            except TypeError:  # the graph takes a type numpy does not name (strings, ...)
                castable = False
            if not castable:
                raise InputError(f"Engine input {info.name!r} must be {info.dtype}, got {value.dtype}.")
            value = value.astype(info.dtype)
        if value.ndim != len(info.shape):
            raise InputError(f"Engine input {info.name!r} must have {len(info.shape)} dims {info.shape}, "
                             f"got shape {value.shape}.")
        for dim, size in zip(info.shape, value.shape):
            if isinstance(dim, int) and dim >= 0 and size != dim:
                raise InputError(f"Engine input {info.name!r} must have shape {info.shape}, got {value.shape}: the "
                                 f"fixed size {dim} is part of the exported graph.")
            if not isinstance(dim, str) or not dim:
                continue
            if dim in sizes and sizes[dim][0] != size:
                raise InputError(f"Axis {dim!r} is {size} in input {info.name!r} but {sizes[dim][0]} in "
                                 f"{sizes[dim][1]!r}; every input must have the same {dim} size.")
            sizes.setdefault(dim, (size, info.name))
            allowed = (axes or {}).get(dim)
            if allowed and not allowed["min"] <= size <= allowed["max"]:
                option = {"batch": " or re-export with --batch MIN:MAX",
                          "sequence": " (shorten the input) or re-export with --seq MIN:MAX"}.get(dim, "")
                raise InputError(f"Engine input {info.name!r} has {dim} = {size}, outside the range "
                                 f"{allowed['min']}..{allowed['max']} the artifact was exported and validated for. "
                                 f"Stay inside it{option}.")
        if info.name.endswith(("_ids", "_mask")) and value.dtype.kind in "iu" and value.size and value.min() < 0:
            raise InputError(f"Engine input {info.name!r} holds negative values (down to {value.min()}); ids, "
                             "positions and masks are >= 0.")
        if info.name == "head_mask":
            check_head_mask(value)
        checked[info.name] = value
    return checked, sizes


def check_outputs(infos: list[TensorInfo], results: dict, sizes: dict, path) -> None:
    """Refuse outputs whose shape disagrees with the graph's declaration and the feed (batch in = batch out): a
    wrong shape here means a damaged graph, and returning it would hand callers silently wrong results."""
    for info in infos:
        shape = np.shape(results[info.name])
        expected = tuple(sizes[d][0] if isinstance(d, str) and d in sizes else d for d in info.shape)
        # A declared 0 is not checked: onnxruntime's shape inference reports 0 for the last axis of Attention's
        # qk_matmul_output (the attentions.{i} outputs), though the graph declares it and the kernel fills it.
        wrong = any(isinstance(e, int) and e > 0 and e != s for e, s in zip(expected, shape))
        if len(shape) != len(expected) or wrong:
            raise ArtifactError(f"{path} returned {info.name!r} of shape {shape}, but the graph declares "
                                f"{info.shape}, which for this feed means {expected}. The graph is damaged: re-export "
                                "the artifact.")
