"""The kiln TensorRT plugin: the ONNX node TensorRT's parser maps onto it (pure, tested here), the ahead-of-time
compile of the Triton kernel (needs triton, no GPU), and the registration itself (needs TensorRT: skipped without)."""

from __future__ import annotations

import inspect
import json
import os
import subprocess
import sys
import typing
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import onnx
import pytest
from onnx import helper

from kiln.kernels.attention import trt_plugin
from kiln.runtime.engines.tensorrt import TENSORRT_MISSING, tensorrt_version

ROOT = Path(__file__).resolve().parents[2]
ATTRS = dict(num_heads=8, kv_heads=2, scale=0.125)


def test_node_is_what_tensorrt_parser_looks_up():
    node = trt_plugin.plugin_node(["q", "k", "v", "starts", "lengths"], ["y"], **ATTRS, name="layer0")
    # TensorRT dispatches on the op type (= the plugin name) and finds the creator by plugin_namespace.
    assert (node.op_type, node.domain, node.name) == ("attention_kv", "kiln", "layer0")
    attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
    assert attrs == {"num_heads": 8, "kv_heads": 2, "scale": pytest.approx(0.125), "causal": 1,
                     "plugin_namespace": b"kiln"}
    kinds = {a.name: a.type for a in node.attribute}
    assert kinds["num_heads"] == kinds["causal"] == onnx.AttributeProto.INT
    assert kinds["scale"] == onnx.AttributeProto.FLOAT and kinds["plugin_namespace"] == onnx.AttributeProto.STRING
    assert list(node.input) == ["q", "k", "v", "starts", "lengths"] and list(node.output) == ["y"]
    assert trt_plugin.PLUGIN_ID == "kiln::attention_kv"


@pytest.mark.parametrize("aot, expected", [(None, None), (True, 1), (False, 0)])
def test_aot_attribute_is_an_int_and_only_there_when_chosen(aot, expected):
    node = trt_plugin.plugin_node(["q", "k", "v", "s", "l"], ["y"], **ATTRS, aot=aot)
    attrs = {a.name: a for a in node.attribute}
    if expected is None:
        assert "aot" not in attrs
    else:
        assert attrs["aot"].type == onnx.AttributeProto.INT and attrs["aot"].i == expected


def test_node_passes_the_onnx_checker_in_its_own_domain():
    f32, i32 = onnx.TensorProto.FLOAT, onnx.TensorProto.INT32
    inputs = [helper.make_tensor_value_info("q", f32, ["B", 8, "T", 64]),
              helper.make_tensor_value_info("k", f32, ["B", 2, "S", 64]),
              helper.make_tensor_value_info("v", f32, ["B", 2, "S", 64]),
              helper.make_tensor_value_info("s", i32, ["B"]), helper.make_tensor_value_info("l", i32, ["B"])]
    graph = helper.make_graph([trt_plugin.plugin_node(["q", "k", "v", "s", "l"], ["y"], **ATTRS, aot=True)], "g",
                              inputs, [helper.make_tensor_value_info("y", f32, ["B", 8, "T", 64])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 23),
                                                    helper.make_opsetid(trt_plugin.DOMAIN, 1)])
    onnx.checker.check_model(model)


@pytest.mark.parametrize("bad, match", [
    (dict(num_heads=8, kv_heads=3, scale=0.1), "multiple of kv_heads"),
    (dict(num_heads=0, kv_heads=1, scale=0.1), "num_heads must be a positive integer"),
    (dict(num_heads=True, kv_heads=1, scale=0.1), "num_heads must be a positive integer"),
    (dict(num_heads=4, kv_heads=2, scale=float("nan")), "scale must be a positive finite"),
    (dict(num_heads=4, kv_heads=2, scale=0.0), "scale must be a positive finite"),
])
def test_attributes_are_checked(bad, match):
    with pytest.raises(ValueError, match=match):
        trt_plugin.plugin_attributes(**bad)


def test_wrong_arity_is_refused():
    with pytest.raises(ValueError, match="takes inputs"):
        trt_plugin.plugin_node(["q", "k", "v", "mask", "past_key", "past_value"], ["y"], **ATTRS)


@pytest.mark.parametrize("version, plugin, aot", [("10.5.0", False, False), ("10.6.0.26", True, False),
                                                  ("10.9.0.34", True, True), ("10.14.1", True, True),
                                                  ("11.0.0", True, True)])
def test_version_gates(version, plugin, aot):
    assert trt_plugin.supports_plugin(version) is plugin
    assert trt_plugin.supports_aot(version) is aot


@pytest.mark.parametrize("d, dv, ok", [(64, 64, True), (16, 16, True), (256, 256, True), (8, 8, False),
                                       (96, 96, False), (512, 512, False), (64, 32, False), (None, 64, False)])
def test_head_dims_the_kernel_takes(d, dv, ok):
    assert (trt_plugin.unsupported_head_dim(d, dv) is None) is ok


def test_plugin_functions_reach_tensorrt_with_class_annotations():
    """tensorrt.plugin reads parameter annotations with issubclass and the return annotation with typing.get_origin;
    the functions are written with string annotations, so register() hands over resolved copies (a stand-in
    namespace for tensorrt.plugin here)."""
    fake = SimpleNamespace(**{name: type(name, (), {}) for name in (
        "TensorDesc", "Tensor", "KernelLaunchParams", "SymIntExprs", "AutoTuneCombination")})
    for fn in (trt_plugin._describe, trt_plugin._autotune, trt_plugin._impl, trt_plugin._aot_impl):
        typed = trt_plugin._typed(fn, {"trtp": fake})
        signature = inspect.signature(typed)
        assert all(not isinstance(p.annotation, str) for p in signature.parameters.values()), fn.__name__
        assert list(signature.parameters) == list(inspect.signature(fn).parameters)
        assert isinstance(inspect.signature(fn).parameters["query"].annotation, str)  # the original is untouched
    assert issubclass(inspect.signature(trt_plugin._typed(trt_plugin._describe, {"trtp": fake})).parameters[
        "key_lengths"].annotation, fake.TensorDesc)
    returned = inspect.signature(trt_plugin._typed(trt_plugin._aot_impl, {"trtp": fake})).return_annotation
    assert typing.get_origin(returned) is tuple and typing.get_args(returned)[2] is fake.KernelLaunchParams
    # tensorrt.plugin wants an impl without a return annotation (or None): NoneType would be refused
    assert inspect.signature(trt_plugin._impl).return_annotation is inspect.Parameter.empty
    # the JIT impl takes the attributes it uses, in registration order, then outputs, stream, tactic
    impl_args = list(inspect.signature(trt_plugin._impl).parameters)[5:]
    assert impl_args == ["scale", "causal", "outputs", "stream", "tactic"]
    assert list(inspect.signature(trt_plugin._aot_impl).parameters)[5:] == ["num_heads", "scale", "causal", "outputs",
                                                                            "tactic"]


def test_kernel_compiles_ahead_of_time_to_ptx_without_a_gpu():
    """The AOT step: PTX for sm_90 with the plugin's argument layout (5 pointers, 4 int32, the output, then Triton's
    two scratch pointers, for which TensorRT passes null). Triton only compiles outside its interpreter, and it
    decides at import: a fresh process without TRITON_INTERPRET."""
    pytest.importorskip("triton")
    code = """
import json
from triton.backends.compiler import GPUTarget
from kiln.kernels.attention.trt_plugin import compile_kernel
name, ptx, meta = compile_kernel("fp16", 64, scale=0.125, causal=True, block_m=16, target=GPUTarget("cuda", 90, 32))
params = [l.split()[-1].rstrip(",") for l in ptx.splitlines() if l.strip().startswith(".param")]
print(json.dumps({"name": name, "params": params, "meta": meta, "entry": ".entry " + name in ptx}))
"""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert out["name"] == "attention_kernel" and out["entry"]
    kinds = [p for p in out["params"]]
    assert len(kinds) == 12  # Q K V KeyStarts KeyLengths | T S H HKV | Out | two scratch pointers
    assert out["meta"]["num_warps"] > 0 and out["meta"]["shared"] >= 0


needs_tensorrt = pytest.mark.skipif(tensorrt_version() is None, reason=TENSORRT_MISSING)


@needs_tensorrt
@pytest.mark.gpu
def test_registration_puts_the_creator_in_tensorrts_registry():
    import tensorrt as trt

    mode = trt_plugin.register()
    assert trt_plugin.register() == mode  # once per process
    assert mode == ("aot" if trt_plugin.supports_aot(trt.__version__) else "jit")
    creator = trt.get_plugin_registry().get_creator(trt_plugin.PLUGIN_NAME, "1", trt_plugin.PLUGIN_NAMESPACE)
    assert creator is not None


@needs_tensorrt
@pytest.mark.gpu
@pytest.mark.parametrize("aot", [False, True])
def test_plugin_matches_the_reference_inside_an_engine(tmp_path, aot):
    """A one-node ONNX graph through TensorRT's parser, built and run: the plugin equals the NumPy spec."""
    import tensorrt as trt
    from polygraphy.backend.trt import CreateConfig, EngineFromNetwork, NetworkFromOnnxPath, Profile, TrtRunner

    from kiln.kernels.attention.reference import attention

    if aot and not trt_plugin.supports_aot(trt.__version__):
        pytest.skip(f"TensorRT {trt.__version__} has no AOT plugins (>= 10.9)")
    trt_plugin.register()
    B, H, Hkv, T, S, D = 2, 4, 2, 5, 9, 64
    f32, i32 = onnx.TensorProto.FLOAT, onnx.TensorProto.INT32
    inputs = [helper.make_tensor_value_info("q", f32, ["B", H, "T", D]),
              helper.make_tensor_value_info("k", f32, ["B", Hkv, "S", D]),
              helper.make_tensor_value_info("v", f32, ["B", Hkv, "S", D]),
              helper.make_tensor_value_info("s", i32, ["B"]), helper.make_tensor_value_info("l", i32, ["B"])]
    node = trt_plugin.plugin_node(["q", "k", "v", "s", "l"], ["y"], num_heads=H, kv_heads=Hkv, scale=D ** -0.5,
                                  aot=aot if trt_plugin.supports_aot(trt.__version__) else None)
    graph = helper.make_graph([node], "g", inputs, [helper.make_tensor_value_info("y", f32, ["B", H, "T", D])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 23), helper.make_opsetid("kiln", 1)])
    onnx.save(model, tmp_path / "one.onnx")
    profile = Profile()
    for name, shape in {"q": (B, H, T, D), "k": (B, Hkv, S, D), "v": (B, Hkv, S, D), "s": (B,), "l": (B,)}.items():
        profile.add(name, min=shape, opt=shape, max=shape)
    build = EngineFromNetwork(NetworkFromOnnxPath(str(tmp_path / "one.onnx"), strongly_typed=True),
                              config=CreateConfig(profiles=[profile]))
    rng = np.random.default_rng(0)
    q, k, v = (rng.standard_normal(s).astype(np.float32) for s in ((B, H, T, D), (B, Hkv, S, D), (B, Hkv, S, D)))
    starts, lengths = np.array([0, 3], np.int32), np.array([S, S], np.int32)
    with TrtRunner(build) as runner:
        y = runner.infer({"q": q, "k": k, "v": v, "s": starts, "l": lengths})["y"]
    mask = (np.arange(S)[None, :] >= starts[:, None]) & (np.arange(S)[None, :] < lengths[:, None])
    expected = attention(q, k, v, mask=mask, causal=True, scale=D ** -0.5).out
    np.testing.assert_allclose(y, expected, atol=1e-4, rtol=1e-4)
