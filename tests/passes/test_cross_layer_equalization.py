"""equalize_cross_layer: Conv -> Relu/identity -> Conv (incl. depthwise) equalised exactly; ReLU6 skipped."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper

from edgeq.ir import to_graph, to_model
from edgeq.pass_base import PassContext, make_pass
from edgeq.passes.fold_channel_scale import input_channel_absmax, output_channel_absmax, weight_of

RNG = np.random.default_rng(1)


def _mbconv(act="Relu", clip_max=None):
    """1x1 expand (ranges spread over 4 decades) -> act -> depthwise 3x3 -> act -> 1x1 project."""
    c, e = 4, 8
    spread = 10.0 ** RNG.uniform(-2, 2, (e, 1, 1, 1))
    inits = {"w1": RNG.normal(size=(e, c, 1, 1)) * spread, "b1": RNG.normal(size=e),
             "w2": RNG.normal(size=(e, 1, 3, 3)), "b2": RNG.normal(size=e), "w3": RNG.normal(size=(c, e, 1, 1))}
    nodes = [helper.make_node("Conv", ["x", "w1", "b1"], ["h1"])]
    def activation(i, o):
        if act is None:
            return helper.make_node("Transpose", [i], [o], perm=[0, 1, 2, 3])  # replaced below
        if act == "Clip":
            inits[f"lo{o}"], inits[f"hi{o}"] = np.array(0.0), np.array(clip_max)
            return helper.make_node("Clip", [i, f"lo{o}", f"hi{o}"], [o])
        return helper.make_node(act, [i], [o])
    nodes += [activation("h1", "a1"),
              helper.make_node("Conv", ["a1", "w2", "b2"], ["h2"], group=e, pads=[1, 1, 1, 1]),
              activation("h2", "a2"), helper.make_node("Conv", ["a2", "w3"], ["y"])]
    if act is None:  # direct Conv -> Conv
        nodes = [n for n in nodes if n.op_type != "Transpose"]
        for n in nodes:
            n.input[:] = [{"a1": "h1", "a2": "h2"}.get(t, t) for t in n.input]
    g = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, c, 6, 6])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, c, 6, 6])],
                          [numpy_helper.from_array(np.asarray(v, np.float32), k) for k, v in inits.items()])
    return onnx.shape_inference.infer_shapes(helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)]))


def _run(m, x):
    return ort.InferenceSession(m.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]


def _apply(m, **opts):
    g = to_graph(m)
    res = make_pass("equalize_cross_layer", opts).run(g, PassContext())
    return to_model(g, m), res


def _weights(m):
    return {i.name: numpy_helper.to_array(i) for i in m.graph.initializer}


def test_relu_chain_with_depthwise_is_exact_and_equalises_ranges():
    m = _mbconv()
    out, res = _apply(m)
    assert res.rewrites == 2 and [n.op_type for n in out.graph.node] == [n.op_type for n in m.graph.node]
    x = RNG.normal(size=(1, 4, 6, 6)).astype(np.float32)
    np.testing.assert_allclose(_run(out, x), _run(m, x), rtol=1e-5, atol=1e-5 * np.abs(_run(m, x)).max())
    # after equalisation the expand conv's output ranges meet the depthwise conv's ranges channel by channel
    def spread(model):
        conv = [n for n in to_graph(model).nodes if n.op == "Conv"][0]
        r = output_channel_absmax(conv, weight_of(conv))
        return np.log10(r.max() / r.min())
    assert spread(out) < 0.6 * spread(m)  # the 4-decade spread of the expand conv is roughly halved
    convs = [n for n in to_graph(out).nodes if n.op == "Conv"]
    r1 = output_channel_absmax(convs[0], weight_of(convs[0]))
    r2 = input_channel_absmax(convs[1], weight_of(convs[1]))
    assert np.abs(np.log10(r1 / r2)).max() < 0.5  # each channel: expand range ~ depthwise range


def test_identity_between_convs_is_exact():
    m = _mbconv(act=None)
    out, res = _apply(m, iterations=2)
    assert res.rewrites == 2
    x = RNG.normal(size=(1, 4, 6, 6)).astype(np.float32)
    ref = _run(m, x)
    np.testing.assert_allclose(_run(out, x), ref, rtol=1e-5, atol=1e-5 * np.abs(ref).max())


def test_relu6_clip_is_skipped_with_reason():
    m = _mbconv(act="Clip", clip_max=6.0)
    out, res = _apply(m)
    assert res.rewrites == 0 and not res.changed
    assert any("ReLU6" in s.reason for s in res.skipped)
    assert all(np.array_equal(v, _weights(m)[k]) for k, v in _weights(out).items() if k in _weights(m))


def test_relu6_becomes_relu_and_per_channel_min_when_asked():
    m = _mbconv(act="Clip", clip_max=6.0)
    out, res = _apply(m, bounded_clip="per_channel_min")
    assert res.rewrites == 2
    ops = [n.op_type for n in out.graph.node]
    assert "Clip" not in ops and ops.count("Min") == 2 and ops.count("Relu") == 2
    bound = next(i for i in out.graph.initializer if i.name.endswith("/bound"))
    assert list(numpy_helper.to_array(bound).shape) == [8, 1, 1] and np.ptp(numpy_helper.to_array(bound)) > 0
    x = (RNG.normal(size=(1, 4, 6, 6)) * 3).astype(np.float32)  # large enough that many values clip at 6
    ref = _run(m, x)
    np.testing.assert_allclose(_run(out, x), ref, rtol=1e-5, atol=1e-5 * np.abs(ref).max())
