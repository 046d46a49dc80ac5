"""For bench_whisper.py, run with the Optimum virtualenv's python (.bench-venvs/optimum; never kiln's):

    .bench-venvs/optimum/bin/python benchmarks/_optimum_whisper_worker.py HF_DIR ONNX_DIR THREADS

A long-lived peer: Optimum's ``ORTModelForSpeechSeq2Seq`` over the Hugging Face checkpoint in HF_DIR, exported with
Optimum's own exporter into ONNX_DIR once (fp32, its encoder and decoder-with-past graphs) and loaded from there
after; onnxruntime with THREADS intra-op threads and spin-waiting off. It prints one JSON line with its versions,
then answers one JSON request per stdin line with one JSON line on stdout, as _faster_whisper_worker.py does:

- ``{"op": "encode", "features": PATH.npy}``: the encoder on one 30 s window;
- ``{"op": "decode", "features": PATH.npy, "tokens": N}``: greedy generate() of exactly N new tokens (min_new_tokens
  holds the end token back) after <|startoftranscript|><|notimestamps|> -> ``{"tokens"}``, the new tokens;
- ``{"op": "transcribe", "halves": [PATH.npy, ...]}``: the 16 kHz windows, each through the feature extractor and a
  greedy generate() -> ``{"tokens", "text"}``.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path


def main() -> None:
    hf_dir, onnx_dir, threads = sys.argv[1], Path(sys.argv[2]), int(sys.argv[3])
    protocol, sys.stdout = sys.stdout, sys.stderr  # library chatter goes to stderr; stdout carries the protocol
    from importlib.metadata import version

    import numpy as np
    import onnxruntime
    import torch
    import transformers
    from optimum.onnxruntime import ORTModelForSpeechSeq2Seq

    transformers.utils.logging.set_verbosity_error()
    torch.set_num_threads(threads)
    options = onnxruntime.SessionOptions()
    options.intra_op_num_threads, options.inter_op_num_threads = threads, 1
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    if not any(onnx_dir.glob("encoder_model*.onnx")):
        ORTModelForSpeechSeq2Seq.from_pretrained(hf_dir, export=True).save_pretrained(onnx_dir)
    model = ORTModelForSpeechSeq2Seq.from_pretrained(onnx_dir, session_options=options)
    extractor = transformers.WhisperFeatureExtractor.from_pretrained(hf_dir)
    tokenizer = transformers.AutoTokenizer.from_pretrained(hf_dir)
    eos = model.generation_config.eos_token_id
    versions = {name: version(name) for name in ("optimum", "optimum-onnx", "transformers", "onnxruntime", "torch")}
    print(json.dumps({"versions": versions, "files": sorted(p.name for p in onnx_dir.glob("*.onnx"))}),
          file=protocol, flush=True)

    for line in sys.stdin:
        request = json.loads(line)
        op = request["op"]
        with torch.inference_mode():
            if op == "encode":
                model.encoder(input_features=torch.from_numpy(np.load(request["features"])[None]), attention_mask=None)
                reply = {}
            elif op == "decode":
                features = torch.from_numpy(np.load(request["features"])[None])
                n = request["tokens"]
                out = model.generate(features, max_new_tokens=n, min_new_tokens=n, num_beams=1,
                                     force_unique_generate_call=True)
                reply = {"tokens": int(out.shape[1]) - 2}  # after <|startoftranscript|><|notimestamps|>
            elif op == "transcribe":
                tokens, text = 0, ""
                for path in request["halves"]:
                    feats = extractor(np.load(path), sampling_rate=16000, return_tensors="pt").input_features
                    ids = [t for t in model.generate(feats, num_beams=1, force_unique_generate_call=True)[0].tolist()
                           if t < eos]
                    tokens, text = tokens + len(ids), text + tokenizer.decode(ids)
                reply = {"tokens": tokens, "text": text}
            else:
                reply = {"error": f"unknown op {op!r}"}
        print(json.dumps(reply), file=protocol, flush=True)


if __name__ == "__main__":
    main()
