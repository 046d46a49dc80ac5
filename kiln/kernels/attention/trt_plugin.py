"""The Triton attention kernel as a TensorRT plugin: the ONNX node TensorRT's parser maps onto it, and its registration.

TensorRT's ONNX parser dispatches on the op type alone: an op type it has no importer for is looked up in the plugin
registry as (op type, ``plugin_version`` attribute or "1", ``plugin_namespace`` attribute, else the node's domain).
So the node is ``kiln.attention_kv`` (domain ``kiln``, op type ``attention_kv``) with ``plugin_namespace="kiln"``,
optionally ``aot`` (1: the ahead-of-time kernel, 0: the Python JIT one; TensorRT >= 10.9 reads it), and the
attributes ``register`` declares. A named domain also keeps onnx.checker and onnxruntime from taking it for a standard
op. Python plugins and their ONNX parsing need TensorRT >= 10.6, the AOT path >= 10.9.

The plugin is the kernel, nothing more: inputs ``query`` (B, H, T, D), ``key``/``value`` (B, Hkv, S, D), the whole
cache (past + new: the graph concatenates it, so the presents stay ordinary Concat outputs), and ``key_starts`` /
``key_lengths`` (B,) int32 (row b sees keys ``key_starts[b] <= j < key_lengths[b]``); output (B, H, T, D). The inputs
are laid out as :func:`kiln.kernels.attention.triton.attention_kernel` takes them (pointers, int32 scalars, output),
so the AOT path hands TensorRT that kernel's PTX as is. ``causal`` is bottom-right aligned, as in the spec.

:func:`plugin_node` and the helpers above :func:`register` are pure and need neither TensorRT nor torch.
"""

from __future__ import annotations

import importlib
import logging
import math
import types
import typing

if typing.TYPE_CHECKING:  # the plugin functions' annotations, resolved by _typed() when TensorRT is imported
    import tensorrt.plugin as trtp

log = logging.getLogger("kiln")

PLUGIN_NAMESPACE = "kiln"
PLUGIN_NAME = "attention_kv"
PLUGIN_ID = f"{PLUGIN_NAMESPACE}::{PLUGIN_NAME}"
DOMAIN = PLUGIN_NAMESPACE
INPUTS = ("query", "key", "value", "key_starts", "key_lengths")
OUTPUTS = ("output",)
MIN_TENSORRT = (10, 6)  # tensorrt.plugin register/impl and their ONNX parsing
MIN_TENSORRT_AOT = (10, 9)  # tensorrt.plugin.aot_impl
# Tactics TensorRT times at the profile's opt shape: query rows per program (16: decode, 64: prefill).
TACTICS = {1: 16, 2: 64}
_KERNEL_MODULE = "kiln.kernels.attention.triton"  # imported by name: it imports torch and triton


def tensorrt_version(version: str) -> tuple[int, int]:
    """``"10.9.0.34"`` -> (10, 9)."""
    try:
        major, minor = (int(part) for part in str(version).split(".")[:2])
    except ValueError:
        raise ValueError(f"not a TensorRT version: {version!r}") from None
    return major, minor


def supports_plugin(version: str) -> bool:
    return tensorrt_version(version) >= MIN_TENSORRT


def supports_aot(version: str) -> bool:
    return tensorrt_version(version) >= MIN_TENSORRT_AOT


def unsupported_head_dim(head_dim: int | None, value_head_dim: int | None) -> str | None:
    """Why the kernel cannot take these head dims (one tile spans a whole head), or None if it can."""
    if head_dim is None or value_head_dim is None:
        return "the head dim is not a static number"
    if value_head_dim != head_dim:
        return f"values have head dim {value_head_dim}, keys {head_dim}; the kernel needs them equal"
    if head_dim < 16 or head_dim > 256 or head_dim & (head_dim - 1):
        return f"head dim {head_dim} is not a power of two in [16, 256]"
    return None


def plugin_attributes(*, num_heads: int, kv_heads: int, scale: float, causal: bool = True) -> dict:
    """The attributes ``register`` declares, checked: ints for the heads and the causal flag, a float scale."""
    for name, value in (("num_heads", num_heads), ("kv_heads", kv_heads)):
        if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
            raise ValueError(f"{name} must be a positive integer, got {value!r}")
    if num_heads % kv_heads:
        raise ValueError(f"num_heads={num_heads} must be a multiple of kv_heads={kv_heads}")
    if not isinstance(scale, (int, float)) or not math.isfinite(scale) or scale <= 0:
        raise ValueError(f"scale must be a positive finite number, got {scale!r}")
    # ONNX has no bool attribute; TensorRT converts an int attribute to the plugin field, so causal is 0/1.
    return {"num_heads": num_heads, "kv_heads": kv_heads, "scale": float(scale), "causal": int(bool(causal))}


def node_attributes(*, num_heads: int, kv_heads: int, scale: float, causal: bool = True,
                    aot: bool | None = None) -> dict:
    """Every attribute of the ONNX node: the plugin's, ``plugin_namespace``, and ``aot`` when a choice is made."""
    attributes = plugin_attributes(num_heads=num_heads, kv_heads=kv_heads, scale=scale, causal=causal)
    attributes["plugin_namespace"] = PLUGIN_NAMESPACE
    if aot is not None:
        attributes["aot"] = int(bool(aot))
    return attributes


def plugin_node(inputs, outputs, *, num_heads: int, kv_heads: int, scale: float, causal: bool = True,
                aot: bool | None = None, name: str | None = None):
    """The ONNX ``NodeProto`` TensorRT's parser maps onto the kiln plugin. ``inputs``: 5 names in :data:`INPUTS`
    order; ``outputs``: 1 name. The model needs ``opset_import`` entry ``(DOMAIN, 1)``."""
    import onnx

    if len(inputs) != len(INPUTS) or len(outputs) != len(OUTPUTS):
        raise ValueError(f"the plugin takes inputs {INPUTS} and returns {OUTPUTS}; got {len(inputs)} input(s) and "
                         f"{len(outputs)} output(s)")
    attributes = node_attributes(num_heads=num_heads, kv_heads=kv_heads, scale=scale, causal=causal, aot=aot)
    return onnx.helper.make_node(PLUGIN_NAME, list(inputs), list(outputs), name=name, domain=DOMAIN, **attributes)


# ---------------------------------------------------------------------------------------------------------------------
# Registration with tensorrt.plugin. Everything below imports TensorRT, and torch/triton only inside the kernels.

_registered: str | None = None


def register() -> str:
    """Register ``kiln::attention_kv`` with TensorRT's plugin registry, once per process; returns ``"aot"`` when the
    ahead-of-time implementation is registered too (TensorRT >= 10.9), else ``"jit"``. Call it before parsing a
    lowered graph, and before deserializing an engine built with the JIT implementation (an AOT engine carries its
    kernel and needs no Python)."""
    global _registered
    if _registered is not None:
        return _registered
    import tensorrt as trt
    import tensorrt.plugin as trtp

    if not supports_plugin(trt.__version__):
        raise RuntimeError(f"TensorRT {trt.__version__} has no Python plugins; the kiln attention plugin needs "
                           f"TensorRT >= {'.'.join(map(str, MIN_TENSORRT))}.")
    names = {"trtp": trtp}
    trtp.register(PLUGIN_ID)(_typed(_describe, names))
    trtp.autotune(PLUGIN_ID)(_typed(_autotune, names))
    trtp.impl(PLUGIN_ID)(_typed(_impl, names))
    _registered = "jit"
    if supports_aot(trt.__version__):
        trtp.aot_impl(PLUGIN_ID)(_typed(_aot_impl, names))
        _registered = "aot"
    log.debug("registered TensorRT plugin %s (%s)", PLUGIN_ID, _registered)
    return _registered


def _typed(fn, names: dict):
    """A copy of ``fn`` whose annotations are resolved: tensorrt.plugin checks them as classes (``issubclass``), and
    this module's are strings (``from __future__ import annotations``). The original stays as written."""
    copy = types.FunctionType(fn.__code__, fn.__globals__, fn.__name__, fn.__defaults__, fn.__closure__)
    copy.__doc__, copy.__annotations__ = fn.__doc__, typing.get_type_hints(fn, globalns={**globals(), **names})
    return copy


def _describe(query: trtp.TensorDesc, key: trtp.TensorDesc, value: trtp.TensorDesc, key_starts: trtp.TensorDesc,
              key_lengths: trtp.TensorDesc, num_heads: int, kv_heads: int, scale: float,
              causal: int) -> tuple[trtp.TensorDesc]:
    return (query.like(),)  # (B, H, T, D) in q's dtype: the kernel needs Dv == D


def _autotune(query: trtp.TensorDesc, key: trtp.TensorDesc, value: trtp.TensorDesc, key_starts: trtp.TensorDesc,
              key_lengths: trtp.TensorDesc, outputs: tuple[trtp.TensorDesc]) -> list[trtp.AutoTuneCombination]:
    combination = trtp.AutoTuneCombination()
    combination.pos([0, 1, 2, 5], "FP32|FP16|BF16")  # q, k, v and the output share one float type
    combination.pos([3, 4], "INT32")
    combination.tactics(list(TACTICS))
    return [combination]


def _impl(query: trtp.Tensor, key: trtp.Tensor, value: trtp.Tensor, key_starts: trtp.Tensor,
          key_lengths: trtp.Tensor, scale: float, causal: int, outputs: tuple[trtp.Tensor], stream: int,
          tactic: int):
    """JIT: TensorRT calls this from Python at every enqueue; torch wraps its buffers without copies."""
    torch = importlib.import_module("torch")
    kernel = importlib.import_module(_KERNEL_MODULE)
    with torch.cuda.stream(torch.cuda.ExternalStream(stream)):
        q, k, v, starts, lengths, out = (_as_torch(torch, t)
                                         for t in (query, key, value, key_starts, key_lengths, outputs[0]))
        out.copy_(kernel.attention(q, k, v, causal=bool(causal), key_starts=starts, key_lengths=lengths, scale=scale,
                                   block_m=TACTICS.get(tactic)))


def _as_torch(torch, tensor):
    """A torch view of a plugin tensor, without a copy. tensorrt.plugin's ``__cuda_array_interface__`` refuses bf16,
    so a bf16 tensor is described as int16 (same bytes) and reinterpreted."""
    import tensorrt as trt

    if tensor.dtype != trt.bfloat16:
        return torch.as_tensor(tensor, device="cuda")
    interface = {"shape": tuple(tensor.shape), "typestr": "<i2", "data": (tensor.data_ptr, False), "version": 3,
                 "strides": tuple(2 * s for s in tensor.strides)}
    as_int16 = torch.as_tensor(types.SimpleNamespace(__cuda_array_interface__=interface), device="cuda")
    return as_int16.view(torch.bfloat16)


def _aot_impl(query: trtp.TensorDesc, key: trtp.TensorDesc, value: trtp.TensorDesc, key_starts: trtp.TensorDesc,
              key_lengths: trtp.TensorDesc, num_heads: int, scale: float, causal: int,
              outputs: tuple[trtp.TensorDesc], tactic: int
              ) -> tuple[str | bytes, str | bytes, trtp.KernelLaunchParams, trtp.SymIntExprs]:
    """AOT: compile the kernel to PTX for the build GPU; TensorRT bakes it into the engine with these launch
    parameters. The int32 scalars (T, S, H, Hkv) are shape expressions that TensorRT resolves at enqueue."""
    import tensorrt as trt

    head_dim = query.shape_expr[3].constant_value()
    dtype = {trt.float32: "fp32", trt.float16: "fp16", trt.bfloat16: "bf16"}[query.dtype]
    block_m = TACTICS.get(tactic, TACTICS[1])
    name, ptx, meta = compile_kernel(dtype, head_dim, scale=scale, causal=bool(causal), block_m=block_m)
    T, S, B = query.shape_expr[2], key.shape_expr[2], query.shape_expr[0]
    params = trtp.KernelLaunchParams()
    params.grid_x = trtp.cdiv(T, block_m)
    params.grid_y = B * num_heads
    params.block_x = meta["num_warps"] * 32
    params.shared_mem = meta["shared"]
    scalars = trtp.SymIntExprs.from_tuple([trtp.SymInt32(e) for e in (T, S, query.shape_expr[1], key.shape_expr[1])])
    return name.encode(), ptx.encode(), params, scalars


def compile_kernel(dtype: str, head_dim: int, *, scale: float, causal: bool, block_m: int, target=None):
    """Compile :func:`~kiln.kernels.attention.triton.attention_kernel` ahead of time -> (kernel name, PTX, metadata
    with ``num_warps`` and ``shared``). ``target``: a ``triton.backends.compiler.GPUTarget``; default the current GPU.
    Needs triton but no GPU when a target is given (and ``TRITON_INTERPRET`` is unset: the interpreter compiles
    nothing)."""
    triton = importlib.import_module("triton")
    kernel = importlib.import_module(_KERNEL_MODULE)
    pointer, block_n = f"*{dtype}", kernel.block_sizes(block_m, head_dim)[1]  # as the torch wrapper would pick
    signature = {"Q": pointer, "K": pointer, "V": pointer, "KeyStarts": "*i32", "KeyLengths": "*i32", "T": "i32",
                 "S": "i32", "H": "i32", "HKV": "i32", "Out": pointer}
    constants = {"QK_SCALE": float(scale) * kernel.LOG2E, "CAUSAL": bool(causal), "IEEE_FP32": dtype == "fp32",
                 "BLOCK_M": block_m, "BLOCK_N": block_n, "BLOCK_D": head_dim}
    signature.update(dict.fromkeys(constants, "constexpr"))
    source = triton.compiler.ASTSource(fn=kernel.attention_kernel, signature=signature,
                                       constexprs={(kernel.attention_kernel.arg_names.index(k),): v
                                                   for k, v in constants.items()})
    compiled = triton.compile(source, target=target)
    return compiled.metadata.name, compiled.asm["ptx"], {"num_warps": compiled.metadata.num_warps,
                                                          "shared": compiled.metadata.shared}
