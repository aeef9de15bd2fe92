"""ONNX Runtime sessions configured the same way for every benchmark measurement."""

from __future__ import annotations

from pathlib import Path

import onnxruntime as ort


def make_session(path: Path | str, threads: int = 2) -> ort.InferenceSession:
    """A CPU session with full graph optimisation. DQ+MatMul fusions into MatMulNBits run at accuracy level 1
    (fp32 compute), so a Q/DQ model is simulated exactly rather than through int8 activation shortcuts."""
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.add_session_config_entry("session.qdq_matmulnbits_accuracy_level", "1")
    options.log_severity_level = 3
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def input_names(session: ort.InferenceSession) -> list[str]:
    return [i.name for i in session.get_inputs()]
