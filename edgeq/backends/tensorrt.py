"""TensorRT: build a serialized engine from a TensorRT-legal QDQ ONNX model through the ``tensorrt`` Python API.

Only when ``tensorrt`` is importable (it comes from NVIDIA's package index: ``pip install 'edgeq[tensorrt]'``);
otherwise :func:`build_engine` raises a clear error that also prints the equivalent ``trtexec`` command.
Nothing is simulated here: engines are built by TensorRT itself or not at all.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

from edgeq.errors import BackendUnavailableError, CompileError
from edgeq.model_io import atomic_path


@dataclass(frozen=True, kw_only=True)
class TensorrtOptions:
    fp16: bool = False
    workspace_mb: int = 4096
    strongly_typed: bool = True


@dataclass
class TensorrtCompileResult:
    output: Path
    seconds: float
    layers: list[dict] = field(default_factory=list)
    size_bytes: int = 0


def trtexec_command(model: Path, output: Path, options: TensorrtOptions) -> str:
    flags = ["--stronglyTyped"] if options.strongly_typed else ["--int8"] + (["--fp16"] if options.fp16 else [])
    return f"trtexec --onnx={model} --saveEngine={output} {' '.join(flags)} --memPoolSize=workspace:{options.workspace_mb}M"


def available() -> bool:
    try:
        import tensorrt  # noqa: F401
    except ImportError:
        return False
    return True


def _import_trt(model: Path, output: Path, options: TensorrtOptions):
    try:
        import tensorrt as trt
    except ImportError:
        raise BackendUnavailableError(
            "building a TensorRT engine needs the 'tensorrt' package (NVIDIA's index; pip install 'edgeq[tensorrt]' "
            f"on a machine with an NVIDIA GPU). The model is TensorRT-ready; build it there with: "
            f"{trtexec_command(model, output, options)}") from None
    return trt


def build_engine(model: Path, output: Path, *, options: TensorrtOptions = TensorrtOptions()) -> TensorrtCompileResult:
    trt = _import_trt(model, output, options)
    start = time.perf_counter()
    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    flags = 1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED) if options.strongly_typed else 0
    network = builder.create_network(flags)
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(model)):
        errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise CompileError(f"TensorRT's ONNX parser rejected {model}: {errors}")
    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, options.workspace_mb << 20)
    config.profiling_verbosity = trt.ProfilingVerbosity.DETAILED
    if not options.strongly_typed and options.fp16:
        config.set_flag(trt.BuilderFlag.FP16)
    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        raise CompileError(f"TensorRT could not build an engine from {model} (see the TensorRT log above)")
    with atomic_path(output) as tmp:
        tmp.write_bytes(bytes(serialized))
    runtime = trt.Runtime(logger)
    engine = runtime.deserialize_cuda_engine(bytes(serialized))
    layers = []
    if engine is not None:
        info = json.loads(engine.create_engine_inspector().get_engine_information(trt.LayerInformationFormat.JSON))
        for layer in info.get("Layers", []):
            layers.append(layer if isinstance(layer, dict) else {"name": str(layer)})
    return TensorrtCompileResult(output=output, seconds=time.perf_counter() - start, layers=layers,
                                 size_bytes=os.path.getsize(output))


def make_runner(path: Path):
    """Validation on TensorRT: runs the ONNX model through ONNX Runtime's TensorRT execution provider."""
    import onnxruntime as ort

    if "TensorrtExecutionProvider" not in ort.get_available_providers():
        raise BackendUnavailableError("validating on TensorRT needs onnxruntime-gpu with the TensorRT execution "
                                      "provider (pip install 'edgeq[gpu,tensorrt]') and an NVIDIA GPU")
    session = ort.InferenceSession(str(path), providers=["TensorrtExecutionProvider"])
    names = [o.name for o in session.get_outputs()]

    def run(feed):
        return session.run(names, feed)

    run.output_names = names
    return run
