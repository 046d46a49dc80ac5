"""kiln triton: the Triton model repository written for an artifact.

No Triton server runs here, so the repository is checked the two ways that need none: every config.pbtxt is parsed
with tritonclient's own protobuf types (and the fields, the ensemble's wiring and the tensors' types and shapes are
checked against it), and the Python-backend models run in this process with a stand-in for Triton's
``triton_python_backend_utils``, chained with the ONNX graph in onnxruntime as the ensemble's steps say, against
``kiln.pipeline`` on the same texts.
"""

from __future__ import annotations

import importlib.util
import inspect
import json
import shutil
import sys
import types

import numpy as np
import pytest

from conftest import assert_same

pytest.importorskip("tritonclient.grpc", reason="pip install 'tritonclient[grpc]' for Triton's config types")
from google.protobuf import json_format, text_format  # noqa: E402
from tritonclient.grpc import model_config_pb2  # noqa: E402

from kiln.errors import InputError  # noqa: E402
from kiln.serve.triton import repository, write_repository  # noqa: E402

TEXTS = ["the movie was great", "terrible film, i hate it", "Hello, world! I love Paris. 3.14 is pi?",
         "héllo wörld, ça va", " ".join(["paris is the capital of france"] * 20)]  # the last is cut to 64 tokens
# triton_python_backend_utils.TRITON_STRING_TO_NUMPY (the unsigned types left out)
NUMPY = {"TYPE_BOOL": np.bool_, "TYPE_INT8": np.int8, "TYPE_INT16": np.int16, "TYPE_INT32": np.int32,
         "TYPE_INT64": np.int64, "TYPE_FP16": np.float16, "TYPE_FP32": np.float32, "TYPE_FP64": np.float64,
         "TYPE_STRING": np.object_}


def parse(text: str):
    return text_format.Parse(text, model_config_pb2.ModelConfig())


def configs(files: dict) -> dict:
    """{model name: parsed ModelConfig} of a repository's files."""
    return {path.split("/")[0]: parse(text) for path, text in files.items() if path.endswith("/config.pbtxt")}


def dtype_name(value: int) -> str:
    return model_config_pb2.DataType.Name(value)


def copy_artifact(source, target, **changes):
    """A copy of an artifact with kiln.json entries changed (None removes one)."""
    from kiln.artifact import load_manifest, write_manifest

    shutil.copytree(source, target)
    manifest = load_manifest(target)
    for key, value in changes.items():
        if value is None:
            manifest.pop(key, None)
        else:
            manifest[key] = value
    write_manifest(target, manifest)
    return target


# ------------------------------------------------------------------------------------------------- the configs


@pytest.mark.parametrize("task", ["feature-extraction", "text-classification"])
def test_every_config_parses_and_round_trips(artifacts, task):
    files = repository(artifacts("bert", task))  # named after the artifact's directory
    parsed = configs(files)
    name = f"bert-{task}"
    assert sorted(parsed) == sorted([name, f"{name}_model", f"{name}_preprocess", f"{name}_postprocess"])
    for name, config in parsed.items():
        assert config.name == name  # Triton requires the config's name to be its directory's
        again = parse(text_format.MessageToString(config))
        assert again == config
        assert json_format.Parse(json_format.MessageToJson(config), model_config_pb2.ModelConfig()) == config


def test_model_config_follows_kiln_json(artifacts):
    out = artifacts("bert", "feature-extraction")
    manifest = json.loads((out / "kiln.json").read_text())
    config = configs(repository(out, name="fe", instances=3, kind="KIND_GPU", max_queue_delay_us=250))["fe_model"]
    assert config.platform == "onnxruntime_onnx"
    assert config.max_batch_size == manifest["dynamic_axes"]["batch"]["max"] == 8
    assert [(i.name, dtype_name(i.data_type), list(i.dims)) for i in config.input] == [
        (name, "TYPE_INT64", [-1]) for name in ("input_ids", "attention_mask", "token_type_ids")]
    assert [(o.name, dtype_name(o.data_type), list(o.dims)) for o in config.output] == [
        ("last_hidden_state", "TYPE_FP32", [-1, 32]), ("pooler_output", "TYPE_FP32", [32])]
    assert list(config.dynamic_batching.preferred_batch_size) == [2, 4, 8]
    assert config.dynamic_batching.max_queue_delay_microseconds == 250
    [group] = config.instance_group
    assert group.count == 3 and group.kind == model_config_pb2.ModelInstanceGroup.KIND_GPU
    for python in ("fe_preprocess", "fe_postprocess"):  # tokenizing stays on the CPU
        config = configs(repository(out, name="fe", instances=3, kind="KIND_GPU"))[python]
        assert config.backend == "python"
        assert [(g.count, g.kind) for g in config.instance_group] == [(3, model_config_pb2.ModelInstanceGroup.KIND_CPU)]


def test_max_batch_size(artifacts):
    out = artifacts("bert", "text-classification")
    small = configs(repository(out, name="tc", max_batch_size=4))
    assert {c.max_batch_size for c in small.values()} == {4}  # an ensemble batches no more than its models
    assert list(small["tc_model"].dynamic_batching.preferred_batch_size) == [2, 4]
    assert list(configs(repository(out, name="tc", max_batch_size=6))["tc_model"]
                .dynamic_batching.preferred_batch_size) == [2, 4, 6]
    off = configs(repository(out, name="tc", max_batch_size=0))
    model = off["tc_model"]
    assert model.max_batch_size == 0 and not model.HasField("dynamic_batching")
    assert [list(i.dims) for i in model.input] == [[-1, -1]] * 3  # the batch axis is in the dims now
    assert [list(o.dims) for o in off["tc"].output] == [[-1, 3], [-1, 1]]
    assert list(off["tc"].input[0].dims) == [-1, 1]
    with pytest.raises(InputError, match="at most 8"):
        repository(out, max_batch_size=9)
    with pytest.raises(InputError, match="non-negative"):
        repository(out, max_batch_size=-1)


def test_options_are_checked(artifacts):
    out = artifacts("bert", "text-classification")
    for options, message in [({"kind": "KIND_TPU"}, "KIND_CPU"), ({"instances": 0}, "instances"),
                             ({"name": "a/b"}, "Triton model"), ({"precision": "fp16"}, "tensorrt=True"),
                             ({"tensorrt": True}, "KIND_GPU"), ({"pad_to_multiple_of": 0}, "pad_to_multiple_of"),
                             ({"max_queue_delay_us": -1}, "max_queue_delay_us")]:
        with pytest.raises(InputError, match=message):
            repository(out, **options)
    assert "classifier_model/config.pbtxt" in repository(out, name="classifier")


@pytest.mark.parametrize("task", ["feature-extraction", "text-classification"])
@pytest.mark.parametrize("max_batch_size", [8, 0])
def test_ensemble_wiring(artifacts, task, max_batch_size):
    """Each step names a model of the repository, maps only that model's inputs and outputs, reads tensors that the
    ensemble's input or an earlier step produced with the same type and shape, and every ensemble output is produced
    exactly once: the checks Triton makes when it loads an ensemble."""
    parsed = configs(repository(artifacts("bert", task), name="e", max_batch_size=max_batch_size))
    ensemble = parsed["e"]
    assert ensemble.platform == "ensemble"
    assert [(i.name, dtype_name(i.data_type)) for i in ensemble.input] == [("TEXT", "TYPE_STRING")]
    tensors = {i.name: (i.data_type, list(i.dims)) for i in ensemble.input}
    produced = []
    for step in ensemble.ensemble_scheduling.step:
        model = parsed[step.model_name]
        assert model.max_batch_size == ensemble.max_batch_size
        inputs = {i.name: (i.data_type, list(i.dims)) for i in model.input}
        outputs = {o.name: (o.data_type, list(o.dims)) for o in model.output}
        assert set(step.input_map) == set(inputs), step.model_name  # every input of the model is fed
        for model_input, tensor in step.input_map.items():
            assert tensor in tensors, f"{step.model_name} reads {tensor}, which nothing produced"
            assert compatible(tensors[tensor], inputs[model_input]), (step.model_name, model_input)
        for model_output, tensor in step.output_map.items():
            assert model_output in outputs and tensor not in tensors, (step.model_name, model_output)
            tensors[tensor] = outputs[model_output]
            produced.append(tensor)
    for output in ensemble.output:
        assert produced.count(output.name) == 1
        assert compatible(tensors[output.name], (output.data_type, list(output.dims)))


def compatible(a, b) -> bool:
    """Same type, same rank, and every dimension equal unless one is -1 (variable)."""
    (type_a, dims_a), (type_b, dims_b) = a, b
    return type_a == type_b and len(dims_a) == len(dims_b) and all(
        x == y or -1 in (x, y) for x, y in zip(dims_a, dims_b))


# ------------------------------------------------------------------------------------------- the Python models


def fake_triton_utils():
    """The part of Triton's ``triton_python_backend_utils`` that kiln's models use, for running them here."""
    pb = types.ModuleType("triton_python_backend_utils")

    class Tensor:
        def __init__(self, name, array):
            self._name, self._array = name, np.asarray(array)

        def name(self):
            return self._name

        def as_numpy(self):
            return self._array

    class TritonError:
        def __init__(self, message):
            self._message = message

        def message(self):
            return self._message

    class InferenceRequest:  # what Triton hands execute(): the request's input tensors
        def __init__(self, inputs):
            self._inputs = inputs

        def inputs(self):
            return self._inputs

    class InferenceResponse:
        def __init__(self, output_tensors=(), error=None):
            self._outputs, self._error = list(output_tensors), error

        def output_tensors(self):
            return self._outputs

        def has_error(self):
            return self._error is not None

        def error(self):
            return self._error

    def get_input_tensor_by_name(request, name):
        return next((t for t in request.inputs() if t.name() == name), None)

    def get_output_tensor_by_name(response, name):
        return next((t for t in response.output_tensors() if t.name() == name), None)

    def get_output_config_by_name(config, name):
        return next((o for o in config["output"] if o["name"] == name), None)

    def triton_string_to_numpy(name):
        return NUMPY[name]

    for value in (Tensor, TritonError, InferenceRequest, InferenceResponse, get_input_tensor_by_name,
                  get_output_tensor_by_name, get_output_config_by_name, triton_string_to_numpy):
        setattr(pb, value.__name__, value)
    return pb


@pytest.fixture
def pb_utils(monkeypatch):
    pb = fake_triton_utils()
    monkeypatch.setitem(sys.modules, "triton_python_backend_utils", pb)
    return pb


def load_python_model(repo, name: str):
    """``repo/name/1/model.py`` initialized as Triton's Python backend does: with the config as JSON (proto field
    names, as Triton passes it) and the model's directory and version."""
    path = repo / name / "1" / "model.py"
    spec = importlib.util.spec_from_file_location(f"triton_model_{name.replace('-', '_')}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    config = parse((repo / name / "config.pbtxt").read_text())
    model = module.TritonPythonModel()
    model.initialize({"model_config": json_format.MessageToJson(config, preserving_proto_field_name=True),
                      "model_repository": str(repo / name), "model_version": "1", "model_name": name,
                      "model_instance_kind": "CPU", "model_instance_name": f"{name}_0"})
    return model, config


def check_tensor(array, spec, max_batch_size: int):
    """What Triton checks of a tensor against a config entry: its type and its shape (the batch axis first when the
    model batches)."""
    assert array.dtype == NUMPY[dtype_name(spec.data_type)], (spec.name, array.dtype)
    dims = ([-1] if max_batch_size else []) + list(spec.dims)
    assert compatible((0, list(array.shape)), (0, dims)), (spec.name, array.shape, dims)
    if max_batch_size:
        assert 1 <= array.shape[0] <= max_batch_size


def run_ensemble(repo, name: str, requests: list[list[str]], pb) -> list[dict]:
    """The ensemble's steps run here for a list of requests (each a list of texts): Python models through their
    ``execute`` (all requests in one call, as Triton may), the ONNX model in onnxruntime; every tensor checked against
    the config that receives or produces it."""
    import onnxruntime as ort

    ensemble = parse((repo / name / "config.pbtxt").read_text())
    states = [{"TEXT": np.array([[t.encode()] for t in texts], dtype=object)} for texts in requests]
    for state in states:
        check_tensor(state["TEXT"], ensemble.input[0], ensemble.max_batch_size)
    for step in ensemble.ensemble_scheduling.step:
        feeds = [{model_input: state[tensor] for model_input, tensor in step.input_map.items()} for state in states]
        if (repo / step.model_name / "1" / "model.py").is_file():
            model, config = load_python_model(repo, step.model_name)
            requests_in = [pb.InferenceRequest([pb.Tensor(k, v) for k, v in feed.items()]) for feed in feeds]
            responses = model.execute(requests_in)
            assert len(responses) == len(requests_in)
            for response in responses:
                assert not response.has_error(), response.error().message()
            results = [{t.name(): t.as_numpy() for t in r.output_tensors()} for r in responses]
        else:
            config = parse((repo / step.model_name / "config.pbtxt").read_text())
            session = ort.InferenceSession(str(repo / step.model_name / "1" / "model.onnx"))
            names = [o.name for o in session.get_outputs()]
            results = [dict(zip(names, session.run(None, feed))) for feed in feeds]
        for feed, result in zip(feeds, results):
            for spec in config.input:
                check_tensor(feed[spec.name], spec, config.max_batch_size)
            for spec in config.output:
                check_tensor(result[spec.name], spec, config.max_batch_size)
        for state, result in zip(states, results):
            state.update({tensor: result[model_output] for model_output, tensor in step.output_map.items()})
    for state in states:
        for spec in ensemble.output:
            check_tensor(state[spec.name], spec, ensemble.max_batch_size)
    return [{spec.name: state[spec.name] for spec in ensemble.output} for state in states]


@pytest.mark.parametrize("multiple", [1, 16])
def test_feature_extraction_chain_equals_pipeline(artifacts, tmp_path, pb_utils, multiple):
    import kiln

    out = artifacts("bert", "feature-extraction")
    write_repository(out, tmp_path / "repo", name="minilm", pad_to_multiple_of=multiple)
    got = run_ensemble(tmp_path / "repo", "minilm", [TEXTS[:2], TEXTS[2:]], pb_utils)
    embeddings = np.concatenate([r["EMBEDDING"] for r in got])
    expected = np.array(kiln.pipeline("feature-extraction", out)(TEXTS, pooling="mean", normalize=True))
    np.testing.assert_allclose(embeddings, expected, atol=1e-5)
    np.testing.assert_allclose(np.linalg.norm(embeddings, axis=-1), 1.0, atol=1e-5)


@pytest.mark.parametrize("multiple", [1, 16])
def test_text_classification_chain_equals_pipeline(artifacts, tmp_path, pb_utils, multiple):
    import kiln

    out = artifacts("bert", "text-classification")
    write_repository(out, tmp_path / "repo", name="sentiment", pad_to_multiple_of=multiple)
    got = run_ensemble(tmp_path / "repo", "sentiment", [TEXTS[:3], TEXTS[3:]], pb_utils)
    ranked = [json.loads(row[0]) for r in got for row in r["LABELS"]]
    expected = kiln.pipeline("text-classification", out)(TEXTS, top_k=None)
    assert_same(ranked, expected, atol=1e-5)
    scores = np.concatenate([r["SCORES"] for r in got])  # (B, labels) in label-id order
    labels = json.loads((tmp_path / "repo/sentiment_postprocess/1/postprocess.json").read_text())["labels"]
    assert labels == ["NEGATIVE", "NEUTRAL", "POSITIVE"]
    for row, answer in zip(scores, expected):
        by_label = {d["label"]: d["score"] for d in answer}
        np.testing.assert_allclose(row, [by_label[label] for label in labels], atol=1e-5)


def test_preprocess_truncates_pads_and_refuses_bad_text(artifacts, tmp_path, pb_utils):
    out = artifacts("bert", "text-classification")
    write_repository(out, tmp_path / "repo", name="m", pad_to_multiple_of=16)
    model, _ = load_python_model(tmp_path / "repo", "m_preprocess")
    good = pb_utils.InferenceRequest([pb_utils.Tensor("TEXT", np.array([[b"hello"], [TEXTS[-1].encode()]],
                                                                       dtype=object))])
    short = pb_utils.InferenceRequest([pb_utils.Tensor("TEXT", np.array([[b"hello world"]], dtype=object))])
    bad = pb_utils.InferenceRequest([pb_utils.Tensor("TEXT", np.array([[b"\xff\xfe"]], dtype=object))])
    responses = model.execute([good, bad, short])
    ids = pb_utils.get_output_tensor_by_name(responses[0], "input_ids").as_numpy()
    assert ids.shape == (2, 64)  # the long text cut to the model's 64 tokens, not padded past them
    assert responses[1].has_error() and "not valid UTF-8" in responses[1].error().message()
    mask = pb_utils.get_output_tensor_by_name(responses[2], "attention_mask").as_numpy()
    assert mask.shape == (1, 16) and mask.sum() == 4  # [CLS] hello world [SEP], padded to the multiple


def test_python_models_compile_and_copies_are_in_step():
    from kiln.runtime import scores
    from kiln.serve.triton import MODELS_SOURCE

    for name in ("preprocess.py", "postprocess.py"):
        compile((MODELS_SOURCE / name).read_text(), name, "exec")
    source = (MODELS_SOURCE / "postprocess.py").read_text()
    for function in (scores.softmax, scores.sigmoid):  # "# Copied from kiln.runtime.scores.<name>"
        assert f"# Copied from kiln.runtime.scores.{function.__name__}\n" + inspect.getsource(function) in source


# ------------------------------------------------------------------------------------------ what is written


def test_tensorrt_plan(artifacts, tmp_path):
    out = artifacts("bert", "feature-extraction")
    plan = tmp_path / "engine.plan"
    entry = {"key": "0123456789abcdef01234567", "file": "engines/0123456789abcdef01234567.plan",
             "precision": "fp16", "axes": {"batch": [1, 4, 4], "sequence": [1, 32, 48]}, "tensorrt": "10.14.1",
             "compute_capability": "9.0", "version_compatible": False, "plugin": None}
    copy = copy_artifact(out, tmp_path / "artifact", engines=[dict(entry, precision="fp32", key="ff" * 12,
                                                                  file="engines/gone.plan"), entry])
    (copy / "engines").mkdir()
    plan = copy / entry["file"]
    plan.write_bytes(b"not really a plan")
    files = repository(copy, tensorrt=True, kind="KIND_GPU")
    assert files["artifact_model/1/model.plan"] == plan and "artifact_model/1/model.onnx" not in files
    parsed = configs(files)
    model = parsed["artifact_model"]
    assert model.platform == "tensorrt_plan" and model.max_batch_size == 4  # the plan's profile, not the artifact's
    assert [g.kind for g in model.instance_group] == [model_config_pb2.ModelInstanceGroup.KIND_GPU]
    assert {c.max_batch_size for c in parsed.values()} == {4}
    assert "TensorRT 10.14.1" in files["artifact_model/config.pbtxt"].splitlines()[1]
    assert "compute capability 9.0" in files["artifact_model/README.md"]
    preprocess = parsed["artifact_preprocess"]
    assert preprocess.parameters["max_length"].string_value == "48"  # the profile's longest sequence
    with pytest.raises(InputError, match="no fp32 TensorRT engine|plan is missing"):
        repository(copy, tensorrt=True, kind="KIND_GPU", precision="fp32")
    with pytest.raises(InputError, match="bf16"):
        repository(copy, tensorrt=True, kind="KIND_GPU", precision="bf16")
    with pytest.raises(InputError, match="no TensorRT engine"):
        repository(out, tensorrt=True, kind="KIND_GPU")
    plugged = copy_artifact(copy, tmp_path / "plugged", engines=[dict(entry, plugin="aot")])
    with pytest.raises(InputError, match="plugin"):
        repository(plugged, tensorrt=True, kind="KIND_GPU")


def test_external_weights_go_in_a_model_directory(artifacts, tmp_path):
    copy = copy_artifact(artifacts("bert", "text-classification"), tmp_path / "big")
    (copy / "model.onnx.data").write_bytes(b"weights")
    files = repository(copy)
    assert files["big_model/1/model.onnx/model.onnx"] == copy / "model.onnx"
    assert files["big_model/1/model.onnx/model.onnx.data"] == copy / "model.onnx.data"


def test_other_tasks_and_unsupported_artifacts(artifacts, tmp_path):
    out = artifacts("bert", "text-classification")
    tokens = repository(copy_artifact(out, tmp_path / "ner", task="token-classification"))
    assert sorted(configs(tokens)) == ["ner_model", "ner_preprocess"]  # tokenization, but no ensemble
    assert "ner_preprocess" in tokens["ner_model/README.md"] and "feature-extraction" in tokens["ner_model/README.md"]
    assert sorted(configs(repository(copy_artifact(out, tmp_path / "qa", task="question-answering")))) == ["qa_model"]
    decoder = copy_artifact(out, tmp_path / "llm", task="text-generation")
    with pytest.raises(InputError, match="decoder.*Supported: one-graph encoder"):
        repository(decoder)
    whisper = copy_artifact(out, tmp_path / "asr", task="automatic-speech-recognition",
                            encoder={"model": "encoder.onnx"})
    with pytest.raises(InputError, match="several graphs"):
        repository(whisper)


def test_write_repository(artifacts, tmp_path):
    out = artifacts("bert", "text-classification")
    repo = tmp_path / "repo"
    (repo / "someone_else").mkdir(parents=True)
    written = write_repository(out, repo, name="clf")
    assert [p.rsplit("/", 1)[1] for p in written] == ["clf_model", "clf_preprocess", "clf_postprocess", "clf"]
    assert (repo / "clf_model/1/model.onnx").read_bytes() == (out / "model.onnx").read_bytes()
    assert (repo / "clf_preprocess/1/tokenizer.json").read_bytes() == (out / "tokenizer.json").read_bytes()
    assert (repo / "clf/1").is_dir() and (repo / "someone_else").is_dir()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["repo"]  # no staging directory left behind
    with pytest.raises(InputError, match="already holds clf_model.*--force"):
        write_repository(out, repo, name="clf")
    (repo / "clf_model" / "stale.txt").write_text("old")
    write_repository(out, repo, name="clf", force=True, max_batch_size=2)
    assert not (repo / "clf_model" / "stale.txt").exists()
    assert parse((repo / "clf_model/config.pbtxt").read_text()).max_batch_size == 2


def test_cli(artifacts, tmp_path, capsys):
    from kiln.cli.__main__ import main

    out = artifacts("bert", "feature-extraction")
    repo = tmp_path / "repo"
    assert main(["triton", str(out), str(repo), "--name", "embed", "--max-batch-size", "4", "--instances", "2",
                 "--pad-to-multiple-of", "8"]) == 0
    printed = capsys.readouterr().out.split()
    assert printed == [str(repo / m) for m in ("embed_model", "embed_preprocess", "embed_postprocess", "embed")]
    model = parse((repo / "embed_model/config.pbtxt").read_text())
    assert model.max_batch_size == 4 and model.instance_group[0].count == 2
    assert parse((repo / "embed_preprocess/config.pbtxt").read_text()).parameters["pad_to_multiple_of"] \
        .string_value == "8"
    assert main(["triton", str(out), str(repo), "--name", "embed"]) == 1
    assert "--force" in capsys.readouterr().err
    assert main(["triton", str(out), str(repo), "--name", "embed", "--force", "--gpu"]) == 0
    assert parse((repo / "embed_model/config.pbtxt").read_text()).instance_group[0].kind == \
        model_config_pb2.ModelInstanceGroup.KIND_GPU
    assert main(["triton", str(out), str(tmp_path / "other"), "--tensorrt"]) == 1
    assert "no TensorRT engine" in capsys.readouterr().err
    decoder = copy_artifact(out, tmp_path / "llm", task="text-generation")
    assert main(["triton", str(decoder), str(tmp_path / "other")]) == 1
    assert "decoder" in capsys.readouterr().err and not (tmp_path / "other").exists()
