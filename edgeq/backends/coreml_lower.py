"""The ONNX graph walk that builds a Core ML MIL program (``coremltools.converters.mil``) node by node.

Inputs get static shapes (from the model or an override), initializers and foldable subgraphs stay numpy
constants, and each remaining node goes to its registered translator. Every node that cannot be lowered is
collected, and the walk ends with one :class:`~edgeq.errors.CompileError` that lists them all.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import onnx
from coremltools.converters.mil import Builder as mb
from coremltools.converters.mil.mil import Function, Program, Var, types
from onnx import TensorProto, numpy_helper

from edgeq.backends import coreml_ops, coreml_ops_math, coreml_ops_tensor, coreml_quant  # noqa: F401 (registry)
from edgeq.backends.coreml_context import (
    MISSING,
    TRANSLATORS,
    LoweringContext,
    NodeUnsupported,
    can_fold,
    fold_node,
)
from edgeq.backends.coreml_quant import CompressedWeight
from edgeq.errors import CompileError, UnsupportedModelError

logger = logging.getLogger(__name__)

_INPUT_TYPES = {TensorProto.FLOAT: types.fp32, TensorProto.FLOAT16: types.fp16, TensorProto.INT32: types.int32,
                TensorProto.INT64: types.int32}


@dataclass(frozen=True)
class TensorBinding:
    """How an ONNX graph input or output appears in the Core ML model."""

    onnx_name: str
    coreml_name: str
    shape: tuple[int, ...]
    onnx_dtype: str  # numpy dtype name, e.g. "float32", "int64"
    coreml_dtype: str  # MIL dtype name, e.g. "fp32", "int32"


@dataclass(frozen=True)
class LoweredProgram:
    """A MIL program plus what the lowering learned on the way (for the package metadata and the report)."""

    program: Program
    inputs: tuple[TensorBinding, ...]
    outputs: tuple[TensorBinding, ...]
    weights: tuple[CompressedWeight, ...]
    activation_qdq: tuple[str, ...]  # QuantizeLinear nodes lowered to quantize/dequantize
    fp32_ops: frozenset[str]  # MIL op names to leave in float32 under fp16 compute precision
    notes: tuple[str, ...]


def default_opset(model: onnx.ModelProto) -> int:
    return next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 1)


def _static_shapes(graph: onnx.GraphProto, overrides: Mapping[str, Sequence[int]]) -> dict[str, tuple[int, ...]]:
    initializers = {init.name for init in graph.initializer}
    runtime = [inp for inp in graph.input if inp.name not in initializers]
    unknown = sorted(set(overrides) - {inp.name for inp in runtime})
    if unknown:
        raise UnsupportedModelError(f"input_shapes names {unknown} are not graph inputs; the inputs are "
                                    f"{[inp.name for inp in runtime]}")
    shapes, dynamic = {}, []
    for inp in runtime:
        dims = [d.dim_value if d.HasField("dim_value") else (d.dim_param or "?")
                for d in inp.type.tensor_type.shape.dim]
        if inp.name in overrides:
            shape = tuple(int(d) for d in overrides[inp.name])
            clash = len(shape) != len(dims) or any(isinstance(d, int) and d != s for d, s in zip(dims, shape))
            if clash or min(shape, default=1) <= 0:
                raise UnsupportedModelError(f"input_shapes[{inp.name!r}] = {list(shape)} does not fit the model's "
                                            f"input shape {dims}")
            shapes[inp.name] = shape
        elif not inp.type.tensor_type.HasField("shape") or any(not isinstance(d, int) or d <= 0 for d in dims):
            dynamic.append((inp.name, dims))
        else:
            shapes[inp.name] = tuple(dims)
    if dynamic:
        listed = "; ".join(f"{name!r} has shape {dims}" for name, dims in dynamic)
        fixed = {name: tuple(d if isinstance(d, int) and d > 0 else 1 for d in dims) for name, dims in dynamic}
        flags = " ".join(f"--input-shape {name}={','.join(map(str, shape))}" for name, shape in fixed.items())
        raise UnsupportedModelError(f"Core ML lowering needs static input shapes, but {listed}. Give the shapes "
                                    f"to compile for, e.g. {flags} (Python: input_shapes={fixed})")
    return shapes


def _is_mixed_precision(graph: onnx.GraphProto) -> bool:
    """True when the ONNX model already computes in float16 somewhere: its float32 parts are then deliberate."""
    typed = list(graph.input) + list(graph.value_info) + list(graph.output)
    return (any(v.type.tensor_type.elem_type == TensorProto.FLOAT16 for v in typed)
            or any(init.data_type == TensorProto.FLOAT16 for init in graph.initializer))


def _np_dtype_name(elem_type: int) -> str:
    return np.dtype(onnx.helper.tensor_dtype_to_np_dtype(elem_type)).name


def lower_model(model: onnx.ModelProto, *, target, target_level: int, fp32_ops: Sequence[str] = (),
                input_shapes: Mapping[str, Sequence[int]] | None = None) -> LoweredProgram:
    """Build the MIL program for ``model`` (see :func:`edgeq.backends.coreml.lower_to_mil`)."""
    graph = model.graph
    ctx = LoweringContext(opset=default_opset(model), target_level=target_level)
    for init in graph.initializer:
        ctx.values[init.name] = numpy_helper.to_array(init)
    shapes = _static_shapes(graph, input_shapes or {})
    specs, inputs = {}, []
    for inp in graph.input:
        if inp.name not in shapes:
            continue
        elem = inp.type.tensor_type.elem_type
        if elem not in _INPUT_TYPES:
            raise UnsupportedModelError(f"input {inp.name!r} has type {_np_dtype_name(elem)}; Core ML inputs "
                                        "must be float32, float16 or int32/int64")
        name = ctx.reserve(inp.name)
        specs[name] = mb.TensorSpec(shape=shapes[inp.name], dtype=_INPUT_TYPES[elem])
        inputs.append(TensorBinding(inp.name, name, shapes[inp.name], _np_dtype_name(elem),
                                    types.builtin_to_string(_INPUT_TYPES[elem])))
    for out in graph.output:
        ctx.reserve(out.name)
    mixed = _is_mixed_precision(graph)
    keep_fp32: set[str] = set()
    problems: list[str] = []
    with Function(specs, opset_version=target) as func:
        for binding in inputs:
            ctx.values[binding.onnx_name] = func.inputs[binding.coreml_name]
        for node in graph.node:
            before = len(func.operations)
            _lower_node(ctx, node, problems)
            if node.op_type in fp32_ops or (node.name and node.name in fp32_ops) or (
                    mixed and isinstance(ctx.values.get(node.output[0]), Var)
                    and ctx.values[node.output[0]].dtype == types.fp32):
                keep_fp32.update(_newest_op_names(func, len(func.operations) - before))
        if problems:
            raise CompileError(f"Core ML cannot lower {len(problems)} node(s):\n" + "\n".join(problems)
                               + "\nReplace these nodes in the ONNX model, or compile for another target.")
        outputs, out_bindings = _outputs(ctx, graph)
        func.set_outputs(outputs)
    program = Program()
    program.add_function("main", func)
    return LoweredProgram(program, tuple(inputs), tuple(out_bindings), tuple(ctx.weights),
                          tuple(ctx.activation_qdq), frozenset(keep_fp32), tuple(ctx.notes))


def _newest_op_names(func: Function, count: int) -> list[str]:
    names = []
    for op in reversed(func.operations):  # a linked list: walk back from the end, never slice
        if len(names) == count:
            break
        names.append(op.name)
    return names


def _describe(node: onnx.NodeProto) -> str:
    return f"  - {node.op_type} {node.name or node.output[0]!r}"


def _lower_node(ctx: LoweringContext, node: onnx.NodeProto, problems: list[str]) -> None:
    ctx.node = node
    undefined = [name for name in node.input if name and name not in ctx.values]
    if undefined:
        raise CompileError(f"node {node.name or node.op_type!r} reads {undefined}, which nothing defines "
                           "(is the graph topologically sorted?)")
    inputs = [ctx.values[name] if name else None for name in node.input]
    known = node.domain in ("", "ai.onnx") and node.op_type in TRANSLATORS
    if any(v is MISSING for v in inputs):
        if not known:
            problems.append(f"{_describe(node)}: no Core ML lowering for this op")
        _set_outputs(ctx, node, [MISSING] * len(node.output))
        return
    if can_fold(node) and all(v is None or isinstance(v, np.ndarray) for v in inputs):
        try:
            _set_outputs(ctx, node, fold_node(node, inputs, ctx.opset))
            return
        except Exception as exc:  # noqa: BLE001 - the reference evaluator's own failure is reported below
            logger.debug("constant folding %s failed: %s", node.name, exc)
            if not known:
                problems.append(f"{_describe(node)}: could not be constant-folded ({exc})")
                _set_outputs(ctx, node, [MISSING] * len(node.output))
                return
    if not known:
        problems.append(f"{_describe(node)}: no Core ML lowering for this op")
        _set_outputs(ctx, node, [MISSING] * len(node.output))
        return
    try:
        result = TRANSLATORS[node.op_type](ctx, node)
    except NodeUnsupported as exc:
        problems.append(f"{_describe(node)}: {exc}")
        result = [MISSING] * len(node.output)
    except (ValueError, TypeError) as exc:  # the MIL builder's own checks (ranks, dtypes, shapes)
        logger.debug("MIL builder rejected %s", node.name, exc_info=True)
        problems.append(f"{_describe(node)}: Core ML rejected it ({exc})")
        result = [MISSING] * len(node.output)
    _set_outputs(ctx, node, result if isinstance(result, (tuple, list)) else [result])


def _set_outputs(ctx: LoweringContext, node: onnx.NodeProto, values) -> None:
    for name, value in zip(node.output, values):
        if name:
            ctx.values[name] = value


def _outputs(ctx: LoweringContext, graph: onnx.GraphProto):
    outputs, bindings, used = [], [], set()
    for out in graph.output:
        value = ctx.values[out.name]
        if isinstance(value, np.ndarray):
            raise CompileError(f"graph output {out.name!r} is a constant; Core ML models cannot output constants")
        ctx.node = onnx.helper.make_node("Identity", [out.name], [out.name])
        var = ctx.var(value)
        name = ctx.out_name()
        if var.dtype == types.bool:
            var = mb.cast(x=var, dtype="int32", name=name)
        elif var.name != name or id(var) in used or var.op is None:
            var = mb.identity(x=var, name=name)
        used.add(id(var))
        outputs.append(var)
        elem = out.type.tensor_type.elem_type
        bindings.append(TensorBinding(out.name, name, tuple(int(d) for d in var.shape),
                                      _np_dtype_name(elem) if elem else "float32",
                                      types.builtin_to_string(var.dtype)))
    return outputs, bindings
