"""For bench_whisper.py, run with the faster-whisper virtualenv's python (.bench-venvs/faster-whisper; never kiln's):

    .bench-venvs/faster-whisper/bin/python benchmarks/_faster_whisper_worker.py MODEL_DIR COMPUTE_TYPE THREADS

A long-lived peer: it loads the CTranslate2 Whisper in MODEL_DIR once (faster_whisper.WhisperModel, ``compute_type``
int8 or float32, ``cpu_threads`` THREADS), prints one JSON line with its versions, then answers one JSON request per
stdin line with one JSON line on stdout, so that bench_whisper.py interleaves it with the runners of its own process:

- ``{"op": "encode", "features": PATH.npy}``: the encoder on one 30 s window -> ``{"seconds"}``;
- ``{"op": "decode", "features": PATH.npy, "prompt": [ids], "tokens": N, "suppress": [ids]}``: greedy decoding of
  up to N tokens after the prompt with the end token suppressed (same work for every runner) -> ``{"seconds",
  "tokens"}`` (encoder included; bench_whisper takes the slope between two lengths);
- ``{"op": "transcribe", "audio": PATH.npy}``: faster-whisper's own transcribe of a 16 kHz array, greedy, without
  timestamps, VAD or conditioning on the previous window -> ``{"seconds", "tokens", "text"}``.
Spin-waiting is off: OMP_WAIT_POLICY=PASSIVE is set by the caller before CTranslate2 starts its threads.
"""

from __future__ import annotations

import json
import sys
import time


def main() -> None:
    model_dir, compute_type, threads = sys.argv[1], sys.argv[2], int(sys.argv[3])
    protocol, sys.stdout = sys.stdout, sys.stderr  # library chatter goes to stderr; stdout carries the protocol
    from importlib.metadata import version

    import ctranslate2
    import numpy as np
    from faster_whisper import WhisperModel

    model = WhisperModel(model_dir, device="cpu", compute_type=compute_type, cpu_threads=threads)
    versions = {name: version(name) for name in ("faster-whisper", "ctranslate2")}
    print(json.dumps({"versions": versions, "compute_type": compute_type}), file=protocol, flush=True)

    def encode(features: np.ndarray):
        return model.model.encode(ctranslate2.StorageView.from_array(np.ascontiguousarray(features[None])),
                                  to_cpu=False)

    for line in sys.stdin:
        request = json.loads(line)
        op = request["op"]
        if op == "encode":
            features = np.load(request["features"])
            started = time.perf_counter()
            encode(features)
            reply = {"seconds": time.perf_counter() - started}
        elif op == "decode":
            features = np.load(request["features"])
            prompt = request["prompt"]
            # CTranslate2's Whisper decodes at most max_length // 2 new tokens (openai's sample_len = n_text_ctx // 2).
            started = time.perf_counter()
            result = model.model.generate(encode(features), [prompt], beam_size=1,
                                          max_length=2 * request["tokens"], suppress_blank=False,
                                          suppress_tokens=[-1, *request["suppress"]])[0]
            reply = {"seconds": time.perf_counter() - started, "tokens": len(result.sequences_ids[0])}
        elif op == "transcribe":
            audio = np.load(request["audio"])
            started = time.perf_counter()
            segments, _ = model.transcribe(audio, beam_size=1, temperature=0.0, without_timestamps=True,
                                           condition_on_previous_text=False, vad_filter=False)
            segments = list(segments)  # the generator decodes as it is consumed
            reply = {"seconds": time.perf_counter() - started, "tokens": sum(len(s.tokens) for s in segments),
                     "text": "".join(s.text for s in segments)}
        else:
            reply = {"error": f"unknown op {op!r}"}
        print(json.dumps(reply), file=protocol, flush=True)


if __name__ == "__main__":
    main()
