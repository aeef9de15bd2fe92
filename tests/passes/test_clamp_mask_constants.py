"""clamp_mask_constants: finite mask constants for whole-graph targets, exact on kept positions."""

from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from conftest import make_transformer_block, run_ort
from edgeq.ir import to_graph, to_model
from edgeq.pass_base import PassContext, make_pass
from edgeq.profiles import load_profile


def _apply(model: onnx.ModelProto, **opts):
    graph = to_graph(model)
    result = make_pass("clamp_mask_constants", opts).run(graph, PassContext(profile=load_profile("qnn")))
    return to_model(graph, model), result


def _init(model, name):
    return numpy_helper.to_array(next(i for i in model.graph.initializer if i.name == name))


def test_finfo_min_mask_is_clamped_and_the_block_is_unchanged():
    model = make_transformer_block(mask=True)
    out, result = _apply(model)
    assert _init(out, "neg") == -1.0e4 and result.rewrites == 1
    assert result.notes["clamped"]["neg"] == float(np.finfo(np.float32).min)
    rng = np.random.default_rng(0)
    for keep in (16, 9, 1):  # no, some and almost all positions masked
        mask = (np.arange(16) < keep).astype(np.int64)[None]
        feed = {"x": rng.normal(size=(1, 16, 32)).astype(np.float32), "mask": mask}
        np.testing.assert_allclose(run_ort(out, feed)[0], run_ort(model, feed)[0], rtol=1e-5, atol=1e-5)


def test_fp16_of_the_clamped_mask_stays_finite():
    model = make_transformer_block(mask=True)
    out, _ = _apply(model)
    assert np.isinf(np.float16(_init(model, "neg"))) and np.isfinite(np.float16(_init(out, "neg")))


def test_huge_constant_feeding_other_ops_is_left_alone_with_reason():
    big = np.full((4, 4), 3.0e38, np.float32)
    nodes = [helper.make_node("MatMul", ["x", "w"], ["y"], name="mm")]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4])],
                              [numpy_helper.from_array(big, "w")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
    out, result = _apply(model)
    np.testing.assert_array_equal(_init(out, "w"), big)
    assert result.rewrites == 0
    assert any(s.target == "w" and "MatMul" in s.reason for s in result.skipped)


def test_qnn_a16w8_masked_block_stays_close_to_float(tmp_path):
    # Unclamped, the uint16 DequantizeLinear of finfo(float32).min overflows to -inf and 0 * -inf poisons every row.
    from edgeq.api import quantize

    model = make_transformer_block(mask=True)
    onnx.save(model, tmp_path / "m.onnx")
    rng = np.random.default_rng(1)
    samples = [{"x": rng.normal(size=(1, 16, 32)).astype(np.float32), "mask": np.ones((1, 16), np.int64)}
               for _ in range(8)]
    quantize(tmp_path / "m.onnx", target="qnn-a16w8", calib=samples, output=tmp_path / "q.onnx")
    for feed in samples[:3]:
        ref, got = run_ort(model, feed)[0], run_ort(tmp_path / "q.onnx", feed)[0]
        cos = float(ref.ravel() @ got.ravel() / np.linalg.norm(ref) / np.linalg.norm(got))
        assert np.isfinite(got).all() and cos > 0.999
