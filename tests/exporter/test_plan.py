"""The export plan (kiln/exporter/plan.py) decides without tracing anything: every combination of family kind, task,
precision, attention form and target -> its passes, and the passes' results -> what kiln.json records."""

from __future__ import annotations

import itertools
import sys
from types import SimpleNamespace

import pytest

from kiln.errors import ExportError, InputError
from kiln.exporter import passes
from kiln.exporter.plan import FORMS, PRECISIONS, TARGETS, ExportPlan, Step, tensorrt_passes

ENCODER_TASKS = ("feature-extraction", "text-classification", "token-classification", "question-answering",
                 "fill-mask", "image-classification")
DECODER = ["rotary", "decoder-attention-3d", "pack-projections", "cache-in-place", "logits-to-keep"]


def names(steps) -> list[str]:
    return [s.name for s in steps]


def result(rewritten=0, modified=None, optional=None):
    return SimpleNamespace(rewritten=rewritten, modified=bool(rewritten) if modified is None else modified,
                           details={"optional_input": optional} if optional else {})


def test_the_plan_imports_neither_torch_nor_onnx():
    import subprocess

    code = ("import sys, kiln.exporter.plan, kiln.exporter.passes; "
            "print(sorted(m for m in ('torch', 'onnx', 'onnx_ir', 'onnxruntime') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


@pytest.mark.parametrize("precision", PRECISIONS)
@pytest.mark.parametrize("attention", ("auto", *FORMS))
def test_encoder_plans(precision, attention):
    plan = ExportPlan("encoder", precision, attention)
    gpu = precision in ("fp16", "bf16")
    assert plan.target == ("onnxruntime-cuda" if gpu else "onnxruntime-cpu")
    want = {"fp32": "onnx-3d", "int8": "onnx-3d"}.get(precision, "onnx") if attention == "auto" else attention
    assert plan.form == want
    steps = plan.passes()
    assert names(steps) == ([] if want == "onnx" else ["encoder-attention"])
    assert all(s.options == {"form": want} for s in steps)
    assert plan.passes("decomposed") == ()  # tf2onnx's graphs: no fused node to put in another form


@pytest.mark.parametrize("precision", PRECISIONS)
@pytest.mark.parametrize("attention", ("auto", *FORMS))
def test_decoder_plans(precision, attention):
    plan = ExportPlan("decoder", precision, attention)
    fused = attention != "onnx" and precision not in ("fp16", "bf16")
    assert plan.form == ("onnx-3d" if fused else "onnx")
    assert names(plan.passes()) == (DECODER if fused else ["logits-to-keep"])
    assert names(plan.passes("decomposed")) == names(plan.passes())  # rotary and packing find their own patterns


def test_every_plan_names_registered_passes():
    seen = set()
    for kind, precision, attention, target in itertools.product(("encoder", "decoder"), PRECISIONS, ("auto", *FORMS),
                                                                TARGETS):
        plan = ExportPlan(kind, precision, attention, target=target)
        seen |= set(names(plan.passes()))
    for form, precision in itertools.product(FORMS[:3] + ("decomposed",), ("fp32", "fp16", "bf16")):
        seen |= set(names(tensorrt_passes(form, precision if precision != "fp32" else None)))
    assert seen <= set(passes.PASSES)


def test_what_kiln_json_records():
    encoder = ExportPlan("encoder")
    assert encoder.attention_record("onnx-attention", {"encoder-attention": result(6)}) == \
        {"form": "onnx-3d", "rotary_nodes": 0}
    # No layer had the traced pattern: the graph is in the traced form.
    assert encoder.attention_record("onnx-attention", {"encoder-attention": result(0)})["form"] == "onnx"
    assert encoder.attention_record("decomposed", {})["form"] == "decomposed"
    assert ExportPlan("encoder", "fp16").attention_record("onnx-attention", {})["form"] == "onnx"
    decoder = ExportPlan("decoder", "int4")
    kept = {"name": "logits_to_keep", "dtype": "int64", "shape": [], "default": 0}
    done = {"rotary": result(60), "decoder-attention-3d": result(30), "cache-in-place": result(1),
            "logits-to-keep": result(1, optional=kept)}
    assert decoder.attention_record("onnx-attention", done) == {"form": "onnx-3d", "rotary_nodes": 60,
                                                                "cache": "in-place"}
    assert decoder.optional_inputs(done) == [kept]
    gpt2 = {"rotary": result(0), "decoder-attention-3d": result(0), "logits-to-keep": result(1)}
    assert decoder.attention_record("onnx-attention", gpt2) == {"form": "onnx", "rotary_nodes": 0, "cache": "concat"}
    assert encoder.optional_inputs({}) == []


def test_a_head_mask_input_gets_its_default_last():
    for kind in ("encoder", "decoder"):
        plan = ExportPlan(kind, defaults=("head_mask",))
        assert plan.passes()[-1] == Step("optional-input", {"name": "head_mask"})
        assert plan.passes("decomposed")[-1].name == "optional-input"
    assert names(ExportPlan("encoder", attention="onnx", defaults=("head_mask",)).passes()) == \
        ["optional-input"]


def test_tensorrt_plans():
    assert names(tensorrt_passes("onnx-3d", "fp16")) == ["to-4d", "unfuse-rotary", "lower-attention", "half"]
    assert tensorrt_passes("onnx", "bf16")[-1].options == {"precision": "bf16"}
    assert names(tensorrt_passes("onnx")) == ["unfuse-rotary", "lower-attention"]  # fp32, or typed at export
    assert names(tensorrt_passes("decomposed")) == ["unfuse-rotary", "lower-attention"]
    for form in ("contrib", "contrib-mha"):
        with pytest.raises(ExportError, match="Re-export with --attention onnx"):
            tensorrt_passes(form)
    assert names(tensorrt_passes("onnx-3d", cache="in-place")) == ["cache-concat", "to-4d", "unfuse-rotary",
                                                                    "lower-attention"]


def test_bad_options_name_the_choices():
    with pytest.raises(InputError, match="--precision 'fp8' is not supported.*fp32, fp16, bf16, int8, int4"):
        ExportPlan("encoder", "fp8")
    with pytest.raises(InputError, match="--attention 'fused': choose auto or one of onnx, onnx-3d"):
        ExportPlan("encoder", attention="fused")
    with pytest.raises(InputError, match="target 'tpu'"):
        ExportPlan("encoder", target="tpu")
