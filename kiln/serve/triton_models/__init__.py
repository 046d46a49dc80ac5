"""The Python-backend models that ``kiln triton`` copies into a Triton repository as ``<model>/1/model.py``.

kiln never imports these: they run inside Triton's Python backend, which provides ``triton_python_backend_utils``,
and need only numpy and ``tokenizers`` there (not kiln, which the Triton environment may not have). The few runtime
pieces they need are copied from kiln and marked ``# Copied from``; tests/serve/test_triton.py runs them against
kiln's own pipelines with a stand-in for ``triton_python_backend_utils``.
"""
