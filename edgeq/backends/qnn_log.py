"""Read the QNN EP's per-node validation verdicts out of ONNX Runtime's verbose log.

ORT's C++ logger writes to the process's stderr (file descriptor 2), out of Python's reach, so
:func:`capture_native_stderr` points fd 2 at a temporary file while a session is created. With the session's
``log_severity_level`` at 0 the QNN EP logs one block per QDQ node group it considered::

    ... LogNodeSupport] Validation FAILED for 5 nodes in OrtNodeUnit (LayerNormalization) :
    \tOperator type: DequantizeLinear Node name: x_DQ Node index: 1
    \tOperator type: LayerNormalization Node name: op Node index: 4
    \tREASON : Failed to add node.

and, a few lines before it, the QNN backend's complaint about a node: a warning ``QNN.backendValidateOpConfig()
failed for node `op` of type `LayerNorm` with error code 3110`` and, when ORT's default logger is verbose too,
the backend's own ``<E> Unsupported input/output datatypes requested for the HTP Op 'LayerNorm' in the node
'op'``. :func:`parse_rejections` turns these into ``{node name: reason}``.
"""

from __future__ import annotations

import contextlib
import os
import re
import sys
import tempfile
from collections.abc import Iterator

_ANSI = re.compile(r"\x1b\[[0-9;]*m")
_FAILED = re.compile(r"Validation FAILED for \d+ nodes in OrtNodeUnit \((?P<unit>[^)]*)\)")
_MEMBER = re.compile(r"^\s*Operator type: (?P<op>\S+) Node name: (?P<name>.*?) Node index: \d+\s*$")
_REASON = re.compile(r"^\s*REASON : (?P<reason>.*\S)")
_QNN_ERROR = re.compile(r"<E> (?P<msg>.*?in the node '(?P<name>[^']*)'.*?)\s*$")
_VALIDATOR = re.compile(
    r"backendValidateOpConfig\(\) failed for node `(?P<name>[^`]*)` of type `(?P<op>[^`]*)`"
    r" with error code (?P<code>\d+)"
)
_NOT_ASSIGNED = re.compile(r"(?<=\.)\s*\w+ node `[^`]*` will not be assigned to QNN EP\.?$")


@contextlib.contextmanager
def capture_native_stderr() -> Iterator[list[str]]:
    """Collect what native code writes to fd 2 inside the block; the list is filled on exit.

    Anything another thread writes to stderr meanwhile is collected too (and not shown).
    """
    captured: list[str] = []
    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile(mode="w+b") as sink:
        os.dup2(sink.fileno(), 2)
        try:
            yield captured
        finally:
            sys.stderr.flush()
            os.dup2(saved, 2)
            os.close(saved)
            sink.seek(0)
            captured.append(sink.read().decode("utf-8", errors="replace"))


def parse_rejections(log_text: str) -> dict[str, str]:
    """``{node name: reason}`` for every node in a node group the QNN EP refused, from its verbose log."""
    backend_errors: dict[str, str] = {}
    rejections: dict[str, str] = {}
    members: list[str] | None = None
    for raw in _ANSI.sub("", log_text).splitlines():
        if (match := _QNN_ERROR.search(raw)) is not None:
            backend_errors[match["name"]] = match["msg"]
        elif (match := _VALIDATOR.search(raw)) is not None:
            backend_errors.setdefault(
                match["name"],
                f"the HTP op validator rejected it as QNN {match['op']}, error {match['code']}; "
                "usually an unsupported dtype combination",
            )
        elif _FAILED.search(raw) is not None:
            members = []
        elif members is not None and (match := _MEMBER.match(raw)) is not None:
            members.append(match["name"])
        elif members is not None and (match := _REASON.match(raw)) is not None:
            reason = _NOT_ASSIGNED.sub("", match["reason"])
            detail = next((backend_errors[m] for m in members if m in backend_errors), None)
            for name in members:
                rejections.setdefault(name, f"{reason} ({detail})" if detail else reason)
            members = None
    return rejections
