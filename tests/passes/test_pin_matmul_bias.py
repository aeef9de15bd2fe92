"""pin_matmul_bias: a quantized MatMul + bias on a static 3-D input stays an integer kernel in ONNX Runtime."""

from __future__ import annotations

import dataclasses

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper

from conftest import run_ort
from edgeq import api
from edgeq.api import canonicalize
from edgeq.calibration.calibrate import calibrate
from edgeq.ir import to_graph, to_model
from edgeq.pass_base import PassContext, make_pass
from edgeq.profiles import load_profile


def _linear(rank=3, with_bias=True):
    rng = np.random.default_rng(0)
    shape = [1, 64, 48] if rank == 3 else [64, 48]
    nodes = [helper.make_node("MatMul", ["x", "w"], ["h"], name="fc")]
    inits = [numpy_helper.from_array(rng.normal(0, 0.2, (48, 40)).astype(np.float32), "w")]
    if with_bias:
        nodes.append(helper.make_node("Add", ["h", "b"], ["y"], name="bias"))
        inits.append(numpy_helper.from_array(rng.normal(0, 0.5, 40).astype(np.float32), "b"))
    out_shape = shape[:-1] + [40]
    g = helper.make_graph(nodes, "linear", [helper.make_tensor_value_info("x", TensorProto.FLOAT, shape)],
                          [helper.make_tensor_value_info("y" if with_bias else "h", TensorProto.FLOAT, out_shape)],
                          inits)
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    m.ir_version = 8
    return m


def _feeds(shape, n, seed=0):
    rng = np.random.default_rng(seed)
    return [{"x": rng.normal(0, 1, shape).astype(np.float32)} for _ in range(n)]


def _optimized_ops(model, tmp_path):
    so = ort.SessionOptions()
    so.log_severity_level = 3
    so.optimized_model_filepath = str(tmp_path / "optimized.onnx")
    ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])
    return [n.op_type for n in onnx.load(str(tmp_path / "optimized.onnx")).graph.node]


def test_quantized_matmul_with_bias_fuses_into_an_integer_kernel(tmp_path):
    model = _linear()
    src = tmp_path / "linear.onnx"
    onnx.save(model, str(src))
    profile = load_profile("ort-cpu")
    calib, feed = _feeds([1, 64, 48], 4), _feeds([1, 64, 48], 1, seed=7)[0]
    outs = {}
    for name, prof in (("with", profile), ("without", dataclasses.replace(
            profile, post_passes=tuple(p for p in profile.post_passes if p.name != "pin_matmul_bias")))):
        api.quantize(src, target=prof, calib=calib, output=tmp_path / f"{name}.onnx", check=False)
        outs[name] = onnx.load(str(tmp_path / f"{name}.onnx"))
    add = next(n for n in outs["with"].graph.node if n.op_type == "Add")
    bias = next(i for i in outs["with"].graph.initializer if i.name == add.input[1])
    assert list(bias.dims) == [1, 1, 40]
    # without the pass ONNX Runtime makes Reshape -> float Gemm -> Reshape of it; with it, an integer kernel
    without, with_ = _optimized_ops(outs["without"], tmp_path), _optimized_ops(outs["with"], tmp_path)
    assert "Gemm" in without and "MatMulIntegerToFloat" not in without
    assert "MatMulIntegerToFloat" in with_ and "Gemm" not in with_
    np.testing.assert_allclose(run_ort(outs["with"], feed)[0], run_ort(outs["without"], feed)[0], rtol=1e-4, atol=1e-4)


def test_two_dimensional_outputs_and_float_layers_are_skipped():
    profile = load_profile("ort-cpu")
    for model in (_linear(rank=2), _linear(with_bias=False)):
        graph = to_graph(model)
        result = make_pass("pin_matmul_bias").run(graph, PassContext(profile=profile))
        assert result.rewrites == 0  # float MatMul (no DequantizeLinear): nothing to keep fused
    # a 2-D quantized MatMul: the rank is why
    canon, _ = canonicalize(_linear(rank=2))
    graph = to_graph(canon)
    stats = calibrate(canon, _feeds([64, 48], 3))
    make_pass("insert_qdq").run(graph, PassContext(profile=profile, stats=stats))
    result = make_pass("pin_matmul_bias").run(graph, PassContext(profile=profile))
    assert result.rewrites == 0 and any("output rank 2" in s.reason for s in result.skipped)
    assert to_model(graph, _linear(rank=2)) is not None
