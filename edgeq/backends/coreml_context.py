"""State shared by the ONNX → Core ML MIL translators, and the graph walk that drives them.

A lowered ONNX tensor is one of three things:

* a ``numpy.ndarray`` — known when the package is built (initializers, ``Constant`` nodes, folded shape
  arithmetic: every ``Shape`` of a tensor is static here);
* a :class:`~edgeq.backends.coreml_quant.QuantizedWeight` — a constant integer weight behind a
  ``DequantizeLinear``; it becomes a ``constexpr_*`` op (compressed storage) the moment an op needs it;
* a MIL ``Var`` — computed at run time.

Translators register themselves with :func:`translates`; they return the node's output value(s) or raise
:class:`NodeUnsupported`, which the walk collects so that one error names every node Core ML cannot take.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

import numpy as np
import onnx
from coremltools.converters.mil import Builder as mb
from coremltools.converters.mil.mil import Var, types
from onnx import helper
from onnx.reference import ReferenceEvaluator

# Ops that must never be constant-folded: weight DequantizeLinear stays compressed, random ops are not constants.
_NEVER_FOLD = {"DequantizeLinear", "RandomNormal", "RandomUniform", "RandomNormalLike", "RandomUniformLike",
               "Multinomial", "Bernoulli"}

TRANSLATORS: dict[str, Callable[[LoweringContext, onnx.NodeProto], object]] = {}


def translates(*op_types: str):
    """Register a translator for the given ONNX op types (default domain)."""

    def register(fn):
        for op_type in op_types:
            TRANSLATORS[op_type] = fn
        return fn

    return register


class NodeUnsupported(Exception):
    """This node (or this use of its attributes) has no Core ML lowering; the message says why."""


class _Missing:
    """Placeholder for outputs of nodes that could not be lowered; nodes that consume it are skipped."""


MISSING = _Missing()


def sanitize(name: str) -> str:
    """A MIL-safe identifier (Core ML renames anything else, which would break name-based matching)."""
    clean = re.sub(r"[^A-Za-z0-9_]", "_", name) or "_"
    return f"_{clean}" if clean[0].isdigit() else clean


def mil_dtype_of(array: np.ndarray):
    """The MIL builtin type a numpy constant becomes (int64 narrows to int32: Core ML has no int64 tensors)."""
    if array.dtype == np.bool_:
        return types.bool
    if array.dtype == np.float16:
        return types.fp16
    if np.issubdtype(array.dtype, np.floating):
        return types.fp32
    return types.int32


def to_mil_array(array: np.ndarray, like=None) -> np.ndarray:
    """Convert an ONNX-side constant to the dtype its MIL use needs (``like``: a Var or MIL type to match)."""
    array = np.asarray(array)
    target = like.dtype if isinstance(like, Var) else like
    if target is None:
        target = mil_dtype_of(array)
    if target == types.fp16:
        return array.astype(np.float16)
    if target == types.fp32:
        return array.astype(np.float32)
    if target == types.bool:
        return array.astype(np.bool_)
    if target in (types.int8, types.uint8, types.int16, types.uint16):
        return array.astype(types.nptype_from_builtin(target))
    info = np.iinfo(np.int32)
    if array.size and np.issubdtype(array.dtype, np.integer) and (array.min() < info.min or array.max() > info.max):
        raise NodeUnsupported(f"integer constant {array.min()}..{array.max()} does not fit Core ML's int32")
    return array.astype(np.int32)


@dataclass
class LoweringContext:
    """Values of ONNX tensors lowered so far, plus what the walk records for the result and the report."""

    opset: int
    target_level: int  # 16, 17 or 18: the iOS version whose MIL opset the program uses
    values: dict[str, object] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    weights: list[object] = field(default_factory=list)  # CompressedWeight records, in materialization order
    activation_qdq: list[str] = field(default_factory=list)  # ONNX QuantizeLinear nodes lowered to mb.quantize
    node: onnx.NodeProto | None = None
    _used_names: set[str] = field(default_factory=set)
    _reserved: dict[str, str] = field(default_factory=dict)
    _attrs: dict[str, object] = field(default_factory=dict)

    # -- names -------------------------------------------------------------------------------------------
    def reserve(self, onnx_name: str) -> str:
        """Reserve the MIL name of a graph input or output, so internal ops never take it."""
        name = self.unique_name(sanitize(onnx_name))
        self._reserved[onnx_name] = name
        return name

    def unique_name(self, base: str) -> str:
        """``base``, or ``base_1``, ``base_2``... if a MIL op already has that name."""
        name, k = base, 1
        while name in self._used_names:
            name, k = f"{base}_{k}", k + 1
        self._used_names.add(name)
        return name

    def out_name(self, index: int = 0) -> str:
        """Name for the op that produces output ``index`` of the current node (its ONNX tensor name)."""
        onnx_name = self.node.output[index]
        if onnx_name in self._reserved:
            return self._reserved[onnx_name]
        return self.unique_name(sanitize(onnx_name))

    def tmp_name(self, tag: str) -> str:
        """Name for a helper op of the current node."""
        return self.unique_name(f"{sanitize(self.node.output[0])}__{tag}")

    # -- attributes and inputs -----------------------------------------------------------------------------
    def attr(self, name: str, default=None):
        for attribute in self.node.attribute:
            if attribute.name == name:
                value = helper.get_attribute_value(attribute)
                return value.decode() if isinstance(value, bytes) else value
        return default

    def has_input(self, index: int) -> bool:
        return len(self.node.input) > index and bool(self.node.input[index])

    def value(self, index: int):
        return self.values[self.node.input[index]] if self.has_input(index) else None

    def const(self, index: int, what: str) -> np.ndarray:
        """Input ``index`` as a numpy constant, or NodeUnsupported naming ``what`` it is."""
        value = self.value(index)
        if not isinstance(value, np.ndarray):
            raise NodeUnsupported(f"{what} ({self.node.input[index]!r}) must be a constant for Core ML")
        return value

    def optional_const(self, index: int, what: str) -> np.ndarray | None:
        return self.const(index, what) if self.has_input(index) else None

    def var(self, value, like=None) -> Var:
        """A MIL Var for ``value``: constants become ``const`` ops, compressed weights ``constexpr_*`` ops."""
        from edgeq.backends.coreml_quant import QuantizedWeight

        if isinstance(value, Var):
            return value
        if isinstance(value, QuantizedWeight):
            return value.materialize(self)
        return mb.const(val=to_mil_array(value, like), name=self.unique_name("const"))

    def input_var(self, index: int, like=None) -> Var:
        return self.var(self.value(index), like)

    def first_var(self, values: Iterable[object]) -> Var | None:
        return next((v for v in values if isinstance(v, Var)), None)

    def note(self, message: str) -> None:
        self.notes.append(message)


def shape_of(value) -> tuple[int, ...]:
    from edgeq.backends.coreml_quant import QuantizedWeight

    if isinstance(value, Var):
        return tuple(int(d) for d in value.shape)
    if isinstance(value, QuantizedWeight):
        return value.shape
    return tuple(np.shape(value))


def rank_of(value) -> int:
    return len(shape_of(value))


def fold_node(node: onnx.NodeProto, inputs: list[np.ndarray | None], opset: int) -> list[np.ndarray]:
    """Evaluate a node whose inputs are all constants with ONNX's reference implementation."""
    names = [f"in{i}" if name else "" for i, name in enumerate(node.input)]
    clone = helper.make_node(node.op_type, names, [f"out{i}" for i in range(len(node.output))],
                             domain=node.domain or None)
    clone.attribute.extend(node.attribute)
    evaluator = ReferenceEvaluator(clone, opsets={"": opset})
    feeds = {name: value for name, value in zip(names, inputs) if name}
    return [np.asarray(out) for out in evaluator.run(None, feeds)]


def can_fold(node: onnx.NodeProto) -> bool:
    return (node.op_type not in _NEVER_FOLD and node.domain in ("", "ai.onnx")
            and not any(a.type in (onnx.AttributeProto.GRAPH, onnx.AttributeProto.GRAPHS) for a in node.attribute))
