"""Nothing lost (issue 8, item 4): an export killed mid-way leaves the previous artifact intact and nothing the
runtime accepts; two processes exporting the same checkpoint into the export cache at once both get one artifact.

Exports run as real `kiln export` / `kiln.pipeline` processes and are killed with SIGKILL (no cleanup handler
runs) at points read from their progress lines on stderr ("[3/5] Tracing ...").
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time

import pytest

import kiln
from kiln.artifact import clean_leftovers, file_hashes, verify
from kiln.errors import ArtifactError, KilnError
from kiln.runtime.pipelines import pipeline as runtime_pipeline

# (progress line, seconds after it): before the temp directory exists, as it appears, mid-trace (torch.onnx
# running), with model.onnx written and validation running, while the artifact's files are written.
KILL_POINTS = [("[2/5]", 0.0), ("[3/5]", 0.0), ("[3/5]", 1.0), ("[3/5]", 2.5), ("[4/5]", 0.0), ("[5/5]", 0.0)]
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", "OMP_NUM_THREADS": "1"}


def snapshot(directory) -> dict:
    """Every file's sha256, kiln.json included (file_hashes leaves the manifest out)."""
    import hashlib

    hashes = file_hashes(directory)
    hashes["kiln.json"] = hashlib.sha256((directory / "kiln.json").read_bytes()).hexdigest()
    return hashes


def leftovers(out):
    return sorted(p for p in out.parent.iterdir() if p.name.startswith(f".{out.name}."))


def export_killed_at(checkpoint, out, marker: str, delay: float) -> list[str]:
    """Start `kiln export`, SIGKILL it ``delay`` seconds after the progress line starting with ``marker``."""
    proc = subprocess.Popen([sys.executable, "-m", "kiln.cli", "export", str(checkpoint), str(out), "--batch", "1:8",
                             "--seq", "1:64"], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=ENV)
    seen = []
    try:
        for line in proc.stderr:
            seen.append(line.rstrip())
            if line.startswith(marker):
                break
        else:
            pytest.fail(f"the export ended (status {proc.wait()}) before {marker!r}:\n" + "\n".join(seen[-20:]))
        time.sleep(delay)
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.kill()
        proc.wait()
        proc.stderr.close()
    return seen


@pytest.mark.slow
def test_killed_export_loses_nothing(checkpoints, artifacts, tmp_path, record_property, capsys):
    checkpoint, _ = checkpoints("bert", "feature-extraction")
    out = tmp_path / "out"
    shutil.copytree(artifacts("bert", "feature-extraction"), out)
    before = snapshot(out)
    survived, outcomes = 0, []
    for marker, delay in KILL_POINTS:
        export_killed_at(checkpoint, out, marker, delay)
        left = leftovers(out)
        # The previous artifact is still at OUT, byte for byte, and verifies.
        assert snapshot(out) == before, f"killed at {marker}+{delay}s: the artifact at OUT changed"
        verify(out)
        kiln.pipeline("feature-extraction", out, threads=1)("still works")
        # Whatever the kill left beside OUT is no artifact: the runtime refuses it.
        for path in left:
            with pytest.raises(ArtifactError):
                runtime_pipeline("feature-extraction", path)
            with pytest.raises(ArtifactError):
                verify(path)
            with pytest.raises(KilnError):
                kiln.pipeline("feature-extraction", path)
        survived += 1
        outcomes.append(f"{marker}+{delay}s: {len(left)} temp dir(s) left")
    # The next export removes the leftovers of the killed ones (their processes are gone) and replaces OUT whole.
    kiln.export(str(checkpoint), out, batch="1:8", seq="1:64")
    assert leftovers(out) == [], leftovers(out)
    verify(out)
    assert snapshot(out)["kiln.json"] != before["kiln.json"]
    line = (f"atomic export: {survived}/{len(KILL_POINTS)} SIGKILLs survived (previous artifact intact; the next "
            "export removed the leftovers) -- " + "; ".join(outcomes))
    record_property("kills_survived", f"{survived}/{len(KILL_POINTS)}")
    print(line)
    with capsys.disabled():
        print("\n" + line, end="")


def test_a_kill_between_the_two_renames_is_repaired(artifacts, tmp_path):
    """The swap moves the old artifact aside, then the new one in: a kill between the two renames leaves OUT absent
    and the old artifact in `.OUT.old-PID@HOST-*/a`. The next export (here: its cleanup step) puts it back."""
    out = tmp_path / "out"
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()  # a PID whose process is gone
    aside = tmp_path / f".out.old-{dead.pid}@{socket.gethostname()}-abcd1234"
    aside.mkdir()
    shutil.copytree(artifacts("bert", "feature-extraction"), aside / "a")
    stale = tmp_path / f".out.tmp-{dead.pid}@{socket.gethostname()}-efgh5678"
    (stale / "sub").mkdir(parents=True)
    mine = tmp_path / f".out.tmp-{os.getpid()}@{socket.gethostname()}-ijkl9012"  # a live owner: left alone
    mine.mkdir()
    other_host = tmp_path / f".out.tmp-{dead.pid}@not-{socket.gethostname()}-mnop3456"  # maybe alive there
    other_host.mkdir()
    assert sorted(clean_leftovers(out)) == sorted([aside, stale])
    verify(out)
    assert mine.is_dir() and other_host.is_dir() and not aside.exists() and not stale.exists()


@pytest.mark.slow
def test_two_processes_export_one_cache_key(checkpoints, tmp_path, record_property):
    """`kiln.pipeline(task, checkpoint)` exports into the cache under a file lock: two processes started together
    both succeed, on the same artifact, exported once."""
    checkpoint, _ = checkpoints("bert", "feature-extraction")
    script = ("import json, logging, sys, kiln\n"
              "logging.basicConfig(level=logging.INFO, format='%(message)s')\n"
              "pipe = kiln.pipeline('feature-extraction', sys.argv[1], threads=1)\n"
              "print(json.dumps({'path': str(pipe.path), 'dim': len(pipe('hello', pooling='mean'))}))\n")
    env = {**ENV, "KILN_CACHE": str(tmp_path / "cache")}
    procs = [subprocess.Popen([sys.executable, "-c", script, str(checkpoint)], stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True, env=env) for _ in range(2)]
    results = [proc.communicate(timeout=300) for proc in procs]
    for proc, (stdout, stderr) in zip(procs, results):
        assert proc.returncode == 0, stderr[-3000:]
    paths = {json.loads(stdout.strip().splitlines()[-1])["path"] for stdout, _ in results}
    assert len(paths) == 1, paths
    exports = sum(stderr.count("[1/5] Resolving") for _, stderr in results)
    assert exports == 1, f"{exports} exports ran"
    root = tmp_path / "cache" / "artifacts"
    artifacts_made = [p for p in root.iterdir() if p.is_dir()]
    assert [p.name for p in artifacts_made] == [os.path.basename(paths.pop())], sorted(root.iterdir())
    verify(artifacts_made[0])
    record_property("concurrent_cache_exports", exports)
