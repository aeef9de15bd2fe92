"""Core ML backend: edgeq's own ONNX → Core ML ML Program lowering, packaging and verification.

The ONNX graph is translated op by op into a MIL program with coremltools' builder (no detour through
PyTorch), converted with ``ct.convert(program, convert_to="mlprogram")`` and saved as an ``.mlpackage``.
QDQ models keep their quantization: constant ``DequantizeLinear`` weights become compressed ``constexpr_*``
ops (int8/uint8, and int4/uint4 per-block from iOS18), activation Q/DQ pairs become ``quantize``/``dequantize``.

coremltools is the optional extra ``coreml``; it is imported only when a function here needs it. It builds
and inspects packages on any OS, but runs them only on macOS: :func:`predict_available` says which.

    from edgeq.backends.coreml import CoremlOptions, compile_coreml, verify_mlpackage
    options = CoremlOptions(minimum_deployment_target="iOS18")
    result = compile_coreml("model.qdq.onnx", "model.mlpackage", options=options)
    report = verify_mlpackage(result.output_path, reference_qdq_model=onnx.load("model.qdq.onnx"))
"""

from __future__ import annotations

import importlib.util
import json
import logging
import os
import shutil
import sys
import tempfile
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import onnx

from edgeq.errors import BackendUnavailableError, CompileError, EdgeqError, ModelLoadError, OutputError, require_module

if TYPE_CHECKING:  # pragma: no cover
    from edgeq.backends.coreml_lower import LoweredProgram, TensorBinding
    from edgeq.backends.coreml_quant import CompressedWeight
    from edgeq.backends.coreml_verify import CoremlVerification

logger = logging.getLogger(__name__)

__all__ = [
    "COMPUTE_UNITS", "DEPLOYMENT_TARGETS", "SUPPORTED_OPS", "CoremlCompileResult", "CoremlOptions", "compile_coreml",
    "lower_model", "lower_to_mil", "make_runner", "predict", "predict_available", "reference_predict",
    "verify_mlpackage",
]

DEPLOYMENT_TARGETS = {"iOS16": 16, "iOS17": 17, "iOS18": 18, "macOS13": 16, "macOS14": 17, "macOS15": 18}
COMPUTE_PRECISIONS = ("fp16", "fp32")
COMPUTE_UNITS = {"all": "ALL", "cpu_only": "CPU_ONLY", "cpu_and_gpu": "CPU_AND_GPU", "cpu_and_ne": "CPU_AND_NE"}
METADATA_KEY = "edgeq.io"
# ONNX ops with a Core ML lowering (kept here, not read from the translator registry, so that linting a model
# does not need coremltools; a test keeps the two in step). Constant, ConstantOfShape and Range are folded when
# their inputs are constants, as any op is; Shape and Size always are, since shapes are static.
SUPPORTED_OPS = frozenset({
    "Abs", "Add", "And", "ArgMax", "ArgMin", "AveragePool", "BatchNormalization", "Cast", "Ceil", "Clip", "Concat",
    "Constant", "ConstantOfShape", "Conv", "ConvTranspose", "Cos", "DequantizeLinear", "Div", "Dropout", "Elu",
    "Equal", "Erf", "Exp", "Expand", "Flatten", "Floor", "Gather", "Gelu", "Gemm", "GlobalAveragePool",
    "GlobalMaxPool", "Greater", "GreaterOrEqual", "GroupNormalization", "HardSigmoid", "HardSwish", "Identity",
    "InstanceNormalization", "LayerNormalization", "LeakyRelu", "Less", "LessOrEqual", "Log", "LogSoftmax",
    "MatMul", "Max", "MaxPool", "Min", "Mul", "Neg", "Not", "Or", "PRelu", "Pad", "Pow", "QuantizeLinear", "Range",
    "Reciprocal", "ReduceL1", "ReduceL2", "ReduceLogSumExp", "ReduceMax", "ReduceMean", "ReduceMin", "ReduceProd",
    "ReduceSum", "ReduceSumSquare", "Relu", "Reshape", "Resize", "Round", "Shape", "Sigmoid", "Sign", "Sin", "Size",
    "Slice", "Softmax", "Softplus", "Split", "Sqrt", "Squeeze", "Sub", "Sum", "Tanh", "Tile", "Transpose",
    "Unsqueeze", "Where", "Xor",
})
FOLDED_ONLY_OPS = frozenset({"Constant", "ConstantOfShape", "Range"})
_NUMPY_DTYPES = {"fp32": np.float32, "fp16": np.float16, "int32": np.int32}


@dataclass(frozen=True, kw_only=True)
class CoremlOptions:
    """How to build the Core ML package.

    ``compute_precision="fp16"`` (the default) runs the model in float16 except where the graph says float32:
    the ONNX nodes named (by op type or node name) in ``fp32_ops``, and, in an ONNX model that already mixes
    float16 and float32, every node the model itself computes in float32. ``"fp32"`` keeps everything float32.
    """

    minimum_deployment_target: str = "iOS17"
    compute_precision: str = "fp16"
    compute_units: str = "all"
    fp32_ops: tuple[str, ...] = ()

    def __post_init__(self):
        if self.minimum_deployment_target not in DEPLOYMENT_TARGETS:
            raise EdgeqError(f"unknown Core ML minimum_deployment_target {self.minimum_deployment_target!r}; "
                             f"choose one of {sorted(DEPLOYMENT_TARGETS)}")
        if self.compute_precision not in COMPUTE_PRECISIONS:
            raise EdgeqError(f"unknown Core ML compute_precision {self.compute_precision!r}; "
                             f"choose one of {list(COMPUTE_PRECISIONS)}")
        if self.compute_units not in COMPUTE_UNITS:
            raise EdgeqError(f"unknown Core ML compute_units {self.compute_units!r}; "
                             f"choose one of {list(COMPUTE_UNITS)}")
        object.__setattr__(self, "fp32_ops", tuple(self.fp32_ops))

    @property
    def target_level(self) -> int:
        """The iOS release whose MIL opset the package uses: 16, 17 or 18."""
        return DEPLOYMENT_TARGETS[self.minimum_deployment_target]


@dataclass(frozen=True)
class CoremlCompileResult:
    output_path: Path
    options: CoremlOptions
    inputs: tuple[TensorBinding, ...]
    outputs: tuple[TensorBinding, ...]
    op_counts: dict[str, int]  # MIL op types in the saved program
    compressed_weights: tuple[CompressedWeight, ...]
    activation_quant_pairs: int
    notes: tuple[str, ...] = ()
    seconds: float = 0.0
    fp32_ops: tuple[str, ...] = field(default=())

    def summary(self) -> str:
        by_dtype: dict[str, int] = {}
        for weight in self.compressed_weights:
            by_dtype[weight.dtype] = by_dtype.get(weight.dtype, 0) + 1
        weights = ", ".join(f"{n} {dtype}" for dtype, n in sorted(by_dtype.items())) or "none"
        return (f"{self.output_path} ({self.options.minimum_deployment_target}, {self.options.compute_precision}): "
                f"{sum(self.op_counts.values())} ops, compressed weights: {weights}, "
                f"activation quantize/dequantize pairs: {self.activation_quant_pairs}, {self.seconds:.1f}s")


def _coremltools():
    return require_module("coremltools", "coreml", "Core ML compilation")


def lower_model(model: onnx.ModelProto, *, options: CoremlOptions | None = None,
                input_shapes: Mapping[str, Sequence[int]] | None = None) -> LoweredProgram:
    """Lower ``model`` to a MIL program, with the bindings, compressed weights and notes of the lowering."""
    ct = _coremltools()
    from edgeq.backends.coreml_lower import lower_model as _lower

    options = options or CoremlOptions()
    return _lower(model, target=getattr(ct.target, options.minimum_deployment_target),
                  target_level=options.target_level, fp32_ops=options.fp32_ops, input_shapes=input_shapes)


def lower_to_mil(model: onnx.ModelProto, *, options: CoremlOptions | None = None,
                 input_shapes: Mapping[str, Sequence[int]] | None = None):
    """The ONNX model as a coremltools MIL ``Program`` (before coremltools' optimization passes).

    Raises UnsupportedModelError for dynamic input shapes without ``input_shapes``, and one CompileError that
    lists every node Core ML cannot take.
    """
    return lower_model(model, options=options, input_shapes=input_shapes).program


def _convert(ct, lowered: LoweredProgram, options: CoremlOptions):
    if options.compute_precision == "fp32":
        precision = ct.precision.FLOAT32
    else:
        keep = lowered.fp32_ops
        precision = ct.transform.FP16ComputePrecision(op_selector=lambda op: op.name not in keep)
    try:
        return ct.convert(lowered.program, convert_to="mlprogram",
                          minimum_deployment_target=getattr(ct.target, options.minimum_deployment_target),
                          compute_precision=precision,
                          compute_units=getattr(ct.ComputeUnit, COMPUTE_UNITS[options.compute_units]),
                          skip_model_load=True)
    except (ValueError, TypeError, RuntimeError, NotImplementedError) as exc:
        raise CompileError(f"coremltools could not convert the lowered MIL program: {exc}") from exc


def _save_atomically(mlmodel, output_path: Path) -> None:
    """Save into a staging folder next to the output, then rename; nothing partial is ever left behind."""
    output_path.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{output_path.name}.", suffix=".partial", dir=output_path.parent))
    try:
        built = staging / output_path.name
        mlmodel.save(str(built))
        previous = staging / "previous"
        if output_path.exists():
            os.replace(output_path, previous)
        try:
            os.replace(built, output_path)
        except OSError:
            if previous.exists():
                os.replace(previous, output_path)
            raise
    except OSError as exc:
        raise OutputError(f"cannot write {output_path}: {exc}") from exc
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def _metadata(lowered: LoweredProgram) -> str:
    def binding(b):
        return {"onnx": b.onnx_name, "coreml": b.coreml_name, "shape": list(b.shape), "onnx_dtype": b.onnx_dtype,
                "coreml_dtype": b.coreml_dtype}

    return json.dumps({"inputs": [binding(b) for b in lowered.inputs],
                       "outputs": [binding(b) for b in lowered.outputs]})


def compile_coreml(model_path: str | os.PathLike, output_path: str | os.PathLike, *,
                   options: CoremlOptions | None = None,
                   input_shapes: Mapping[str, Sequence[int]] | None = None) -> CoremlCompileResult:
    """Lower the ONNX (QDQ) model at ``model_path`` and save it as the ``.mlpackage`` folder ``output_path``."""
    ct = _coremltools()
    from edgeq.backends.coreml_verify import op_counts_from_spec

    options = options or CoremlOptions()
    model_path, output_path = Path(model_path), Path(output_path)
    if output_path.suffix != ".mlpackage":
        raise OutputError(f"Core ML output {output_path} must be a folder name ending in .mlpackage")
    if output_path.resolve() == model_path.resolve():
        raise OutputError("the Core ML output path is the input model")
    try:
        model = onnx.load(str(model_path))
    except Exception as exc:
        raise ModelLoadError(f"cannot read ONNX model {model_path}: {exc}") from exc
    start = time.perf_counter()
    lowered = lower_model(model, options=options, input_shapes=input_shapes)
    mlmodel = _convert(ct, lowered, options)
    mlmodel.short_description = f"{model_path.name}, lowered by edgeq"
    mlmodel.user_defined_metadata[METADATA_KEY] = _metadata(lowered)
    _save_atomically(mlmodel, output_path)
    for note in lowered.notes:
        logger.info("%s", note)
    return CoremlCompileResult(output_path, options, lowered.inputs, lowered.outputs,
                               op_counts_from_spec(mlmodel.get_spec()), lowered.weights,
                               len(lowered.activation_qdq), lowered.notes, time.perf_counter() - start,
                               tuple(sorted(lowered.fp32_ops)))


def verify_mlpackage(path: str | os.PathLike, *, reference_qdq_model: onnx.ModelProto) -> CoremlVerification:
    """Check a saved package against the QDQ model it came from, without running it (works on Linux).

    See :mod:`edgeq.backends.coreml_verify` for what is checked.
    """
    _coremltools()
    from edgeq.backends.coreml_verify import verify_package

    return verify_package(Path(path), reference_qdq_model)


def predict_available() -> bool:
    """True where coremltools can run a model: macOS with coremltools' native extension."""
    if sys.platform != "darwin" or importlib.util.find_spec("coremltools") is None:
        return False
    return importlib.util.find_spec("coremltools.libcoremlpython") is not None


def _bindings(mlmodel) -> dict:
    raw = mlmodel.user_defined_metadata.get(METADATA_KEY)
    if raw is None:
        raise CompileError(f"{METADATA_KEY} metadata missing: the package was not built by edgeq")
    return json.loads(raw)


def _feeds(bindings: dict, feeds: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    expected = {b["onnx"]: b for b in bindings["inputs"]}
    missing = sorted(set(expected) - set(feeds))
    if missing:
        raise EdgeqError(f"missing Core ML inputs {missing}; the model takes {sorted(expected)}")
    converted = {}
    for name, b in expected.items():
        value = np.asarray(feeds[name])
        if list(value.shape) != b["shape"]:
            raise EdgeqError(f"input {name!r} has shape {list(value.shape)}; the package was built for {b['shape']}")
        converted[b["coreml"]] = value.astype(_NUMPY_DTYPES[b["coreml_dtype"]])
    return converted


def _outputs(bindings: dict, results: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    return {b["onnx"]: np.asarray(results[b["coreml"]]).astype(b["onnx_dtype"]) for b in bindings["outputs"]}


def make_runner(package_path: str | os.PathLike, *, compute_units: str = "all"):
    """``run(feed) -> [outputs]`` with Core ML (macOS only), as ``edgeq validate`` uses it.

    Feeds are keyed by the ONNX input names; the callable has ``output_names`` (the ONNX output order). The
    package is loaded (and compiled by Core ML) here, before any sample runs.
    """
    ct = _coremltools()
    if not predict_available():
        raise BackendUnavailableError(f"Core ML prediction needs macOS (this is {sys.platform}); "
                                      "verify_mlpackage checks a package without running it")
    if compute_units not in COMPUTE_UNITS:
        raise EdgeqError(f"unknown Core ML compute_units {compute_units!r}; choose one of {list(COMPUTE_UNITS)}")
    mlmodel = ct.models.MLModel(str(package_path), compute_units=getattr(ct.ComputeUnit, COMPUTE_UNITS[compute_units]))
    bindings = _bindings(mlmodel)
    names = [b["onnx"] for b in bindings["outputs"]]

    def run(feed: Mapping[str, np.ndarray]) -> list[np.ndarray]:
        results = _outputs(bindings, mlmodel.predict(_feeds(bindings, feed)))
        return [results[name] for name in names]

    run.output_names = names  # type: ignore[attr-defined]
    run.mlmodel = mlmodel  # type: ignore[attr-defined]
    return run


def predict(package_path: str | os.PathLike, feeds: Mapping[str, np.ndarray], *,
            compute_units: str = "all") -> dict[str, np.ndarray]:
    """Run the package once with Core ML (macOS only); feeds and results are keyed by the ONNX tensor names."""
    run = make_runner(package_path, compute_units=compute_units)
    return dict(zip(run.output_names, run(feeds)))


def reference_predict(package_path: str | os.PathLike, feeds: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Interpret the package's MIL program in numpy (any OS).

    This checks what the lowering *means* — op semantics, layouts, quantization parameters — with float16
    rounding where the program computes in float16. It is not Core ML: kernels, accumulation order and the
    Neural Engine's numerics are not modelled, so use :func:`predict` on macOS for deployment numbers.
    """
    ct = _coremltools()
    from edgeq.backends.coreml_reference import evaluate_program, load_program

    mlmodel = ct.models.MLModel(str(package_path), skip_model_load=True)
    bindings = _bindings(mlmodel)
    return _outputs(bindings, evaluate_program(load_program(mlmodel), _feeds(bindings, feeds)))
