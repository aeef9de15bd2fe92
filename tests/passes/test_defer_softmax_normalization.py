"""defer_softmax_normalization: P @ V over long softmax rows runs in INT8 on ort-cpu; exact in float."""

from __future__ import annotations

import dataclasses

import numpy as np
import onnx

from onnx import TensorProto, helper

from conftest import run_ort
from edgeq import api
from edgeq.api import canonicalize
from edgeq.calibration.calibrate import calibrate
from edgeq.ir import to_graph, to_model
from edgeq.pass_base import PassContext, make_pass
from edgeq.profiles import load_profile


def _attention(keys: int) -> onnx.ModelProto:
    """scores [1, 2, 16, keys] -> Softmax -> MatMul with values [1, 2, keys, 8] (named as in make_transformer_block)."""
    g = helper.make_graph(
        [helper.make_node("Softmax", ["s"], ["p"], name="softmax", axis=-1),
         helper.make_node("MatMul", ["p", "v"], ["ctx"], name="attn_v")],
        "attention", [helper.make_tensor_value_info("s", TensorProto.FLOAT, [1, 2, 16, keys]),
                      helper.make_tensor_value_info("v", TensorProto.FLOAT, [1, 2, keys, 8])],
        [helper.make_tensor_value_info("ctx", TensorProto.FLOAT, [1, 2, 16, 8])])
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    m.ir_version = 8
    return m


def _feeds(keys, n, seed=0):
    """Most score rows nearly flat (probabilities near 1/keys), every fourth one peaked on one key (near 1)."""
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        s = rng.normal(0, 0.3, (1, 2, 16, keys)).astype(np.float32)
        s[:, :, ::4, 0] += 12.0
        out.append({"s": s, "v": rng.normal(0, 1, (1, 2, keys, 8)).astype(np.float32)})
    return out


def _run_pass(model, feeds, **options):
    canon, _ = canonicalize(model)
    graph = to_graph(canon)
    result = make_pass("defer_softmax_normalization", options).run(
        graph, PassContext(profile=load_profile("ort-cpu"), stats=calibrate(canon, feeds)))
    graph.cleanup().toposort()
    return canon, to_model(graph, canon), result


def _producers(model):
    return {o: n for n in model.graph.node for o in n.output}


def test_long_softmax_rows_are_rescaled_exactly():
    model = _attention(600)
    canon, out, result = _run_pass(model, _feeds(600, 3), compensate_mass=False)
    assert result.rewrites == 1 and result.notes["flushed"]["softmax"]["before"] > 0.1
    prod = _producers(out)
    attn_v = next(n for n in out.graph.node if n.name == "attn_v")
    div = prod[attn_v.input[0]]
    assert div.op_type == "Div" and prod[div.input[1]].op_type == "ReduceMax"
    assert prod[div.input[0]].op_type == "Softmax"
    unscale = next(n for n in out.graph.node if attn_v.output[0] in n.input)
    assert unscale.op_type == "Mul" and unscale.output[0] == "ctx" and unscale.input[1] == div.input[1]
    feed = _feeds(600, 1, seed=5)[0]
    ref, got = run_ort(model, feed)[0], run_ort(out, feed)[0]
    np.testing.assert_allclose(got, ref, rtol=1e-5, atol=1e-5)


def test_short_softmax_rows_are_left_alone_with_a_reason():
    _, out, result = _run_pass(_attention(8), _feeds(8, 4))
    assert result.rewrites == 0
    reason = next(s.reason for s in result.skipped if s.target == "Softmax softmax")
    assert "quantizes as it is" in reason
    assert not any(n.op_type == "ReduceMax" for n in out.graph.node)
    # `always` rewrites it anyway, still exactly
    _, forced, result = _run_pass(_attention(8), _feeds(8, 4), always=True)
    assert result.rewrites == 1
    feed = _feeds(8, 1, seed=3)[0]
    np.testing.assert_allclose(run_ort(forced, feed)[0], run_ort(_attention(8), feed)[0],
                               rtol=1e-5, atol=1e-5)


def test_ort_cpu_quantizes_the_rescaled_probabilities_and_is_closer_to_fp32(tmp_path):
    model = _attention(600)
    src = tmp_path / "block.onnx"
    onnx.save(model, str(src))
    calib, evals = _feeds(600, 4), _feeds(600, 3, seed=9)
    profile = load_profile("ort-cpu")
    outs = {}
    for name, prof in (("with", profile), ("without", dataclasses.replace(profile, passes=()))):
        out = tmp_path / f"{name}.onnx"
        api.quantize(src, target=prof, calib=calib, output=out, check=False)
        outs[name] = onnx.load(str(out))
    prod = _producers(outs["with"])
    attn_v = next(n for n in outs["with"].graph.node if n.name == "attn_v")
    assert all(prod[i].op_type == "DequantizeLinear" for i in attn_v.input), "P @ V runs as an integer MatMul"
    prod0 = _producers(outs["without"])
    attn_v0 = next(n for n in outs["without"].graph.node if n.name == "attn_v")
    assert prod0[attn_v0.input[0]].op_type == "Softmax", "without the pass the probabilities stay float"

    def sqnr(q):  # noqa: E306
        ref = np.concatenate([run_ort(model, f)[0] for f in evals])
        got = np.concatenate([run_ort(q, f)[0] for f in evals])
        return 10 * np.log10((ref ** 2).sum() / ((ref - got) ** 2).sum())

    assert sqnr(outs["with"]) > 20.0
    assert sqnr(outs["with"]) > sqnr(outs["without"]) - 1.0  # one more INT8 layer, no real loss


def test_only_softmax_outputs_are_calibrated_before_the_pass():
    from conftest import make_cnn

    p = make_pass("defer_softmax_normalization")
    assert p.stats_tensors(make_cnn()) == []  # nothing to rewrite: the pipeline skips the extra calibration
    assert p.stats_tensors(_attention(8)) == ["p"]


def test_rows_with_one_peak_and_a_long_tail_stay_float(tmp_path):
    """Every row: one key at half the mass, the other half spread over 599 keys. Divided by the row maximum the
    tail is ~1/600 of the peak, still below half a uint8 step: the rewrite would not save it, so P @ V stays float."""
    model = _attention(600)
    src = tmp_path / "attention.onnx"
    onnx.save(model, str(src))
    rng = np.random.default_rng(0)
    calib = []
    for _ in range(3):
        s = rng.normal(0, 0.05, (1, 2, 16, 600)).astype(np.float32)
        s[..., 0] += np.log(599.0)
        calib.append({"s": s, "v": rng.normal(0, 1, (1, 2, 600, 8)).astype(np.float32)})
    result = api.quantize(src, target="ort-cpu", calib=calib, output=tmp_path / "q.onnx", check=False)
    reasons = [s["reason"] for s in result.report["skipped"] if s["target"] == "Softmax softmax"]
    assert reasons and "divided by its row maximum still 49%" in reasons[0], reasons
    q = onnx.load(str(tmp_path / "q.onnx"))
    assert not any(n.op_type == "ReduceMax" for n in q.graph.node)


def test_flushed_mass_is_added_back_as_the_mean_value(tmp_path):
    """With ``compensate_mass`` the rewrite adds ``(1 - m * (E @ 1)) * mean(V)``: zero in float; after ort-cpu
    quantization ``E @ 1`` reads the same Q/DQ pair as ``E @ V``, so the term restores the probability mass that
    rounded to zero, and P @ V is closer to FP32 than without it."""
    model = _attention(600)
    _, out, result = _run_pass(model, _feeds(600, 3))
    assert result.rewrites == 1 and not [s for s in result.skipped if "compensation" in s.reason]
    prod = _producers(out)
    final = prod["ctx"]
    assert final.op_type == "Add"
    rowsum = next(n for n in out.graph.node if n.op_type == "MatMul" and n.name != "attn_v")
    attn_v = next(n for n in out.graph.node if n.name == "attn_v")
    assert rowsum.input[0] == attn_v.input[0], "the row sum reads the same rescaled probabilities"
    ones = next(i for i in out.graph.initializer if i.name == rowsum.input[1])
    np.testing.assert_array_equal(onnx.numpy_helper.to_array(ones), np.ones((600, 1), np.float32))
    assert any(n.op_type == "ReduceMean" and n.input[0] == "v" for n in out.graph.node)
    feed = _feeds(600, 1, seed=5)[0]
    np.testing.assert_allclose(run_ort(out, feed)[0], run_ort(model, feed)[0], rtol=1e-5, atol=1e-5)

    src = tmp_path / "attention.onnx"
    onnx.save(model, str(src))
    profile = load_profile("ort-cpu")
    plain = dataclasses.replace(profile, passes=tuple(
        dataclasses.replace(p, options={**dict(p.options or {}), "compensate_mass": False})
        if p.name == "defer_softmax_normalization" else p for p in profile.passes))
    def feeds(n, seed):  # log-normal-ish rows (a fifth of the magnitude under half a step) and V with a mean
        rng = np.random.default_rng(seed)
        return [{"s": rng.normal(0, 2.0, (1, 2, 16, 600)).astype(np.float32),
                 "v": (rng.normal(0, 1, (1, 2, 600, 8)) + np.linspace(-2, 2, 8)).astype(np.float32)}
                for _ in range(n)]

    calib, evals = feeds(4, 0), feeds(3, 9)
    ref = np.concatenate([run_ort(model, f)[0] for f in evals])
    err = {}
    for name, prof in (("compensated", profile), ("plain", plain)):
        dst = tmp_path / f"{name}.onnx"
        api.quantize(src, target=prof, calib=calib, output=dst, check=False)
        q = onnx.load(str(dst))
        got = np.concatenate([run_ort(q, f)[0] for f in evals])
        err[name] = float(((ref - got) ** 2).sum())
        if name == "compensated":
            qprod = _producers(q)
            rs = next(n for n in q.graph.node if n.op_type == "MatMul" and n.name != "attn_v")
            assert qprod[rs.input[0]].op_type == "DequantizeLinear" and qprod[rs.input[1]].op_type == \
                "DequantizeLinear", "the row sum runs as an integer MatMul on the quantized probabilities"
    assert err["compensated"] < 0.1 * err["plain"], err  # measured: 50.2 dB against 33.5 dB


def test_dynamic_key_length_is_rewritten_without_compensation():
    model = _attention(600)
    model.graph.input[0].type.tensor_type.shape.dim[3].dim_param = "keys"
    model.graph.input[1].type.tensor_type.shape.dim[2].dim_param = "keys"
    _, out, result = _run_pass(model, _feeds(600, 3))
    assert result.rewrites == 1
    assert any("not static" in s.reason for s in result.skipped)
    assert _producers(out)["ctx"].op_type == "Mul"
