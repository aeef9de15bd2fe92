"""Lazy external weights in, streamed weights out (the >2 GB path, exercised here on a small model)."""

from __future__ import annotations

import numpy as np
import onnx

from conftest import make_transformer_block
from edgeq.calibration.calibrate import calibrate, make_session
from edgeq.ir import to_graph
from edgeq.large_model import ExternalValues, attach_external, save_streaming, session_path
from edgeq.model_io import load_model
from edgeq.pass_base import PassContext, make_pass
from edgeq.profiles import load_profile


def _external_model(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    onnx.save(make_transformer_block(dim=64), str(src / "m.onnx"), save_as_external_data=True,
              all_tensors_to_one_file=True, location="m.onnx.data", size_threshold=0)
    return src / "m.onnx"


def test_lazy_load_reads_weights_only_when_asked(tmp_path):
    path = _external_model(tmp_path)
    model = load_model(path, load_external_data=False)
    assert all(t.data_location == onnx.TensorProto.EXTERNAL for t in model.graph.initializer)
    graph = to_graph(model)
    assert attach_external(graph, path.parent) == 0, "to_graph already made every external weight lazy"
    w = graph.tensors()["wq"]
    assert isinstance(w._values, ExternalValues)
    ref = onnx.numpy_helper.to_array(next(i for i in onnx.load(str(path)).graph.initializer if i.name == "wq"))
    np.testing.assert_array_equal(w.values, ref)


def test_streamed_quantized_model_matches_in_memory_path(tmp_path):
    path = _external_model(tmp_path)
    rng = np.random.default_rng(0)
    samples = [{"x": rng.normal(size=(1, 16, 64)).astype(np.float32)} for _ in range(3)]
    model = load_model(path, load_external_data=False)
    graph = to_graph(model)
    with session_path(graph, model, extra_outputs=["h", "ctx"]) as tmp_model:
        session = make_session(tmp_model)
        names = [o.name for o in session.get_outputs()]
        assert "h" in names and "ctx" in names
    full = load_model(path)
    stats = calibrate(full, samples)
    make_pass("insert_qdq").run(graph, PassContext(profile=load_profile("tensorrt"), stats=stats))
    out = save_streaming(graph, model, tmp_path / "q.onnx")
    assert (tmp_path / "q.onnx.data").exists()
    proto = onnx.load(str(out), load_external_data=False)
    big = [i for i in proto.graph.initializer if i.data_location == onnx.TensorProto.EXTERNAL]
    assert big and all(int({e.key: e.value for e in i.external_data}["offset"]) % 4096 == 0 for i in big)
    assert out.stat().st_size < 20_000, "weights live in the data file, not the protobuf"
    graph2 = to_graph(full)
    make_pass("insert_qdq").run(graph2, PassContext(profile=load_profile("tensorrt"), stats=stats))
    from edgeq.ir import to_model

    reference = to_model(graph2, full)
    a = make_session(out).run(None, samples[0])[0]
    b = make_session(reference).run(None, samples[0])[0]
    np.testing.assert_array_equal(a, b)
    assert not [p for p in tmp_path.iterdir() if ".partial" in p.name]


def test_quantize_keeps_weights_on_disk_for_large_models(tmp_path, monkeypatch):
    """The lazy path through edgeq.quantize (threshold lowered so a small model takes it)."""
    import edgeq.api

    path = _external_model(tmp_path)
    rng = np.random.default_rng(0)
    np.savez(tmp_path / "c.npz", x=rng.normal(size=(3, 16, 64)).astype(np.float32))
    monkeypatch.setattr(edgeq.api, "LARGE_MODEL_BYTES", 0)
    before = {p.name: p.read_bytes() for p in path.parent.iterdir()}
    res = edgeq.api.quantize(path, target="ort-cpu", calib=tmp_path / "c.npz", eval_data=tmp_path / "c.npz",
                             output=tmp_path / "q.onnx", latency_runs=0)
    assert res.passed and res.report["quantization"]["compute_ops_quantized"] == 8
    assert {p.name: p.read_bytes() for p in path.parent.iterdir()} == before, "input untouched"
    monkeypatch.setattr(edgeq.api, "LARGE_MODEL_BYTES", 1 << 40)
    small = edgeq.api.quantize(path, target="ort-cpu", calib=tmp_path / "c.npz", output=tmp_path / "q2.onnx",
                               latency_runs=0)
    x = {"x": rng.normal(size=(1, 16, 64)).astype(np.float32)}
    np.testing.assert_allclose(make_session(tmp_path / "q.onnx").run(None, x)[0],
                               make_session(small.output).run(None, x)[0], rtol=1e-5, atol=1e-5)


def test_quantized_weights_spill_to_disk_and_save_like_in_memory_ones(tmp_path):
    from edgeq.large_model import WeightSpill
    from edgeq.ir import to_model

    path = _external_model(tmp_path)
    rng = np.random.default_rng(0)
    samples = [{"x": rng.normal(size=(1, 16, 64)).astype(np.float32)} for _ in range(3)]
    full = load_model(path)
    stats = calibrate(full, samples)
    spill = WeightSpill(min_bytes=0)
    graph = to_graph(load_model(path, load_external_data=False))
    make_pass("insert_qdq").run(graph, PassContext(profile=load_profile("tensorrt"), stats=stats, spill=spill))
    spilled = [t for t in graph.tensors().values() if isinstance(t._values if hasattr(t, "_values") else None,
                                                                 ExternalValues) and t.name.endswith("/quantized")]
    assert len(spilled) == 6 and spill.bytes == sum(t._values.nbytes for t in spilled)
    out = save_streaming(graph, full, tmp_path / "q.onnx")
    spill.close()
    assert not spill.folder.exists()
    graph2 = to_graph(full)
    make_pass("insert_qdq").run(graph2, PassContext(profile=load_profile("tensorrt"), stats=stats))
    a = make_session(out).run(None, samples[0])[0]
    b = make_session(to_model(graph2, full)).run(None, samples[0])[0]
    np.testing.assert_array_equal(a, b)
