"""The oracle for head masks and pruned heads: transformers 4.57 (transformers 5 removed both), run in .venv-hf457.

JSON on stdin: ``{"calls": [{"model": dir, "auto": "AutoModelForMaskedLM", "inputs": {name: nested list},
"head_mask": nested list or null, "prune": {"layer": [heads]} or null, "save": dir or null,
"outputs": ["logits", "attentions", ...]}]}``. Each call loads the model (eager attention, which is what takes a
head mask), prunes it if asked (and saves it if asked), runs it once, and answers ``{name: nested list}`` (tuples of
tensors as lists of them) or ``{"error": "TypeName: message"}``. JSON on stdout.
"""

from __future__ import annotations

import contextlib
import json
import os
import sys
import warnings


def main() -> None:
    os.environ["HF_HUB_OFFLINE"] = "1"
    request = json.load(sys.stdin)
    with contextlib.redirect_stdout(sys.stderr):  # stdout carries the JSON answer only
        warnings.simplefilter("ignore")
        import torch
        import transformers

        transformers.logging.set_verbosity_error()
        answers = []
        for call in request["calls"]:
            try:
                cls = getattr(transformers, call["auto"])
                model = cls.from_pretrained(call["model"], attn_implementation="eager").eval()
                if call.get("prune"):
                    model.prune_heads({int(layer): heads for layer, heads in call["prune"].items()})
                if call.get("save"):
                    model.save_pretrained(call["save"])
                inputs = {k: torch.tensor(v) for k, v in call["inputs"].items()}
                if call.get("head_mask") is not None:
                    inputs["head_mask"] = torch.tensor(call["head_mask"], dtype=torch.float32)
                with torch.no_grad():
                    out = model(**inputs, output_attentions="attentions" in call["outputs"], return_dict=True)
                answer = {}
                for name in call["outputs"]:
                    value = out[name]
                    answer[name] = [t.tolist() for t in value] if isinstance(value, tuple) else value.tolist()
                answers.append(answer)
            except Exception as err:
                answers.append({"error": f"{type(err).__name__}: {err}"})
    json.dump({"transformers": transformers.__version__, "answers": answers}, sys.stdout)


if __name__ == "__main__":
    main()
