"""ONNX Runtime Mobile: save a model in ORT format (``.ort``), optimised for the basic level ORT Mobile runs."""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

from edgeq.errors import CompileError
from edgeq.model_io import atomic_path


@dataclass
class OrtCompileResult:
    output: Path
    seconds: float
    size_bytes: int


def save_ort_format(model: Path, output: Path) -> OrtCompileResult:
    import onnxruntime as ort

    start = time.perf_counter()
    with atomic_path(output, suffix=".ort") as tmp:
        so = ort.SessionOptions()
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
        so.optimized_model_filepath = str(tmp)
        so.add_session_config_entry("session.save_model_format", "ORT")
        so.log_severity_level = 3
        try:
            ort.InferenceSession(str(model), so, providers=["CPUExecutionProvider"])
        except Exception as exc:
            raise CompileError(f"ONNX Runtime could not convert {model} to ORT format: "
                               f"{str(exc).splitlines()[0][:300]}") from None
    return OrtCompileResult(output=output, seconds=time.perf_counter() - start, size_bytes=output.stat().st_size)
