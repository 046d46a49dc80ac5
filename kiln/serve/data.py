"""Batch jobs on Ray Data: a kiln pipeline per actor over a dataset, and ``kiln embed`` for Parquet files.

``map_batches(dataset, OUT, task, column="text", ...)`` adds the pipeline's output for each row's ``column`` as a new
column, one engine per actor of an actor pool (``concurrency`` actors, ``threads`` onnxruntime threads each), the
same code on one machine or a cluster. ``embed_files`` writes embeddings of Parquet files: one output file per input
file, each written to a temporary name and renamed when complete, so an interrupted job leaves only whole files and
a rerun skips the inputs whose output exists (resumable per file).
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from kiln.artifact import load_manifest
from kiln.errors import InputError


class PipelineActor:
    """One actor's pipeline; called with a batch (a dict of numpy columns), returns it with the output column."""

    def __init__(self, artifact: str, task: str | None, column: str, output: str, threads: int | None,
                 options: dict):
        from kiln.runtime.pipelines import pipeline

        self.pipe = pipeline(task, artifact, threads=threads)
        self.column, self.output, self.options = column, output, options

    def __call__(self, batch: dict) -> dict:
        if self.column not in batch:
            raise InputError(f"The dataset has no column {self.column!r}; its columns: {', '.join(batch)}.")
        texts = [str(x) for x in batch[self.column].tolist()]
        results = self.pipe(texts, **self.options) if texts else []
        if results and isinstance(results[0], np.ndarray):  # vectors (return_tensors): one fixed-size column
            batch[self.output] = np.stack(results).astype(np.float32)
        else:
            values = np.empty(len(results), dtype=object)
            values[:] = results
            batch[self.output] = values
        return batch


def map_batches(dataset, artifact, task: str | None = None, *, column: str = "text", output_column: str | None = None,
                threads: int | None = 1, concurrency: int = 1, batch_size: int = 32, **options):
    """``dataset`` (a ray.data.Dataset) with ``output_column`` (default: the task's name, e.g. "embedding") holding
    ``kiln.pipeline(task, artifact)(row[column], **options)`` for every row. Lazy, as Ray Data is."""
    if not isinstance(concurrency, int) or concurrency < 1 or not isinstance(batch_size, int) or batch_size < 1:
        raise InputError("concurrency and batch_size must be positive integers.")
    task = task or load_manifest(artifact)["task"]
    output = output_column or ("embedding" if task == "feature-extraction" else task.replace("-", "_"))
    return dataset.map_batches(PipelineActor, fn_constructor_args=(str(artifact), task, column, output, threads,
                                                                    options),
                               concurrency=concurrency, batch_size=batch_size, batch_format="numpy",
                               num_cpus=threads or 1)


def input_files(source: Path) -> list[Path]:
    if source.is_dir():
        files = sorted(source.rglob("*.parquet"))
        if not files:
            raise InputError(f"{source} holds no .parquet files.")
        return files
    if not source.is_file():
        raise InputError(f"{source} does not exist; give a Parquet file or a directory of them.")
    return [source]


def embed_files(artifact, source, target, *, column: str = "text", threads: int | None = 1, concurrency: int = 1,
                batch_size: int = 32, pooling: str = "mean", progress=print) -> list[Path]:
    """Embeddings of ``source`` (a Parquet file, or a directory of them) into ``target`` (a file for a file, a
    directory mirroring the inputs for a directory): every input column kept, plus "embedding" (float32, unit
    length). Returns the files written; inputs whose output exists already are skipped."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    import ray

    source, target = Path(source), Path(target)
    files = input_files(source)
    outputs = [target if source.is_file() else target / f.relative_to(source) for f in files]
    task = load_manifest(artifact)["task"]
    if task not in ("feature-extraction", "zero-shot-image-classification"):
        raise InputError(f"{artifact} is a {task} artifact; embeddings need a feature-extraction one (or CLIP/SigLIP).")
    options = {"return_tensors": True}
    if task == "feature-extraction":  # token vectors pooled; an image + text artifact's text tower is pooled already
        options.update(pooling=pooling, normalize=True)
    written = []
    for i, (file, out) in enumerate(zip(files, outputs), 1):
        if out.exists():
            progress(f"[{i}/{len(files)}] {out} exists: skipped")
            continue
        dataset = map_batches(ray.data.read_parquet(str(file)), artifact, "feature-extraction", column=column,
                              threads=threads, concurrency=concurrency, batch_size=batch_size, **options)
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = out.with_name(f".{out.name}.{os.getpid()}.tmp")
        writer, rows = None, 0
        try:
            for batch in dataset.iter_batches(batch_format="pyarrow", batch_size=batch_size):
                vectors = np.stack(batch.column("embedding").to_pylist()).astype(np.float32)
                table = batch.drop_columns(["embedding"]).append_column(
                    "embedding", pa.FixedSizeListArray.from_arrays(pa.array(vectors.ravel()), vectors.shape[1]))
                writer = writer or pq.ParquetWriter(str(tmp), table.schema)
                writer.write_table(table)
                rows += table.num_rows
            if writer is None:
                raise InputError(f"{file} has no rows to embed.")
            writer.close()
            os.replace(tmp, out)  # whole or not at all
        finally:
            if writer is not None and tmp.exists():
                writer.close()
                tmp.unlink(missing_ok=True)
        progress(f"[{i}/{len(files)}] {file} -> {out}: {rows} rows")
        written.append(out)
    return written
