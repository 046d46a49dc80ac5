"""kiln's own exceptions: each names the problem and the fix, so the CLI can print one line, not a traceback."""

from __future__ import annotations


class KilnError(Exception):
    """Base class. ``str(err)`` is a complete message for a user: what went wrong and what to do."""


class CheckpointError(KilnError):
    """A checkpoint could not be found, read or mapped onto a kiln architecture."""


class ConfigError(CheckpointError):
    """``config.json`` is missing, unreadable or describes a model kiln cannot build."""


class ArtifactError(KilnError):
    """An artifact directory is missing, incomplete or of an unknown format version."""


class ExportError(KilnError):
    """Tracing or writing the ONNX graph failed."""


class ValidationError(ExportError):
    """The exported graph disagrees with the reference beyond tolerance."""

    def __init__(self, message: str, report: dict | None = None):
        super().__init__(message)
        self.report = report or {}


class InputError(KilnError, ValueError):
    """A pipeline or engine was called with input it cannot take."""


class ClosedError(KilnError):
    """A ``kiln.runtime.Batcher`` was called after ``close()``, or closed before a queued request could run."""


class MissingDependencyError(KilnError, ImportError):
    """An optional extra is needed for this step."""

    def __init__(self, module: str, extra: str, purpose: str, hint: str = ""):
        super().__init__(
            f"{purpose} needs the '{module}' package, which is not installed. "
            f"Install it with: pip install 'kiln[{extra}]'"
            + (" torch==2.13.0" if extra == "torch" else "")
            + (f". {hint}" if hint else "")
        )
        self.module = module
        self.extra = extra


def require(module: str, extra: str, purpose: str):
    """Import an optional dependency or raise a MissingDependencyError that says which extra to install."""
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError as err:
        raise MissingDependencyError(module, extra, purpose) from err
