"""``edgeq compile``: hand a quantized model to the target's own compiler.

* ``qnn``: an EP-context model with the HTP context binary for a chosen SoC (onnxruntime-qnn), CPU fallback off;
* ``coreml``: an ML Program ``.mlpackage`` lowered by edgeq, verified structurally and by weights on any OS;
* ``tensorrt``: a serialized engine through the ``tensorrt`` Python API (when importable);
* ``ort``: an ORT-format model for ONNX Runtime Mobile.

The model must first pass ``edgeq check`` for the target; dynamic input dimensions can be fixed with
``input_shapes`` (the fixed copy lives in a temporary file next to the output and is removed afterwards).
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from pathlib import Path
from typing import Iterator

import onnx

from edgeq.errors import CompileError, EdgeqError, OutputError
from edgeq.lint import check_model
from edgeq.model_io import load_model, same_file


def fix_input_shapes(model: onnx.ModelProto, shapes: dict[str, list[int]]) -> onnx.ModelProto:
    """Replace the dims of the named inputs (all of them must exist) and re-run shape inference."""
    names = {i.name for i in model.graph.input}
    unknown = sorted(set(shapes) - names)
    if unknown:
        raise EdgeqError(f"--input-shape names unknown input(s) {', '.join(unknown)}; inputs: {', '.join(sorted(names))}")
    clone = onnx.ModelProto()
    clone.CopyFrom(model)
    for vi in clone.graph.input:
        if vi.name in shapes:
            dims = vi.type.tensor_type.shape.dim
            if len(dims) != len(shapes[vi.name]):
                raise EdgeqError(f"--input-shape {vi.name}: rank {len(shapes[vi.name])} given, the input has rank "
                                 f"{len(dims)}")
            for d, v in zip(dims, shapes[vi.name]):
                d.ClearField("dim_param")
                d.dim_value = v
    del clone.graph.value_info[:]
    for out in clone.graph.output:
        for d in out.type.tensor_type.shape.dim:
            if d.HasField("dim_param"):
                d.ClearField("dim_param")
    try:
        clone = onnx.shape_inference.infer_shapes(clone)
    except Exception:  # the fixed dims are still right; shapes of intermediates are optional
        return clone
    return fold_shape_arithmetic(clone)


def fold_shape_arithmetic(model: onnx.ModelProto) -> onnx.ModelProto:
    """Fold what the now-static shapes decide (``Shape``/``Size`` and the integer arithmetic on them) into
    constants, as the target's compiler would; Q/DQ nodes are never folded, so quantized weights stay quantized."""
    import onnx_graphsurgeon as gs

    from edgeq.ir import fold_static_shapes, quiet_onnxruntime

    graph = gs.import_onnx(model)
    gs.logger.G_LOGGER.severity = gs.logger.G_LOGGER.ERROR
    quiet_onnxruntime()
    fold_static_shapes(graph)
    try:
        graph.fold_constants(fold_shapes=True, error_ok=True, flatten_subgraphs=False, size_threshold=1 << 20,
                             should_exclude_node=lambda n: n.op in ("QuantizeLinear", "DequantizeLinear"))
    except Exception:  # folding is an optimisation: the unfolded model is still correct
        return model
    graph.cleanup(remove_unused_graph_inputs=False)
    folded = gs.export_onnx(graph)
    folded.ir_version, folded.producer_name = model.ir_version, model.producer_name
    del folded.opset_import[:]
    folded.opset_import.extend(model.opset_import)
    return folded


@contextlib.contextmanager
def _static_copy(model_path: Path, shapes: dict | None, near: Path) -> Iterator[Path]:
    if not shapes:
        yield model_path
        return
    fixed = fix_input_shapes(load_model(model_path), shapes)
    fd, tmp = tempfile.mkstemp(prefix=f".{model_path.stem}.static.", suffix=".onnx", dir=near)
    os.close(fd)
    try:
        onnx.save(fixed, tmp)
        yield Path(tmp)
    finally:
        Path(tmp).unlink(missing_ok=True)


def compile_for_target(model: Path, profile, output: Path, *, soc: str | None = None, backend: str | None = None,
                       input_shapes: dict | None = None) -> dict:
    backend = backend or profile.compile.backend
    if backend == "none":
        raise EdgeqError(f"profile {profile.name} names no compile backend; pass --backend tensorrt|qnn|coreml|ort")
    qmodel = load_model(model)
    if same_file(model, output) or output.resolve() == model.resolve():
        raise OutputError("the compile output would overwrite the input model; choose another -o path")
    parent = output.parent if str(output.parent) else Path(".")
    if not parent.is_dir():
        raise OutputError(f"output directory does not exist: {parent}")
    if not os.access(parent, os.W_OK):
        raise OutputError(f"output directory is not writable: {parent}")
    lint_model = qmodel
    if input_shapes:
        lint_model = fix_input_shapes(qmodel, input_shapes)
    lint = check_model(lint_model, profile, path=str(model))
    if not lint.passed and backend in ("tensorrt", "qnn"):
        rules = ", ".join(sorted({f.rule for f in lint.errors}))
        raise CompileError(f"{model} is not legal for {profile.name} ({len(lint.errors)} errors: {rules}); run "
                           f"'edgeq check {model} -t {profile.name}' for the list")
    with _static_copy(model, input_shapes, parent) as src:
        if backend == "qnn":
            return _qnn(src, output, soc or profile.compile.soc, lint)
        if backend == "coreml":
            return _coreml(src, output, profile, lint, input_shapes)
        if backend == "tensorrt":
            return _tensorrt(src, output, profile, lint)
        if backend == "ort":
            return _ort(src, output, lint)
    raise EdgeqError(f"unknown compile backend {backend!r}")


def _qnn(src: Path, output: Path, soc: str | None, lint) -> dict:
    from edgeq.backends import qnn

    result = qnn.compile_context(src, output, options=qnn.QnnOptions.for_soc(soc))
    d = result.to_dict()
    placement = result.placement
    off = [f"{n.op_type} {n.name}" for n in getattr(placement, "not_on_qnn", ())]
    d["summary"] = [f"wrote {output} ({result.total_size_bytes / 1e6:.2f} MB, {result.context_graphs} QNN context "
                    f"graph(s), target {result.target}, QNN SDK {result.qnn_sdk_version})",
                    f"{len(result.nodes_on_qnn)} nodes on QNN HTP: " +
                    ", ".join(f"{k} x{v}" for k, v in result.op_types.items()),
                    "nodes not on QNN: " + (", ".join(off) if off else "none")]
    d["lint"] = lint.as_dict()
    return d


def _coreml(src: Path, output: Path, profile, lint, input_shapes) -> dict:
    from edgeq.backends import coreml

    if output.suffix != ".mlpackage":
        raise OutputError(f"Core ML output must end in .mlpackage, got {output}")
    opts = coreml.CoremlOptions(minimum_deployment_target=profile.compile.minimum_deployment_target or "iOS17")
    result = coreml.compile_coreml(src, output, options=opts, input_shapes=input_shapes)
    verification = coreml.verify_mlpackage(output, reference_qdq_model=load_model(src))
    if not verification.ok:
        raise CompileError(f"Core ML package {output} failed verification: {verification.summary()}")
    return {"output": str(output), "ops": result.op_counts, "verification": verification.summary(),
            "lint": lint.as_dict(),
            "summary": [result.summary(), "verified: " + verification.summary(),
                        "prediction: " + ("available" if coreml.predict_available() else
                                          "needs macOS (package verified structurally and by weights)")]}


def _tensorrt(src: Path, output: Path, profile, lint) -> dict:
    from edgeq.backends import tensorrt

    opts = tensorrt.TensorrtOptions(fp16=profile.compile.fp16)
    result = tensorrt.build_engine(src, output, options=opts)
    return {"output": str(output), "seconds": result.seconds, "layers": len(result.layers), "lint": lint.as_dict(),
            "summary": [f"wrote {output} ({result.size_bytes / 1e6:.2f} MB engine, {len(result.layers)} layers, "
                        f"{result.seconds:.1f}s)"]}


def _ort(src: Path, output: Path, lint) -> dict:
    from edgeq.backends.ort_mobile import save_ort_format

    if output.suffix != ".ort":
        raise OutputError(f"ORT-format output must end in .ort, got {output}")
    result = save_ort_format(src, output)
    return {"output": str(output), "size_bytes": result.size_bytes, "lint": lint.as_dict(),
            "summary": [f"wrote {output} ({result.size_bytes / 1e6:.2f} MB ORT format, {result.seconds:.1f}s)"]}
