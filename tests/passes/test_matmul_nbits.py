"""MatMulNBits packing: same integers and scales as the int4 QDQ model."""

from __future__ import annotations

import numpy as np
import onnx

from conftest import make_transformer_block
from edgeq.api import canonicalize, quantize_opset
from edgeq.calibration.calibrate import calibrate, make_session
from edgeq.ir import to_graph, to_model
from edgeq.model_io import ensure_opset
from edgeq.pass_base import PassContext, make_pass
from edgeq.profiles import load_profile


def _int4_graph(block: int):
    import dataclasses

    model = make_transformer_block(dim=64)
    base = load_profile("tensorrt-int4")
    profile = dataclasses.replace(base, weights=dataclasses.replace(base.weights, block_size=block))
    canon, _ = canonicalize(model)
    canon = ensure_opset(canon, quantize_opset(profile, canon), why="int4")
    rng = np.random.default_rng(0)
    samples = [{"x": rng.normal(size=(1, 16, 64)).astype(np.float32)} for _ in range(2)]
    graph = to_graph(canon)
    make_pass("insert_qdq").run(graph, PassContext(profile=profile, stats=calibrate(canon, samples)))
    return canon, graph, samples


def test_matmulnbits_matches_qdq():
    for block in (16, 32):  # 64 / 32 blocks: even and odd block counts per column are both packed
        canon, graph, samples = _int4_graph(block)
        qdq = to_model(graph, canon)
        result = make_pass("to_matmulnbits").run(graph, PassContext())
        nbits = to_model(graph, canon)
        ops = [n.op_type for n in nbits.graph.node]
        assert ops.count("MatMulNBits") == 6 and result.rewrites == 6
        assert ops.count("MatMul") == 2, "activation x activation MatMuls stay"
        node = next(n for n in nbits.graph.node if n.op_type == "MatMulNBits")
        attrs = {a.name: a.i for a in node.attribute}
        assert attrs["bits"] == 4 and attrs["block_size"] == block and attrs["K"] == 64
        ref = make_session(qdq).run(None, samples[0])[0]
        out = make_session(nbits).run(None, samples[0])[0]
        np.testing.assert_allclose(out, ref, rtol=1e-3, atol=1e-4)


def test_skips_per_channel_int8_weights():
    model = make_transformer_block()
    canon, _ = canonicalize(model)
    rng = np.random.default_rng(0)
    samples = [{"x": rng.normal(size=(1, 16, 32)).astype(np.float32)}]
    graph = to_graph(canon)
    make_pass("insert_qdq").run(graph, PassContext(profile=load_profile("tensorrt"), stats=calibrate(canon, samples)))
    result = make_pass("to_matmulnbits").run(graph, PassContext())
    assert result.rewrites == 0 and any("not blockwise 4-bit" in s.reason for s in result.skipped)
    onnx.checker.check_model(to_model(graph, canon))


def test_ort_int4_target_packs_every_weight_matmul(tmp_path):
    """The built-in ort-int4 target: tensorrt-int4's blockwise weights, then MatMulNBits; same outputs as the
    tensorrt-int4 QDQ model (same integers and scales), counted as weight-only compute ops, legal for its check."""
    from edgeq import api

    model = make_transformer_block(dim=128)
    src = tmp_path / "block.onnx"
    onnx.save(model, str(src))
    rng = np.random.default_rng(1)
    feeds = [{"x": rng.normal(size=(1, 16, 128)).astype(np.float32)} for _ in range(4)]
    packed = api.quantize(src, target="ort-int4", calib=feeds, output=tmp_path / "nbits.onnx")
    qdq = api.quantize(src, target="tensorrt-int4", calib=feeds, output=tmp_path / "qdq.onnx")
    ops = [n.op_type for n in onnx.load(str(tmp_path / "nbits.onnx")).graph.node]
    q = packed.report["quantization"]
    assert ops.count("MatMulNBits") == 6 and "DequantizeLinear" not in ops
    assert q["compute_ops_weight_only"] == 6 and q["compute_ops"] == 8  # + the two attention MatMuls
    assert api.check(tmp_path / "nbits.onnx", target="ort-int4").passed
    for feed in feeds[:2]:
        a = make_session(str(tmp_path / "nbits.onnx")).run(None, feed)[0]
        b = make_session(str(tmp_path / "qdq.onnx")).run(None, feed)[0]
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-4)
