"""The oracle for kiln's question-answering: transformers 4.57's pipeline, run in the .venv-hf457 virtualenv.

transformers 5 (kiln's test dependency) removed the pipeline, so tests run this script with the 4.57 venv's python:
JSON on stdin, ``{"calls": [{"model": dir, "args": [...], "kwargs": {...}}, ...]}``; JSON on stdout, one entry per
call, ``{"result": ...}`` or ``{"error": "TypeName: message"}``. One process answers every call of a test module.
A call may also give ``"init"``, options for making its pipeline, and ``"generator": true``: its first argument
(a list) is then passed as a generator and the results it yields are collected into a list.
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
            model, init = call["model"], call.get("init", {})
            key = (model, json.dumps(init, sort_keys=True))
            if key not in pipes:
                pipes[key] = transformers.pipeline("question-answering", model=model, tokenizer=model, device="cpu",
                                                   **init)
            args = list(call.get("args", []))
            if call.get("generator"):
                args[0] = (item for item in args[0])
            try:
                result = pipes[key](*args, **call.get("kwargs", {}))
                answers.append({"result": list(result) if call.get("generator") else result})
            except BaseException as err:  # tokenizers panics raise pyo3's PanicException, a BaseException
                if isinstance(err, (KeyboardInterrupt, SystemExit)):
                    raise
                answers.append({"error": f"{type(err).__name__}: {err}"})
    json.dump({"transformers": transformers.__version__, "answers": answers}, sys.stdout)


if __name__ == "__main__":
    main()
