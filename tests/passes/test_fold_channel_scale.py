"""fold_channel_scale: per-channel Mul/Div by constants folded into Conv/MatMul/Gemm weights (exact)."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper

from edgeq.ir import to_graph, to_model
from edgeq.pass_base import PassContext, make_pass

RNG = np.random.default_rng(0)


def _model(nodes, inits, inp, out, opset=17):
    g = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, inp)],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, out)],
                          [numpy_helper.from_array(np.asarray(v, np.float32), k) for k, v in inits.items()])
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", opset)])
    return onnx.shape_inference.infer_shapes(m)


def _run(m, x):
    s = ort.InferenceSession(m.SerializeToString(), providers=["CPUExecutionProvider"])
    return s.run(None, {"x": x})[0]


def _fold(m):
    g = to_graph(m)
    res = make_pass("fold_channel_scale").run(g, PassContext())
    g.cleanup().toposort()
    return to_model(g, m), res


def _ops(m):
    return [n.op_type for n in m.graph.node]


def test_mul_after_conv_folds_into_conv_weights_and_bias():
    inits = {"w": RNG.normal(size=(8, 3, 3, 3)), "b": RNG.normal(size=8), "c": RNG.uniform(0.1, 5, (8, 1, 1))}
    m = _model([helper.make_node("Conv", ["x", "w", "b"], ["h"], pads=[1, 1, 1, 1]),
                helper.make_node("Mul", ["h", "c"], ["y"])], inits, [1, 3, 8, 8], [1, 8, 8, 8])
    x = RNG.normal(size=(1, 3, 8, 8)).astype(np.float32)
    folded, res = _fold(m)
    assert _ops(folded) == ["Conv"] and res.rewrites == 1
    np.testing.assert_allclose(_run(folded, x), _run(m, x), rtol=1e-5, atol=1e-5)


def test_div_before_grouped_conv_folds_into_input_channels():
    # preprocessing-style normalisation x / std feeding a grouped conv (2 groups); padding zeros stay zero
    inits = {"std": RNG.uniform(0.2, 3, (1, 4, 1, 1)), "w": RNG.normal(size=(6, 2, 3, 3))}
    m = _model([helper.make_node("Div", ["x", "std"], ["h"]),
                helper.make_node("Conv", ["h", "w"], ["y"], group=2, pads=[1, 1, 1, 1])],
               inits, [1, 4, 6, 6], [1, 6, 6, 6])
    x = RNG.normal(size=(1, 4, 6, 6)).astype(np.float32)
    folded, res = _fold(m)
    assert _ops(folded) == ["Conv"] and res.rewrites == 1
    np.testing.assert_allclose(_run(folded, x), _run(m, x), rtol=1e-5, atol=1e-5)


def test_mul_before_matmul_and_gemm_transposed():
    inits = {"c": RNG.uniform(0.5, 2, 5), "w": RNG.normal(size=(5, 4)), "w2": RNG.normal(size=(3, 5)),
             "b2": RNG.normal(size=3)}
    m = _model([helper.make_node("Mul", ["x", "c"], ["h"]),
                helper.make_node("MatMul", ["h", "w"], ["a"]),
                helper.make_node("Gemm", ["h", "w2", "b2"], ["g"], transB=1),
                helper.make_node("Concat", ["a", "g"], ["y"], axis=1)], inits, [2, 5], [2, 7])
    x = RNG.normal(size=(2, 5)).astype(np.float32)
    folded, res = _fold(m)
    assert "Mul" not in _ops(folded) and res.rewrites == 1
    np.testing.assert_allclose(_run(folded, x), _run(m, x), rtol=1e-5, atol=1e-5)


def test_skips_spatial_factor_and_nonlinear_consumer():
    inits = {"c": RNG.uniform(0.5, 2, (1, 1, 4, 4)), "w": RNG.normal(size=(2, 3, 1, 1)), "d": RNG.uniform(1, 2, 3)}
    m = _model([helper.make_node("Conv", ["x", "w"], ["h"]),
                helper.make_node("Mul", ["h", "c"], ["y0"]),  # varies over space: not per-channel
                helper.make_node("Relu", ["y0"], ["y"])], inits, [1, 3, 4, 4], [1, 2, 4, 4])
    folded, res = _fold(m)
    assert "Mul" in _ops(folded) and res.rewrites == 0
    assert any("not per output channel" in s.reason for s in res.skipped)
    assert any("Relu" in s.reason for s in res.skipped)
    x = RNG.normal(size=(1, 3, 4, 4)).astype(np.float32)
    np.testing.assert_allclose(_run(folded, x), _run(m, x), rtol=1e-6)


def test_skips_shared_producer_output():
    inits = {"w": RNG.normal(size=(4, 4)), "c": RNG.uniform(1, 2, 4)}
    m = _model([helper.make_node("MatMul", ["x", "w"], ["h"]),
                helper.make_node("Mul", ["h", "c"], ["m"]),
                helper.make_node("Add", ["m", "h"], ["y"])], inits, [2, 4], [2, 4])
    _, res = _fold(m)
    assert res.rewrites == 0 and any("also used elsewhere" in s.reason for s in res.skipped)
