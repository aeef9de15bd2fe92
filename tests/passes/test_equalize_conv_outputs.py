"""equalize_conv_outputs: a Conv output quantized only for QLinearConv and read in float gets even channel ranges;
exact in float, closer to FP32 after ort-cpu quantization, left alone where its readers are quantized."""

from __future__ import annotations

import dataclasses

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from conftest import run_ort
from edgeq import api
from edgeq.api import canonicalize
from edgeq.calibration.calibrate import calibrate
from edgeq.errors import ProfileError
from edgeq.ir import to_graph, to_model
from edgeq.metrics import sqnr_db
from edgeq.pass_base import PassContext, make_pass
from edgeq.profiles import load_profile

CI, CO, L = 8, 16, 64


def _model(reader="gelu"):
    """x -> Conv1d(8->8, k1, the stem) -> conv (8->16, k3; four output channels 10x larger) -> reader -> Conv1d.
    ``reader``: "gelu" (x * sigmoid(1.702 x), read in float), "relu" (fused into QLinearConv) or "output"."""
    rng = np.random.default_rng(0)
    w = rng.normal(size=(CO, CI, 3)) / np.sqrt(3 * CI)
    w[[1, 5, 9, 12]] *= 10.0
    inits = {"w0": rng.normal(size=(CI, CI, 1)), "w": w, "b": rng.normal(size=CO) * 0.1, "k": np.array(1.702),
             "w2": rng.normal(size=(4, CO, 1)) / np.sqrt(CO)}
    inits["w2"][:, [1, 5, 9, 12]] /= 10.0  # the large channels carry no more signal downstream
    nodes = [helper.make_node("Conv", ["x", "w0"], ["x0"], name="stem"),
             helper.make_node("Conv", ["x0", "w", "b"], ["y"], name="conv", pads=[1, 1])]
    outputs = [helper.make_tensor_value_info("z", TensorProto.FLOAT, [1, 4, L])]
    if reader == "gelu":
        nodes += [helper.make_node("Mul", ["y", "k"], ["yk"]), helper.make_node("Sigmoid", ["yk"], ["sg"]),
                  helper.make_node("Mul", ["y", "sg"], ["a"])]
    elif reader == "relu":
        nodes.append(helper.make_node("Relu", ["y"], ["a"]))
    else:
        nodes.append(helper.make_node("Identity", ["y"], ["a"]))
        outputs.append(helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, CO, L]))
    nodes.append(helper.make_node("Conv", ["a", "w2"], ["z"], name="conv2"))
    g = helper.make_graph(nodes, "eq", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, CI, L])], outputs,
                          [numpy_helper.from_array(np.asarray(v, np.float32), k) for k, v in inits.items()])
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    m.ir_version = 8
    return onnx.shape_inference.infer_shapes(m)


def _feeds(n, seed=0):
    rng = np.random.default_rng(seed)
    return [{"x": rng.normal(size=(1, CI, L)).astype(np.float32)} for _ in range(n)]


def _run_pass(model, **options):
    canon, _ = canonicalize(model)
    p = make_pass("equalize_conv_outputs", options)
    profile = load_profile("ort-cpu")
    stats = calibrate(canon, _feeds(6), per_channel=p.channel_tensors(canon, profile))
    graph = to_graph(canon)
    result = p.run(graph, PassContext(profile=profile, stats=stats))
    graph.cleanup().toposort()
    return to_model(graph, canon), result


def test_uneven_conv_output_read_in_float_is_equalized_exactly():
    model = _model()
    out, result = _run_pass(model)
    assert result.rewrites == 1 and result.notes["ratio"]["conv"] > 5
    prod = {o: n for n in out.graph.node for o in n.output}
    unscale = prod["y"]
    assert unscale.op_type == "Mul" and prod[unscale.input[0]].name == "conv"
    inits = {i.name: numpy_helper.to_array(i) for i in out.graph.initializer}
    s = inits[unscale.input[1]]
    assert s.shape == (CO, 1)
    assert s[[1, 5, 9, 12], 0].min() > 4 * np.delete(s[:, 0], [1, 5, 9, 12]).max()
    feed = _feeds(1, seed=3)[0]
    np.testing.assert_allclose(run_ort(out, feed)[0], run_ort(model, feed)[0], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("reader", ["relu", "output"])
def test_outputs_with_quantized_or_fused_readers_are_left_alone(reader):
    out, result = _run_pass(_model(reader))
    assert result.rewrites == 0
    assert not any(n.op_type == "Mul" for n in out.graph.node)


def test_even_channels_are_skipped_with_a_reason():
    _, result = _run_pass(_model(), min_ratio=50.0)
    assert result.rewrites == 0
    assert "even" in next(s.reason for s in result.skipped if s.target == "Conv conv")


def test_bad_options_are_profile_errors():
    with pytest.raises(ProfileError, match="alpha"):
        make_pass("equalize_conv_outputs", {"alpha": 0.0})


def test_ort_cpu_quantized_output_is_closer_to_fp32(tmp_path):
    model = _model()
    src = tmp_path / "m.onnx"
    onnx.save(model, str(src))
    profile = load_profile("ort-cpu")
    without = dataclasses.replace(profile, passes=tuple(p for p in profile.passes
                                                        if p.name != "equalize_conv_outputs"))
    evals = _feeds(4, seed=9)
    ref = np.concatenate([run_ort(model, f)[0] for f in evals])
    sqnr = {}
    for label, prof in (("with", profile), ("without", without)):
        dst = tmp_path / f"{label}.onnx"
        api.quantize(src, target=prof, calib=_feeds(8), output=dst, check=False)
        q = onnx.load(str(dst))
        conv = next(n for n in q.graph.node if n.name == "conv")
        readers = [n for n in q.graph.node if conv.output[0] in n.input]
        assert [n.op_type for n in readers] == ["QuantizeLinear"], "the Conv output keeps its Q for QLinearConv"
        sqnr[label] = sqnr_db(ref, np.concatenate([run_ort(q, f)[0] for f in evals]))
    assert sqnr["with"] > sqnr["without"] + 3.0, sqnr
