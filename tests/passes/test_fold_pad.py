"""fold_pad: zero Pad nodes folded into the Conv that reads them (exact), and the cases it must skip."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

from conftest import init, run_ort
from edgeq.ir import to_graph, to_model
from edgeq.pass_base import PassContext, make_pass


def _model(*, opset=13, mode="constant", value=None, pads=(0, 0, 1, 2, 0, 0, 2, 1), axes=None, conv_pads=(1, 0, 1, 0),
           extra_consumer=False, auto_pad=None, attr_form=False) -> onnx.ModelProto:
    rng = np.random.default_rng(0)
    inits = [init("w", rng.normal(size=(4, 3, 3, 3)).astype(np.float32)),
             init("b", rng.normal(size=4).astype(np.float32))]
    if attr_form:
        pad = helper.make_node("Pad", ["x"], ["p"], name="pad", mode=mode, pads=list(pads), value=value or 0.0)
    else:
        ins = ["x", "pads"]
        inits.append(init("pads", np.array(pads, np.int64)))
        if value is not None or axes is not None:
            ins.append("value" if value is not None else "")
            if value is not None:
                inits.append(init("value", np.array(value, np.float32)))
        if axes is not None:
            ins.append("axes")
            inits.append(init("axes", np.array(axes, np.int64)))
        pad = helper.make_node("Pad", ins, ["p"], name="pad", mode=mode)
    conv_attrs = {"auto_pad": auto_pad} if auto_pad else {"pads": list(conv_pads)}
    nodes = [helper.make_node("Relu", ["x0"], ["x"], name="relu0"), pad,
             helper.make_node("Conv", ["p", "w", "b"], ["y"], name="conv", **conv_attrs)]
    outputs = [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)]
    if extra_consumer:
        nodes.append(helper.make_node("Relu", ["p"], ["r"], name="relu"))
        outputs.append(helper.make_tensor_value_info("r", TensorProto.FLOAT, None))
    g = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x0", TensorProto.FLOAT, [1, 3, 9, 8])], outputs,
                          inits)
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", opset)])


def _fold(model):
    graph = to_graph(model)
    result = make_pass("fold_pad").run(graph, PassContext())
    return to_model(graph, model), result


@pytest.mark.parametrize("kwargs", [
    {},
    {"value": 0.0},
    {"opset": 18, "axes": [2, 3], "pads": (1, 2, 2, 1)},
    {"opset": 18, "axes": [-1], "pads": (2, 3)},
    {"opset": 10, "attr_form": True},
])
def test_zero_pad_is_folded_into_the_conv_exactly(kwargs):
    model = _model(**kwargs)
    out, result = _fold(model)
    assert result.changed and result.rewrites == 1
    assert [n.op_type for n in out.graph.node] == ["Relu", "Conv"]
    conv = out.graph.node[1]
    assert conv.input[0] == "x"
    x = np.random.default_rng(1).normal(size=(1, 3, 9, 8)).astype(np.float32)
    np.testing.assert_allclose(run_ort(out, {"x0": x})[0], run_ort(model, {"x0": x})[0], rtol=1e-5, atol=1e-5)


def test_pads_add_to_the_convs_own():
    out, _ = _fold(_model())
    pads = next(a.ints for a in out.graph.node[1].attribute if a.name == "pads")
    assert list(pads) == [2, 2, 3, 1]  # Conv (1, 0, 1, 0) + Pad spatial begins (1, 2) and ends (2, 1)


@pytest.mark.parametrize("kwargs, reason", [
    ({"mode": "reflect"}, "mode 'reflect' is not zero padding"),
    ({"value": 1.5}, "pads with a non-zero (or non-constant) value"),
    ({"pads": (0, 1, 0, 0, 0, 1, 0, 0)}, "pads are not constant, or pad the batch/channel axes, or are negative"),
    ({"pads": (0, 0, -1, 0, 0, 0, 0, 0)}, "pads are not constant, or pad the batch/channel axes, or are negative"),
    ({"auto_pad": "SAME_UPPER"}, "Conv conv uses auto_pad"),
])
def test_skips_what_is_not_zero_spatial_padding(kwargs, reason):
    out, result = _fold(_model(**kwargs))
    assert not result.changed and "Pad" in [n.op_type for n in out.graph.node]
    assert [(s.target, s.reason) for s in result.skipped] == [("Pad pad", reason)]


def test_a_pad_also_read_by_other_ops_is_not_a_candidate():
    out, result = _fold(_model(extra_consumer=True))
    assert not result.changed and not result.skipped


def test_quantized_conv_chain_fuses_into_qlinearconv_without_a_float_pad(tmp_path):
    """EfficientNet-style Conv -> Clip -> Pad -> Conv -> Relu: with the Pad folded, ONNX Runtime runs both Convs as
    QLinearConv and nothing in float between them (without the fold: a float Pad, Clip and Conv)."""
    import onnxruntime as ort

    from edgeq.api import quantize

    rng = np.random.default_rng(2)
    inits = [init("w1", rng.normal(size=(8, 3, 3, 3)).astype(np.float32)),
             init("w2", rng.normal(size=(8, 1, 3, 3)).astype(np.float32)),
             init("pads", np.array([0, 0, 1, 1, 0, 0, 1, 1], np.int64)),
             init("lo", np.array(0.0, np.float32)), init("hi", np.array(6.0, np.float32))]
    nodes = [helper.make_node("Conv", ["x", "w1"], ["c1"], name="c1", pads=[1, 1, 1, 1]),
             helper.make_node("Clip", ["c1", "lo", "hi"], ["r1"], name="relu6"),
             helper.make_node("Pad", ["r1", "pads"], ["p"], name="pad"),
             helper.make_node("Conv", ["p", "w2"], ["d"], name="dw", group=8),
             helper.make_node("Relu", ["d"], ["y"], name="relu")]
    g = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 16, 16])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 8, 16, 16])], inits)
    model, calib = tmp_path / "m.onnx", tmp_path / "calib.npz"
    onnx.save(helper.make_model(g, opset_imports=[helper.make_opsetid("", 13)]), str(model))
    np.savez(calib, x=rng.normal(size=(8, 3, 16, 16)).astype(np.float32))
    quantize(model, target="ort-cpu", calib=calib, output=tmp_path / "q.onnx")
    so = ort.SessionOptions()
    so.optimized_model_filepath = str(tmp_path / "opt.onnx")
    ort.InferenceSession(str(tmp_path / "q.onnx"), so, providers=["CPUExecutionProvider"])
    ops = [n.op_type for n in onnx.load(str(tmp_path / "opt.onnx")).graph.node]
    assert ops.count("QLinearConv") == 2 and "Pad" not in ops and "Conv" not in ops
