"""TensorRT engine: a serialized plan from ``kiln build``, behind the same interface as the onnxruntime engine.

Device memory goes through Polygraphy's CUDA wrapper (ctypes over libcudart), so running an engine needs TensorRT and
Polygraphy but neither torch nor cuda-python. Inputs may be numpy arrays or :class:`DeviceBuffer`\\ s, the handles
an earlier :meth:`TensorRTEngine.run` returns for the outputs it was asked to ``keep`` (used in place: a decoder's
KV cache stays on the GPU between steps).
"""

from __future__ import annotations

import ctypes
import logging
import threading
import weakref
from pathlib import Path

import numpy as np

from kiln.errors import ArtifactError, InputError, MissingDependencyError
from kiln.runtime.engines.base import TensorInfo, output_names

log = logging.getLogger("kiln")
TENSORRT_MISSING = "TensorRT is not installed (pip install 'kiln[tensorrt]' and tensorrt from NVIDIA)"
_CUDA_DEV_ATTR_CC_MAJOR, _CUDA_DEV_ATTR_CC_MINOR = 75, 76  # cudaDeviceAttr values


def import_tensorrt(purpose: str = "Running a TensorRT engine"):
    """(tensorrt, polygraphy.cuda), or a MissingDependencyError that says what to install."""
    hint = ("TensorRT itself comes from NVIDIA: pip install tensorrt --extra-index-url https://pypi.nvidia.com "
            "(or NVIDIA's tar/deb packages), on a machine with an NVIDIA GPU")
    try:
        import tensorrt as trt
    except ImportError as err:
        raise MissingDependencyError("tensorrt", "tensorrt", purpose, hint=hint) from err
    try:
        from polygraphy import cuda
    except ImportError as err:
        raise MissingDependencyError("polygraphy", "tensorrt", purpose) from err
    return trt, cuda


def tensorrt_version() -> str | None:
    """The installed TensorRT's version, or None when it does not import."""
    try:
        import tensorrt as trt
    except ImportError:
        return None
    return trt.__version__


def gpu_compute_capability(device: int = 0) -> str | None:
    """``"9.0"`` for an H100, read through libcudart (Polygraphy locates it); None without CUDA or a GPU."""
    try:
        from polygraphy import cuda

        handle = cuda.wrapper().handle
        count, major, minor = ctypes.c_int(0), ctypes.c_int(0), ctypes.c_int(0)
        if handle.cudaGetDeviceCount(ctypes.byref(count)) != 0 or count.value <= device:
            return None
        if handle.cudaDeviceGetAttribute(ctypes.byref(major), _CUDA_DEV_ATTR_CC_MAJOR, device) != 0:
            return None
        if handle.cudaDeviceGetAttribute(ctypes.byref(minor), _CUDA_DEV_ATTR_CC_MINOR, device) != 0:
            return None
    except Exception:  # no polygraphy, no libcudart, no driver: Polygraphy raises its own exception types
        log.debug("no CUDA device found", exc_info=True)
        return None
    return f"{major.value}.{minor.value}"


class _Pool:
    """Device allocations by size class (powers of two): a growing KV cache reuses the buffers of earlier steps
    instead of calling cudaMalloc for every layer at every token."""

    def __init__(self, cuda):
        self.cuda, self.free, self.lock = cuda, {}, threading.Lock()

    def acquire(self, nbytes: int):
        size = 1 << max(8, (max(nbytes, 1) - 1).bit_length())
        with self.lock:
            if self.free.get(size):
                return self.free[size].pop()
        return self.cuda.DeviceArray.raw((size,))

    def release(self, array) -> None:
        with self.lock:
            self.free.setdefault(array.allocated_nbytes, []).append(array)

    def close(self) -> None:
        with self.lock:
            for arrays in self.free.values():
                for array in arrays:
                    array.free()
            self.free.clear()


class DeviceBuffer:
    """An engine output left on the GPU. Feed it back as an input; ``numpy()`` copies it to the host. Its memory
    returns to the engine's pool when the last reference goes."""

    def __init__(self, pool: _Pool, array, shape: tuple, dtype: np.dtype):
        self.shape, self.dtype, self.ptr = tuple(shape), np.dtype(dtype), array.ptr
        self._array, self._pool = array, weakref.ref(pool)

    def numpy(self) -> np.ndarray:
        out = np.empty(self.shape, dtype=self.dtype)
        if out.nbytes:
            self._array.view(shape=(out.nbytes,)).copy_to(out.reshape(-1).view(np.uint8))
        return out

    def __del__(self):
        pool = self._pool()
        if pool is not None:
            pool.release(self._array)


class TensorRTEngine:
    """One deserialized engine and one execution context; calls are serialized by a lock (a context holds the shapes
    of the call in flight)."""

    name = "tensorrt"

    def __init__(self, plan: str | Path, *, io: dict | None = None, jit_plugins: bool = False,
                 version_compatible: bool = False):
        """``io``: name -> shape with axis names (the manifest's inputs and outputs), for ``inputs()``/``outputs()``.
        ``jit_plugins``: the engine calls the kiln plugin's Python implementation, which must be registered first."""
        trt, self._cuda = import_tensorrt()
        if jit_plugins:
            from kiln.kernels.attention import trt_plugin

            trt_plugin.register()
        plan = Path(plan)
        if not plan.is_file():
            raise ArtifactError(f"No TensorRT engine at {plan}. Rebuild it with `kiln build`.")
        self._trt, self._logger = trt, trt.Logger(trt.Logger.WARNING)
        self._runtime = trt.Runtime(self._logger)
        if version_compatible:
            self._runtime.engine_host_code_allowed = True  # a version-compatible plan embeds its lean runtime
        self._engine = self._runtime.deserialize_cuda_engine(plan.read_bytes())
        if self._engine is None:
            raise ArtifactError(f"TensorRT {trt.__version__} could not load {plan}: it was built by another TensorRT "
                                "version or for another GPU. Rebuild it with `kiln build`.")
        self._context = self._engine.create_execution_context()
        self._stream, self._pool, self._lock = self._cuda.Stream(), _Pool(self._cuda), threading.Lock()
        self._scratch: dict[str, object] = {}  # name -> DeviceArray reused by plain run() calls
        io = io or {}
        infos = {"input": [], "output": []}
        for i in range(self._engine.num_io_tensors):
            name = self._engine.get_tensor_name(i)
            dims = tuple(self._engine.get_tensor_shape(name))
            named = io.get(name) or [f"{name}_dim{a}" for a in range(len(dims))]
            shape = tuple(d if d >= 0 else named[a] for a, d in enumerate(dims))
            kind = "input" if self._engine.get_tensor_mode(name) == trt.TensorIOMode.INPUT else "output"
            infos[kind].append(TensorInfo(name, np.dtype(trt.nptype(self._engine.get_tensor_dtype(name))).name, shape))
        self._inputs, self._outputs = infos["input"], infos["output"]

    def inputs(self) -> list[TensorInfo]:
        return list(self._inputs)

    def optional_inputs(self) -> list[TensorInfo]:
        return []  # TensorRT's ONNX parser folds an input with a default (logits_to_keep) into a constant

    def outputs(self) -> list[TensorInfo]:
        return list(self._outputs)

    def run(self, feed: dict, outputs: list[str] | None = None, keep=()) -> dict:
        """The outputs named in ``keep`` stay on the GPU as :class:`DeviceBuffer`\\ s; the others come back as
        numpy arrays."""
        names = output_names([o.name for o in self._outputs], outputs, keep, what="engine")
        with self._lock:
            held = [self._bind_input(info, feed) for info in self._inputs]  # keeps device inputs alive until done
            results = {}
            for info in self._outputs:
                shape = tuple(self._context.get_tensor_shape(info.name))
                if info.name in keep:
                    nbytes = int(np.prod(shape)) * np.dtype(info.dtype).itemsize
                    results[info.name] = DeviceBuffer(self._pool, self._pool.acquire(nbytes), shape, info.dtype)
                    ptr = results[info.name].ptr
                else:
                    ptr = self._scratch_buffer(info, shape).ptr
                    results[info.name] = (ptr, shape)
                self._context.set_tensor_address(info.name, ptr)
            if not self._context.execute_async_v3(self._stream.ptr):
                raise InputError("TensorRT failed to run the engine (see the TensorRT log above).")
            out = {}
            for name in names:
                value = results[name]
                if isinstance(value, DeviceBuffer):
                    out[name] = value
                    continue
                info = next(o for o in self._outputs if o.name == name)
                host = np.empty(value[1], dtype=info.dtype)
                if host.nbytes:
                    self._scratch[name].view(shape=(host.nbytes,)).copy_to(host.reshape(-1).view(np.uint8),
                                                                          self._stream)
                out[name] = host
            self._stream.synchronize()
            del held
            return out

    def _bind_input(self, info: TensorInfo, feed: dict):
        if info.name not in feed:
            raise InputError(f"Engine input {info.name!r} is missing from the feed (got {sorted(feed)}).")
        value = feed[info.name]
        if isinstance(value, DeviceBuffer):
            if value.dtype.name != info.dtype:
                raise InputError(f"Engine input {info.name!r} must be {info.dtype}, got a device buffer of "
                                 f"{value.dtype}.")
            shape, ptr = value.shape, value.ptr
        else:
            value = np.asarray(value, dtype=info.dtype, order="C")  # keeps a 0-d array 0-d
            shape, buffer = value.shape, self._scratch_buffer(info, value.shape)
            if value.nbytes:
                buffer.copy_from(value.reshape(-1).view(np.uint8), self._stream)
            ptr = buffer.ptr
        if len(shape) != len(info.shape):
            raise InputError(f"Engine input {info.name!r} must have {len(info.shape)} dims {info.shape}, got {shape}.")
        if not self._context.set_input_shape(info.name, shape):
            raise InputError(f"Engine input {info.name!r} has shape {shape}, outside the engine's optimization "
                             "profile. Rebuild the engine with a wider --profile.")
        self._context.set_tensor_address(info.name, ptr)
        return value

    def _scratch_buffer(self, info: TensorInfo, shape: tuple):
        """A byte buffer per tensor name, grown as needed; at least one byte, so that an empty tensor (a decoder's
        first step has no past) still gets a valid address."""
        nbytes = max(int(np.prod(shape)) * np.dtype(info.dtype).itemsize, 1)
        buffer = self._scratch.get(info.name)
        if buffer is None:
            buffer = self._scratch[info.name] = self._cuda.DeviceArray.raw((nbytes,))
        elif buffer.allocated_nbytes < nbytes:
            buffer.resize((nbytes,))
        return buffer

    def release(self) -> None:
        """Nothing to drop: kept outputs belong to the caller's handles, and the scratch buffers to the engine."""

    def close(self) -> None:
        with self._lock:
            for buffer in self._scratch.values():
                buffer.free()
            self._scratch.clear()
            self._pool.close()
            self._context = self._engine = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
