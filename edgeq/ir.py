"""Helpers over onnx-graphsurgeon, edgeq's graph IR.

Passes work on a :class:`gs.Graph`. These helpers answer the questions every pass asks: is this tensor a constant,
who produces and consumes it, what is its dtype; and they convert between ``onnx.ModelProto`` and ``gs.Graph``
while keeping what graphsurgeon does not carry (metadata_props, producer, model doc string).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import onnx_graphsurgeon as gs

FLOAT_DTYPES = (np.float32, np.float16, np.float64)


def to_graph(model: onnx.ModelProto) -> gs.Graph:
    graph = gs.import_onnx(model)
    if any(t.data_location == onnx.TensorProto.EXTERNAL for t in model.graph.initializer):
        from edgeq.large_model import attach_external

        # lazy models carry absolute locations (edgeq.model_io.load_model without external data)
        attach_external(graph, Path("/"))
    return graph


def narrow_constant(name: str, values: np.ndarray, dtype: str) -> gs.Constant:
    """A constant stored in a type numpy lacks (int4, uint4, float8): ``values`` hold it in int8/float32 and
    :func:`to_model` writes the packed tensor (onnx-graphsurgeon cannot export these types itself)."""
    c = gs.Constant(name, np.asarray(values))
    c.edgeq_narrow_dtype = dtype
    return c


def to_model(graph: gs.Graph, template: onnx.ModelProto | None = None) -> onnx.ModelProto:
    graph.cleanup(remove_unused_graph_inputs=False).toposort()
    narrow = {t.name: t for t in graph.tensors().values()
              if isinstance(t, gs.Constant) and getattr(t, "edgeq_narrow_dtype", None)}
    model = gs.export_onnx(graph, do_type_check=False)
    if narrow:
        from onnx import numpy_helper

        from edgeq.quant_math import narrow_numpy_dtype

        for i, init in enumerate(model.graph.initializer):
            c = narrow.get(init.name)
            if c is not None:
                values = np.asarray(c.values).astype(narrow_numpy_dtype(c.edgeq_narrow_dtype))
                model.graph.initializer[i].CopyFrom(numpy_helper.from_array(values, init.name))
    if template is not None:
        model.ir_version = max(model.ir_version, template.ir_version)
        model.producer_name = template.producer_name or "edgeq"
        model.producer_version = template.producer_version
        model.model_version = template.model_version
        model.doc_string = template.doc_string
        model.domain = template.domain
        del model.metadata_props[:]
        model.metadata_props.extend(template.metadata_props)
        have = {imp.domain for imp in model.opset_import}
        for imp in template.opset_import:
            if imp.domain not in have:
                model.opset_import.append(imp)
    return model


def quiet_onnxruntime() -> None:
    """ONNX Runtime's graph-optimiser warnings (on float16 graphs, or when graphsurgeon folds constants with it) are
    not the user's concern."""
    try:
        import onnxruntime
    except ImportError:
        return
    onnxruntime.set_default_logger_severity(3)


def is_constant(t: gs.Tensor) -> bool:
    return isinstance(t, gs.Constant)


def has_const_value(t: gs.Tensor) -> bool:
    """Whether :func:`const_value` would find a value (without reading it: weights may be on disk)."""
    if isinstance(t, gs.Constant):
        return True
    return len(t.inputs) == 1 and t.inputs[0].op == "Constant" and \
        isinstance(t.inputs[0].attrs.get("value"), gs.Constant)


def const_value(t: gs.Tensor) -> np.ndarray | None:
    """The value of a constant tensor (initializer or Constant node output), else None. A weight kept on disk
    (models over the large-model size) is read each time and not kept, so looking at it costs no memory."""
    if isinstance(t, gs.Constant):
        from edgeq.large_model import ExternalValues

        if isinstance(t._values, ExternalValues):
            return t._values.load()
        return np.asarray(t.values)
    if len(t.inputs) == 1 and t.inputs[0].op == "Constant":
        attr = t.inputs[0].attrs.get("value")
        if isinstance(attr, gs.Constant):
            return np.asarray(attr.values)
    return None


def tensor_dtype(t: gs.Tensor):
    if isinstance(t, gs.Constant):
        return np.asarray(t.values).dtype if not hasattr(t.values, "dtype") else np.dtype(t.values.dtype)
    if t.dtype is None:
        return None
    try:
        return np.dtype(t.dtype)
    except TypeError:
        return None


def is_float(t: gs.Tensor) -> bool:
    dt = tensor_dtype(t)
    return dt is not None and dt in (np.dtype(np.float32), np.dtype(np.float16), np.dtype(np.float64))


def producer(t: gs.Tensor) -> gs.Node | None:
    return t.inputs[0] if t.inputs else None


def consumers(t: gs.Tensor) -> list[gs.Node]:
    return list(t.outputs)


def node_label(node: gs.Node) -> str:
    return f"{node.op} {node.name or '<unnamed>'}"


def name_nodes(graph: gs.Graph) -> None:
    """Give every node a unique name (passes and reports refer to nodes by name)."""
    seen: set[str] = set()
    for i, node in enumerate(graph.nodes):
        name = node.name or f"{node.op}_{i}"
        while name in seen:
            name = f"{name}_{i}"
        node.name = name
        seen.add(name)


def unique_name(graph: gs.Graph, base: str) -> str:
    taken = graph.tensors().keys() | {n.name for n in graph.nodes}
    if base not in taken:
        return base
    i = 1
    while f"{base}_{i}" in taken:
        i += 1
    return f"{base}_{i}"


def opset(graph: gs.Graph) -> int:
    return int(graph.opset)


def fold_static_shapes(graph: gs.Graph) -> int:
    """Replace ``Shape``/``Size`` of tensors with fully static shapes by constants; returns how many.

    Done here rather than by onnx-graphsurgeon's ``fold_shapes``, which ignores ``Shape``'s ``start``/``end``
    attributes (opset 15+) and folds ``Shape(x, start=1, end=2)`` to the whole shape.
    """
    folded = 0
    for node in list(graph.nodes):
        if node.op not in ("Shape", "Size") or not node.inputs or not node.outputs:
            continue
        shape = node.inputs[0].shape
        if shape is None or not all(isinstance(d, int) and d >= 0 for d in shape):
            continue
        if node.op == "Size":
            value = np.array(int(np.prod(shape, dtype=np.int64)), np.int64)
        else:
            rank = len(shape)
            start, end = int(node.attrs.get("start", 0)), int(node.attrs.get("end", rank))
            start, end = (min(max(v + rank if v < 0 else v, 0), rank) for v in (start, end))
            value = np.array(shape[start:end], np.int64)
        out = node.outputs[0]
        const = gs.Constant(unique_name(graph, f"{out.name}/folded"), value)
        for consumer in list(out.outputs):
            for i, t in enumerate(consumer.inputs):
                if t is out:
                    consumer.inputs[i] = const
        graph.outputs = [const if t is out else t for t in graph.outputs]
        node.outputs.clear()
        node.inputs.clear()
        folded += 1
    if folded:
        graph.cleanup(remove_unused_graph_inputs=False)
    return folded
