"""For bench_decoder.py: the timed generate() round of both transformers-based runners, and the Optimum runner, a
long-lived subprocess in its own virtualenv (.bench-venvs/optimum; never kiln): `python _optimum_decoder.py JSON_ARGS`
exports (or reuses) the ORTModelForCausalLM model, prints one JSON line of versions, then answers each "run" line on
stdin with one JSON line of timings."""

from __future__ import annotations

import json
import sys
import time


class StepTimer:
    """A transformers streamer used as a clock: generate() puts the prompt once, then each new token."""

    def __init__(self):
        self.stamps: list[float] = []
        self.tokens: list[int] = []

    def put(self, value) -> None:
        self.stamps.append(time.perf_counter())
        if len(self.stamps) > 1:
            self.tokens.append(int(value.reshape(-1)[0]))

    def end(self) -> None:
        pass


def hf_round(model, ids: list[int], new_tokens: int) -> dict:
    """One greedy generate() of exactly ``new_tokens`` tokens (EOS suppressed by min_new_tokens); times in ms."""
    import torch

    input_ids = torch.tensor([ids], dtype=torch.long)
    timer = StepTimer()
    started = time.perf_counter()
    model.generate(input_ids=input_ids, attention_mask=torch.ones_like(input_ids), max_new_tokens=new_tokens,
                   min_new_tokens=new_tokens, do_sample=False, streamer=timer, pad_token_id=model.config.eos_token_id)
    return timings(timer.stamps, time.perf_counter() - started, timer.tokens)


def timings(stamps: list[float], total: float, tokens: list[int]) -> dict:
    """``stamps``: the start, then one per new token (s) -> prefill, per-step decode and total times in ms."""
    return {"prefill": (stamps[1] - stamps[0]) * 1000, "total": total * 1000, "tokens": tokens,
            "steps": [(b - a) * 1000 for a, b in zip(stamps[1:], stamps[2:])]}


def main() -> None:
    args = json.loads(sys.argv[1])
    protocol, sys.stdout = sys.stdout, sys.stderr  # library chatter goes to stderr; stdout carries JSON lines only
    from importlib.metadata import version
    from pathlib import Path

    import onnxruntime
    import torch
    import transformers
    from optimum.onnxruntime import ORTModelForCausalLM

    transformers.utils.logging.set_verbosity_error()
    torch.set_num_threads(args["threads"])
    options = onnxruntime.SessionOptions()
    options.intra_op_num_threads, options.inter_op_num_threads = args["threads"], 1
    onnx_dir = Path(args["onnx_dir"])
    if (onnx_dir / "model.onnx").is_file():
        model = ORTModelForCausalLM.from_pretrained(onnx_dir, session_options=options)
    else:
        model = ORTModelForCausalLM.from_pretrained(args["hf_dir"], export=True, session_options=options)
        model.save_pretrained(onnx_dir)
    versions = {name: version(name) for name in ("optimum", "optimum-onnx", "transformers", "onnxruntime", "torch")}
    info = {"versions": versions, "io_binding": bool(model.use_io_binding),
            "providers": model.providers}
    print(json.dumps(info), file=protocol, flush=True)
    for line in sys.stdin:
        if line.strip() == "run":
            print(json.dumps(hf_round(model, args["ids"], args["new_tokens"])), file=protocol, flush=True)


if __name__ == "__main__":
    main()
