"""Sharing artifacts (the seed's push_to_hub): `kiln push` uploads an artifact, verified first, with a model card;
`kiln.pipeline(task, "org/name")` and `kiln run org/name` download it through huggingface_hub's cache, check every
file against kiln.json, and run it; revisions pin, offline mode serves the cache, a tampered or incomplete hub copy
is refused. Against tests/hub_server.py, a stand-in for the hub on loopback (its limits are in its docstring): the
hub calls run in subprocesses, since this test process has HF_HUB_OFFLINE=1 fixed into huggingface_hub."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

import kiln
from kiln.errors import InputError

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent


@pytest.fixture(scope="module")
def hub(tmp_path_factory):
    """(environment for child processes talking to the stand-in hub, a function running Python code in one)."""
    root = tmp_path_factory.mktemp("hub")
    port_file = root / "port"
    server = subprocess.Popen([sys.executable, str(HERE / "hub_server.py"), str(port_file)])
    for _ in range(100):
        if port_file.is_file() and port_file.read_text():
            break
        time.sleep(0.05)
    env = {**os.environ, "HF_ENDPOINT": f"http://127.0.0.1:{port_file.read_text()}", "HF_HUB_OFFLINE": "0",
           "HF_HOME": str(root / "hf-home"), "HF_HUB_DISABLE_TELEMETRY": "1", "KILN_CACHE": str(root / "kiln")}
    env.pop("HF_TOKEN", None)

    def run(code: str, offline: bool = False, check: bool = True) -> subprocess.CompletedProcess:
        done = subprocess.run([sys.executable, "-c", code], env={**env, "HF_HUB_OFFLINE": "1" if offline else "0"},
                              capture_output=True, text=True, timeout=300, cwd=ROOT)
        if check:
            assert done.returncode == 0, done.stderr[-3000:]
        return done

    yield env, run
    server.terminate()
    server.wait(timeout=10)


def cli(env: dict, *args, offline: bool = False) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "kiln.cli.__main__", *args], capture_output=True, text=True,
                          env={**env, "HF_HUB_OFFLINE": "1" if offline else "0"}, timeout=300, cwd=ROOT)


def test_push_then_run_by_id(hub, artifacts):
    env, run = hub
    artifact = artifacts("bert", "text-classification")
    pushed = cli(env, "push", str(artifact), "acme/clf")
    assert pushed.returncode == 0, pushed.stderr
    assert "/acme/clf/commit/" in pushed.stdout
    local = kiln.pipeline("text-classification", artifact)("i love paris")
    ran, ran_local = cli(env, "run", "acme/clf", "i love paris"), cli(env, "run", str(artifact), "i love paris")
    assert ran.returncode == 0, ran.stderr
    assert json.loads(ran.stdout)["output"] == json.loads(ran_local.stdout)["output"]
    code = ("import json, kiln; p = kiln.pipeline(model='acme/clf'); "
            "print(json.dumps([p.task, str(p.path), p('i love paris')]))")
    task, path, result = json.loads(run(code).stdout.strip().splitlines()[-1])
    assert task == "text-classification" and result == local
    assert "hf-home" in path  # downloaded into huggingface_hub's cache, every listed file verified
    card = run("from huggingface_hub import hf_hub_download; print(open(hf_hub_download('acme/clf', 'README.md')).read())")
    assert "pipeline_tag: text-classification" in card.stdout and "kiln.pipeline('text-classification', 'acme/clf')" \
        in card.stdout and "Validated against the reference" in card.stdout
    # offline: the cache serves what was pulled; an id never pulled says so
    offline = run("import json, kiln; print(json.dumps(kiln.pipeline(model='acme/clf')('so bad')))", offline=True)
    want = kiln.pipeline("text-classification", artifact)("so bad")
    assert json.loads(offline.stdout.strip().splitlines()[-1]) == want
    missing = run("import kiln; kiln.pipeline(model='acme/never')", offline=True, check=False)
    assert missing.returncode != 0 and "is not in the local Hugging Face cache and HF_HUB_OFFLINE=1 is set" in missing.stderr


def test_revisions_pin(hub, artifacts):
    env, run = hub
    assert cli(env, "push", str(artifacts("bert", "text-classification")), "acme/pinned").returncode == 0
    tok = artifacts("bert", "token-classification")
    assert cli(env, "push", str(tok), "acme/pinned", "--revision", "v2").returncode == 0
    code = ("import kiln; print(kiln.pipeline(model='acme/pinned').task, "
            "kiln.pipeline(model='acme/pinned', revision='v2').task)")
    assert run(code).stdout.split() == ["text-classification", "token-classification"]


def test_a_tampered_or_incomplete_hub_copy_is_refused(hub, artifacts):
    env, run = hub
    assert cli(env, "push", str(artifacts("bert", "text-classification")), "acme/tampered").returncode == 0
    run("from huggingface_hub import CommitOperationAdd, HfApi; HfApi().create_commit('acme/tampered', "
        "[CommitOperationAdd('tokenizer.json', b'{}')], commit_message='edit')")
    done = run("import kiln; kiln.pipeline(model='acme/tampered')", check=False)
    assert done.returncode != 0 and "tokenizer.json does not match the sha256 in kiln.json" in done.stderr
    assert cli(env, "push", str(artifacts("bert", "text-classification")), "acme/partial").returncode == 0
    run("from huggingface_hub import CommitOperationDelete, HfApi; HfApi().create_commit('acme/partial', "
        "[CommitOperationDelete('model.onnx')], commit_message='drop')")
    done = run("import kiln; kiln.pipeline(model='acme/partial')", check=False)
    assert done.returncode != 0 and "lacks model.onnx, which kiln.json lists" in done.stderr
    # a kiln.json from a newer kiln: refused before any file is used
    assert cli(env, "push", str(artifacts("bert", "text-classification")), "acme/future").returncode == 0
    run("import json; from huggingface_hub import CommitOperationAdd, HfApi, hf_hub_download; "
        "m = json.load(open(hf_hub_download('acme/future', 'kiln.json'))); m['format_version'] = 99; "
        "HfApi().create_commit('acme/future', [CommitOperationAdd('kiln.json', json.dumps(m).encode())], "
        "commit_message='bump')")
    done = run("import kiln; kiln.pipeline(model='acme/future')", check=False)
    assert done.returncode != 0 and "has format_version 99; this kiln reads version 1" in done.stderr


def test_references_push_their_checkpoint(hub, checkpoints):
    env, run = hub
    path, _ = checkpoints("bert", "text-classification")
    code = (f"import kiln; m = kiln.from_pretrained({str(path)!r}, task='text-classification'); "
            "print(m.push_to_hub('acme/checkpoint'))")
    assert "/acme/checkpoint/commit/" in run(code).stdout
    code = ("import transformers; m = transformers.AutoModelForSequenceClassification.from_pretrained("
            "'acme/checkpoint'); print(m.config.num_labels)")
    assert run(code).stdout.split()[-1] == "3"  # transformers loads it from the hub
    code = "import kiln; print(type(kiln.from_pretrained('acme/checkpoint', task='text-classification')).__name__)"
    assert run(code).stdout.split()[-1] == "BertForSequenceClassification"


@pytest.mark.parametrize("repo_id", ["no-namespace", "a/b/c", "org/bad name", "", "../escape/x"])
def test_malformed_repo_ids(artifacts, repo_id):
    with pytest.raises(InputError, match="not a (valid )?hub repository id"):
        kiln.push_to_hub(artifacts("bert", "text-classification"), repo_id)


def test_a_tampered_local_artifact_is_not_pushed(artifacts, tmp_path):
    import shutil

    from kiln.errors import ArtifactError

    copy = tmp_path / "copy"
    shutil.copytree(artifacts("bert", "text-classification"), copy)
    (copy / "tokenizer.json").write_text("{}")
    with pytest.raises(ArtifactError, match="does not match the sha256"):
        kiln.push_to_hub(copy, "acme/never-pushed")


def _with_engine(source: Path, tmp_path: Path) -> Path:
    """A copy of ``source`` with a stand-in TensorRT plan recorded the way `kiln build` records one."""
    import shutil

    from kiln.artifact import sha256_file, update_manifest

    copy = tmp_path / "with-engine"
    shutil.copytree(source, copy)
    plan = copy / "engines" / "sm90-trt10.plan"
    plan.parent.mkdir()
    plan.write_bytes(b"not a real plan")
    entry = {"key": "sm90-trt10", "file": "engines/sm90-trt10.plan", "sha256": sha256_file(plan)}
    update_manifest(copy, lambda m: m.__setitem__("engines", [entry]))
    return copy


def test_engines_travel_only_when_asked_and_are_verified(hub, artifacts, tmp_path):
    env, run = hub
    copy = _with_engine(artifacts("bert", "text-classification"), tmp_path)
    assert cli(env, "push", str(copy), "acme/no-engines").returncode == 0
    assert cli(env, "push", str(copy), "acme/engines", "--include-engines").returncode == 0
    code = "import kiln, os; print(os.path.isfile(kiln.pipeline(model='{}').path / 'engines/sm90-trt10.plan'))"
    assert run(code.format("acme/no-engines")).stdout.split()[-1] == "False"
    assert run(code.format("acme/engines")).stdout.split()[-1] == "True"  # pulled with its sha256 checked


def test_a_tampered_engine_is_refused(artifacts, tmp_path):
    from kiln.artifact import verify
    from kiln.errors import ArtifactError

    copy = _with_engine(artifacts("bert", "text-classification"), tmp_path)
    verify(copy)
    (copy / "engines" / "sm90-trt10.plan").write_bytes(b"swapped")
    with pytest.raises(ArtifactError, match="engines/sm90-trt10.plan does not match the sha256"):
        verify(copy)
