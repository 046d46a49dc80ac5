"""The oracle for kiln's question-answering: transformers 4.57's pipeline, run in the .venv-hf457 virtualenv.

transformers 5 (kiln's test dependency) removed the pipeline, so tests run this script with the 4.57 venv's python:
JSON on stdin, ``{"calls": [{"model": dir, "args": [...], "kwargs": {...}}, ...]}``; JSON on stdout, one entry per
call, ``{"result": ...}`` or ``{"error": "TypeName: message"}``. One process answers every call of a test module.
"""

from __future__ import annotations

import contextlib
import json
import os
import sys
import warnings


def main() -> None:
    os.environ["HF_HUB_OFFLINE"] = "1"
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    request = json.load(sys.stdin)
    with contextlib.redirect_stdout(sys.stderr):  # stdout carries the JSON answer only
        warnings.simplefilter("ignore")
        import transformers

        transformers.logging.set_verbosity_error()
        pipes, answers = {}, []
        for call in request["calls"]:
            model = call["model"]
            if model not in pipes:
                pipes[model] = transformers.pipeline("question-answering", model=model, tokenizer=model, device="cpu")
            try:
                answers.append({"result": pipes[model](*call.get("args", []), **call.get("kwargs", {}))})
            except BaseException as err:  # tokenizers panics raise pyo3's PanicException, a BaseException
                if isinstance(err, (KeyboardInterrupt, SystemExit)):
                    raise
                answers.append({"error": f"{type(err).__name__}: {err}"})
    json.dump({"transformers": transformers.__version__, "answers": answers}, sys.stdout)


if __name__ == "__main__":
    main()
