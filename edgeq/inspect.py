"""``edgeq inspect``: what a model contains and which tensors are quantized (dtype, granularity)."""

from __future__ import annotations

import math
from collections import Counter
from pathlib import Path

import onnx

from edgeq.model_io import default_opset, load_model, model_size_bytes

_TYPE_NAMES = {v: k.lower() for k, v in onnx.TensorProto.DataType.items()}


def _shape(vi: onnx.ValueInfoProto) -> list:
    return [d.dim_value if d.HasField("dim_value") else (d.dim_param or "?") for d in vi.type.tensor_type.shape.dim]


def quantized_tensors(model: onnx.ModelProto) -> list[dict]:
    """One entry per DequantizeLinear: the tensor it restores, dtype, granularity and what it feeds."""
    inits = {i.name: i for i in model.graph.initializer}
    consts = {n.output[0]: n.attribute[0].t for n in model.graph.node if n.op_type == "Constant" and n.attribute}
    producers = {o: n for n in model.graph.node for o in n.output}
    out = []
    for node in model.graph.node:
        if node.op_type != "DequantizeLinear":
            continue
        src = node.input[0]
        attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
        scale = inits.get(node.input[1]) if len(node.input) > 1 else None
        scale = scale if scale is not None else consts.get(node.input[1]) if len(node.input) > 1 else None
        n_scales = 1
        if scale is not None:
            n_scales = math.prod(scale.dims)
        if src in inits or src in consts:
            kind, dtype = "weight", _TYPE_NAMES.get((inits.get(src) or consts.get(src)).data_type, "?")
        else:
            q = producers.get(src)
            kind = "activation"
            zp = node.input[2] if len(node.input) > 2 else None
            zt = inits.get(zp) if zp else None
            dtype = _TYPE_NAMES.get(zt.data_type, "?") if zt is not None else "uint8"
            src = q.input[0] if q is not None and q.op_type == "QuantizeLinear" else src
        if attrs.get("block_size"):
            gran = f"blockwise(axis={attrs.get('axis', 1)}, block={attrs['block_size']})"
        elif n_scales > 1:
            gran = f"per-channel(axis={attrs.get('axis', 1)})"
        else:
            gran = "per-tensor"
        out.append({"tensor": src, "kind": kind, "dtype": dtype, "granularity": gran})
    return out


def describe(path: str | Path) -> dict:
    model = load_model(path, check=False)
    g = model.graph
    inits = {i.name for i in g.initializer}
    ops = Counter(n.op_type if n.domain in ("", "ai.onnx") else f"{n.domain}.{n.op_type}" for n in g.node)
    q = quantized_tensors(model)
    return {
        "path": str(path), "size_bytes": model_size_bytes(path), "ir_version": model.ir_version,
        "opset": default_opset(model),
        "opsets": {imp.domain or "ai.onnx": imp.version for imp in model.opset_import},
        "producer": f"{model.producer_name} {model.producer_version}".strip(),
        "inputs": [{"name": i.name, "dtype": _TYPE_NAMES.get(i.type.tensor_type.elem_type, "?"), "shape": _shape(i)}
                   for i in g.input if i.name not in inits],
        "outputs": [{"name": o.name, "dtype": _TYPE_NAMES.get(o.type.tensor_type.elem_type, "?"), "shape": _shape(o)}
                    for o in g.output],
        "nodes": len(g.node), "initializers": len(g.initializer),
        "parameters": sum(int(__import__("numpy").prod(i.dims)) for i in g.initializer),
        "op_histogram": dict(ops.most_common()),
        "quantized": {"count": len(q),
                      "activations": sum(1 for x in q if x["kind"] == "activation"),
                      "weights": sum(1 for x in q if x["kind"] == "weight"),
                      "by_dtype": dict(Counter(f"{x['kind']} {x['dtype']} {x['granularity'].split('(')[0]}"
                                               for x in q)),
                      "tensors": q},
        "metadata": {p.key: p.value for p in model.metadata_props},
    }


def format_description(d: dict, *, all_tensors: bool = False) -> str:
    lines = [f"model      {d['path']} ({d['size_bytes'] / 1e6:.2f} MB, opset {d['opset']}, IR {d['ir_version']})",
             f"producer   {d['producer'] or '-'}",
             f"nodes      {d['nodes']}  initializers {d['initializers']}  parameters {d['parameters']:,}"]
    for kind in ("inputs", "outputs"):
        for i, t in enumerate(d[kind]):
            lines.append(f"{kind[:-1] if i == 0 else '':<10} {t['name']}: {t['dtype']} {t['shape']}")
    lines.append("ops        " + ", ".join(f"{k} x{v}" for k, v in d["op_histogram"].items()))
    qd = d["quantized"]
    if qd["count"]:
        lines.append(f"quantized  {qd['activations']} activation tensors, {qd['weights']} weights")
        for k, v in qd["by_dtype"].items():
            lines.append(f"           {k}: {v}")
        if all_tensors:
            for t in qd["tensors"]:
                lines.append(f"           {t['kind']:<10} {t['dtype']:<6} {t['granularity']:<28} {t['tensor']}")
    else:
        lines.append("quantized  none (float model)")
    return "\n".join(lines)
