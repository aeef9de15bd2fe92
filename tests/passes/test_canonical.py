"""Canonicalisation passes: BatchNorm folding, Identity/Dropout removal, constant folding, shape inference."""

from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper

from conftest import init, make_cnn, run_ort
from edgeq.ir import to_graph, to_model
from edgeq.pass_base import PassContext, make_pass


def _apply(model: onnx.ModelProto, name: str, **opts):
    graph = to_graph(model)
    result = make_pass(name, opts).run(graph, PassContext())
    return to_model(graph, model), result


def test_fold_batchnorm_removes_bn_exactly():
    model = make_cnn()
    folded, result = _apply(model, "fold_batchnorm")
    ops = [n.op_type for n in folded.graph.node]
    assert "BatchNormalization" not in ops and result.rewrites == 2
    conv2 = next(n for n in folded.graph.node if n.name == "conv2")
    assert len(conv2.input) == 3, "BN folding must create a bias for a bias-less Conv"
    x = np.random.default_rng(0).normal(size=(1, 3, 8, 8)).astype(np.float32)
    np.testing.assert_allclose(run_ort(folded, {"x": x})[0], run_ort(model, {"x": x})[0], rtol=1e-5, atol=1e-5)


def test_fold_batchnorm_skips_bn_not_after_conv():
    rng = np.random.default_rng(0)
    c = 4
    nodes = [helper.make_node("Relu", ["x"], ["r"], name="relu"),
             helper.make_node("BatchNormalization", ["r", "s", "b", "m", "v"], ["y"], name="bn")]
    inits = [init("s", np.ones(c, np.float32)), init("b", np.zeros(c, np.float32)),
             init("m", rng.normal(size=c).astype(np.float32)), init("v", np.ones(c, np.float32))]
    g = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, c, 2, 2])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, c, 2, 2])], inits)
    model = helper.make_model(g, opset_imports=[helper.make_opsetid("", 13)])
    folded, result = _apply(model, "fold_batchnorm")
    assert [n.op_type for n in folded.graph.node] == ["Relu", "BatchNormalization"]
    assert result.skipped and "not preceded by" in result.skipped[0].reason


def test_fold_batchnorm_skips_shared_conv_output():
    model = make_cnn()
    # make conv1's output also a graph output: folding would change that output
    model.graph.output.append(helper.make_tensor_value_info("c1", TensorProto.FLOAT, None))
    folded, result = _apply(model, "fold_batchnorm")
    assert sum(n.op_type == "BatchNormalization" for n in folded.graph.node) == 1
    assert any("also used elsewhere" in s.reason for s in result.skipped)


def _identity_model():
    nodes = [helper.make_node("Identity", ["x"], ["i1"], name="id1"),
             helper.make_node("Relu", ["i1"], ["r"], name="relu"),
             helper.make_node("Dropout", ["r"], ["d"], name="drop"),
             helper.make_node("Identity", ["d"], ["y"], name="id_out")]
    g = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 3])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 3])])
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", 13)])


def test_remove_identity_keeps_output_names():
    model = _identity_model()
    out, result = _apply(model, "remove_identity")
    assert [n.op_type for n in out.graph.node] == ["Relu"]
    assert [o.name for o in out.graph.output] == ["y"]
    x = np.random.default_rng(0).normal(size=(2, 3)).astype(np.float32)
    np.testing.assert_array_equal(run_ort(out, {"x": x})[0], np.maximum(x, 0))


def test_remove_identity_skips_input_to_output_passthrough():
    g = helper.make_graph([helper.make_node("Identity", ["x"], ["y"], name="id")], "g",
                          [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2])])
    model = helper.make_model(g, opset_imports=[helper.make_opsetid("", 13)])
    out, result = _apply(model, "remove_identity")
    assert [n.op_type for n in out.graph.node] == ["Identity"]
    assert result.skipped and "graph input" in result.skipped[0].reason


def test_fold_constants_folds_shape_subgraph():
    nodes = [helper.make_node("Shape", ["x"], ["s"], name="shape"),
             helper.make_node("Reshape", ["x", "s"], ["y0"], name="reshape"),
             helper.make_node("Add", ["c1", "c2"], ["c3"], name="const_add"),
             helper.make_node("Mul", ["y0", "c3"], ["y"], name="mul")]
    g = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 3])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 3])],
                          [init("c1", np.float32(2.0)), init("c2", np.float32(3.0))])
    model = helper.make_model(g, opset_imports=[helper.make_opsetid("", 13)])
    out, result = _apply(model, "fold_constants")
    ops = [n.op_type for n in out.graph.node]
    assert "Shape" not in ops and "Add" not in ops and result.changed
    x = np.arange(6, dtype=np.float32).reshape(2, 3)
    np.testing.assert_allclose(run_ort(out, {"x": x})[0], x * 5.0)


def test_fold_constants_honours_shape_start_end():
    # onnx-graphsurgeon's own shape folding ignores start/end and would fold this Shape to [2, 5, 3]
    nodes = [helper.make_node("Shape", ["x"], ["s"], name="shape", start=1, end=-1),
             helper.make_node("Slice", ["table", "zero", "s", "zero"], ["rows"], name="rows"),
             helper.make_node("Add", ["x", "rows"], ["y"], name="add")]
    g = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 5, 3])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 5, 3])],
                          [init("table", np.arange(30, dtype=np.float32).reshape(10, 3)),
                           init("zero", np.array([0], np.int64))])
    model = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    out, _ = _apply(model, "fold_constants")
    assert "Shape" not in [n.op_type for n in out.graph.node]
    x = np.ones((2, 5, 3), np.float32)
    np.testing.assert_array_equal(run_ort(out, {"x": x})[0], run_ort(model, {"x": x})[0])


def test_infer_shapes_records_untyped_custom_op_outputs():
    nodes = [helper.make_node("MyOp", ["x"], ["c"], name="custom", domain="my.domain"),
             helper.make_node("Relu", ["c"], ["y"], name="relu")]
    g = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 3])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)])
    model = helper.make_model(g, opset_imports=[helper.make_opsetid("", 13), helper.make_opsetid("my.domain", 1)])
    graph = to_graph(model)
    result = make_pass("infer_shapes").run(graph, PassContext())
    assert any(s.target == "c" for s in result.skipped)
    assert result.notes["untyped_tensors"] >= 1
