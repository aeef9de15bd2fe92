"""insert_qdq's underflow guard: a tensor whose magnitude mostly lies below half a quantization step (attention
probabilities over a long axis) stays float (whole-graph targets: 16-bit), with the reason in the report."""

from __future__ import annotations

import dataclasses

import numpy as np
import onnx
from conftest import run_ort
from onnx import TensorProto, helper

from edgeq.api import canonicalize
from edgeq.calibration.calibrate import calibrate
from edgeq.ir import to_graph, to_model
from edgeq.metrics import sqnr_db
from edgeq.pass_base import PassContext, make_pass
from edgeq.profiles import load_profile


def _attention(keys: int, opset: int = 17) -> onnx.ModelProto:
    """scores [1, 4, keys] -> Softmax -> MatMul with values [1, keys, 8]."""
    nodes = [helper.make_node("Softmax", ["scores"], ["probs"], name="softmax", axis=-1),
             helper.make_node("MatMul", ["probs", "values"], ["out"], name="mix")]
    graph = helper.make_graph(nodes, "attention",
                              [helper.make_tensor_value_info("scores", TensorProto.FLOAT, [1, 4, keys]),
                               helper.make_tensor_value_info("values", TensorProto.FLOAT, [1, keys, 8])],
                              [helper.make_tensor_value_info("out", TensorProto.FLOAT, [1, 4, 8])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    model.ir_version = 10
    return model


def _samples(keys: int, n: int = 8, seed: int = 0) -> list[dict]:
    """Rows 0-1 attend to one key (probability near 1, so the range is [0, 1]); rows 2-3 spread over all keys."""
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        scores = rng.normal(0, 1, (1, 4, keys)).astype(np.float32)
        scores[0, :2, rng.integers(0, keys)] += 14.0
        out.append({"scores": scores, "values": rng.normal(0, 1, (1, keys, 8)).astype(np.float32)})
    return out


def _quantize(model, profile, samples):
    canon, _ = canonicalize(model)
    graph = to_graph(canon)
    result = make_pass("insert_qdq").run(graph, PassContext(profile=profile, stats=calibrate(canon, samples)))
    return to_model(graph, model), result


def _mix_input_producer(q: onnx.ModelProto) -> str:
    producers = {o: n for n in q.graph.node for o in n.output}
    mix = next(n for n in q.graph.node if n.name == "mix")
    return producers[mix.input[0]].op_type


def test_long_softmax_output_stays_float_with_reason():
    samples = _samples(1500)
    model = _attention(1500)
    guarded, result = _quantize(model, load_profile("tensorrt"), samples)
    assert _mix_input_producer(guarded) == "Softmax"
    reason = next(s.reason for s in result.skipped if s.target == "probs")
    assert "would round to zero" in reason and "kept in float" in reason and "max_underflow" in reason
    producers = {o: n for n in guarded.graph.node for o in n.output}
    mix = next(n for n in guarded.graph.node if n.name == "mix")
    assert producers[mix.input[1]].op_type == "DequantizeLinear"  # the values are still quantized

    off = dataclasses.replace(load_profile("tensorrt"), activations=dataclasses.replace(
        load_profile("tensorrt").activations, max_underflow=1.0))
    unguarded, _ = _quantize(model, off, samples)
    assert _mix_input_producer(unguarded) == "DequantizeLinear"

    held_out = _samples(1500, n=4, seed=1)
    ref = [run_ort(model, s)[0] for s in held_out]
    with_guard = np.mean([sqnr_db(r, run_ort(guarded, s)[0]) for r, s in zip(ref, held_out)])
    without = np.mean([sqnr_db(r, run_ort(unguarded, s)[0]) for r, s in zip(ref, held_out)])
    assert with_guard > without + 10, (with_guard, without)


def test_short_softmax_is_still_quantized():
    q, result = _quantize(_attention(8), load_profile("tensorrt"), _samples(8))
    assert _mix_input_producer(q) == "DequantizeLinear"
    assert not [s for s in result.skipped if s.target == "probs"]


def test_whole_graph_target_widens_to_16_bit_when_the_opset_allows():
    q, result = _quantize(_attention(1500, opset=21), load_profile("qnn"), _samples(1500))
    producers = {o: n for n in q.graph.node for o in n.output}
    mix = next(n for n in q.graph.node if n.name == "mix")
    dq = producers[mix.input[0]]
    assert dq.op_type == "DequantizeLinear"
    zp = next(i for i in q.graph.initializer if i.name == dq.input[2])
    assert zp.data_type == TensorProto.UINT16
    assert "given uint16 activations instead" in next(s.reason for s in result.skipped if s.target == "probs")


def _dense(opset: int = 17) -> onnx.ModelProto:
    """x [16, 64] -> MatMul with a constant mixed-sign weight [64, 32]."""
    w = np.random.default_rng(3).normal(0, 0.2, (64, 32)).astype(np.float32)
    graph = helper.make_graph([helper.make_node("MatMul", ["x", "w"], ["y"], name="dense")], "dense",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [16, 64])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [16, 32])],
                              [onnx.numpy_helper.from_array(w, "w")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    model.ir_version = 10
    return model


def _heavy_tailed(n: int = 8, seed: int = 0) -> list[dict]:
    """Non-negative and heavy-tailed like a magnitude spectrum: many tiny values and a few large ones, which set
    the range, so a quarter of the L1 mass lies below half an int8 step."""
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        x = rng.exponential(0.005, (16, 64))
        x.flat[rng.choice(x.size, 3, replace=False)] = 5.0
        out.append({"x": x.astype(np.float32)})
    return out


def _underflow_skip(result) -> str | None:
    return next((s.reason for s in result.skipped if s.target == "x" and "round to zero" in s.reason), None)


def _with_limits(profile, **limits):
    return dataclasses.replace(profile, activations=dataclasses.replace(profile.activations, **limits))


def test_tensor_summed_only_by_weights_uses_the_looser_limit():
    samples, model = _heavy_tailed(), _dense()
    trt = load_profile("tensorrt")
    kept, kept_result = _quantize(model, _with_limits(trt, max_underflow=0.5, max_underflow_other=0.1), samples)
    reason = _underflow_skip(kept_result)
    assert reason is not None and "max_underflow_other" in reason and "kept in float" in reason
    share = float(reason.split("%")[0]) / 100
    assert 0.1 < share < 0.5  # the case under test

    quantized, result = _quantize(model, _with_limits(trt, max_underflow=0.1, max_underflow_other=0.5), samples)
    assert _underflow_skip(result) is None
    producers = {o: n for n in quantized.graph.node for o in n.output}
    dense = next(n for n in quantized.graph.node if n.name == "dense")
    assert producers[dense.input[0]].op_type == "DequantizeLinear"
    held_out = _heavy_tailed(n=4, seed=1)
    sqnr = np.mean([sqnr_db(run_ort(model, s)[0], run_ort(quantized, s)[0]) for s in held_out])
    assert sqnr > 25.0, sqnr

    # whole-graph targets hold every tensor to max_underflow and widen it instead
    qnn = _with_limits(load_profile("qnn"), max_underflow=0.1, max_underflow_other=0.5)
    _, qnn_result = _quantize(_dense(opset=21), qnn, samples)
    assert "given uint16 activations instead" in (_underflow_skip(qnn_result) or "")


def test_tensor_read_only_by_elementwise_ops_is_not_checked():
    """x -> Conv(1x1, weight 1) -> c -> Sqrt: no weight layer sums c, so c's Q/DQ (ort-cpu quantizes Conv
    outputs) is written even with a strict limit."""
    graph = helper.make_graph(
        [helper.make_node("Conv", ["x", "w"], ["c"], name="conv"), helper.make_node("Sqrt", ["c"], ["y"])],
        "conv_sqrt", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 1, 16, 64])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 1, 16, 64])],
        [onnx.numpy_helper.from_array(np.ones((1, 1, 1, 1), np.float32), "w")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 10
    samples = [{"x": s["x"].reshape(1, 1, 16, 64)} for s in _heavy_tailed()]
    strict = _with_limits(load_profile("ort-cpu"), max_underflow=0.1, max_underflow_other=0.1)
    q, result = _quantize(model, strict, samples)
    assert "kept in float" in _underflow_skip(result)  # x itself is summed by the Conv: checked
    assert not [s for s in result.skipped if s.target == "c"]
    producers = {o: n for n in q.graph.node for o in n.output}
    sqrt = next(n for n in q.graph.node if n.op_type == "Sqrt")
    assert producers[sqrt.input[0]].op_type == "DequantizeLinear"
    dq = producers[sqrt.input[0]]
    step = float(onnx.numpy_helper.to_array(next(i for i in q.graph.initializer if i.name == dq.input[1])))
    held_out = [{"x": s["x"].reshape(1, 1, 16, 64)} for s in _heavy_tailed(n=4, seed=1)]
    for s in held_out:  # c = y**2 is off by at most half a step, flushed values included
        ref, out = run_ort(model, s)[0], run_ort(q, s)[0]
        assert np.abs(out.astype(np.float64) ** 2 - ref.astype(np.float64) ** 2).max() <= 0.5 * step * 1.001
