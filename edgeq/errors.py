"""Error types.

User errors derive from :class:`EdgeqError`: the CLI prints their message on one line and exits 2 (no traceback
unless ``--verbose``). Anything else is a bug and keeps its traceback.
"""

from __future__ import annotations


class EdgeqError(Exception):
    """A problem with the user's input or environment; the message says what is wrong and what to do."""

    exit_code = 2


class ModelLoadError(EdgeqError):
    """The model file is missing, unreadable, not ONNX, or structurally invalid."""


class UnsupportedModelError(EdgeqError):
    """The model is valid ONNX but uses something edgeq cannot handle (opset, op, domain)."""


class CalibrationDataError(EdgeqError):
    """Calibration or evaluation data does not match the model or cannot be read."""


class ProfileError(EdgeqError):
    """A target profile is unknown, malformed, or has an unknown/misspelt key."""


class OutputError(EdgeqError):
    """The output cannot be written (same as input, unwritable directory, disk full)."""


class BackendUnavailableError(EdgeqError):
    """An optional backend is not installed; the message names the pip extra."""


class CompileError(EdgeqError):
    """The target compiler rejected the model (e.g. nodes that would fall back to the CPU)."""


class PassError(EdgeqError):
    """A graph pass failed on a user model; names the pass and the passes that ran before it."""


def require_module(module: str, extra: str, purpose: str):
    """Import an optional backend lazily, or raise a BackendUnavailableError naming the pip extra."""
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError as exc:  # pragma: no cover - depends on the environment
        raise BackendUnavailableError(
            f"{purpose} needs the '{module}' package, which is not importable ({exc}). "
            f"Install it with: pip install 'edgeq[{extra}]'"
        ) from None
