"""Segment-by-segment runs of large models: same statistics, moments and validation as one whole-model run."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

import edgeq.calibration.segments as segments
from conftest import make_transformer_block
from edgeq.calibration.calibrate import calibrate
from edgeq.calibration.moments import collect_moments
from edgeq.calibration.segments import SampleStore, node_reads, plan_segments, run_segmented
from edgeq.model_io import load_model


def _stack(tmp_path, blocks: int = 3, dim: int = 32):
    """``blocks`` transformer blocks in a row, weights in an external file."""
    nodes, inits, x = [], [], "x"
    for b in range(blocks):
        blk = make_transformer_block(dim=dim, seed=b).graph
        rename = {t: f"b{b}.{t}" for t in [i.name for i in blk.initializer] + [o for n in blk.node for o in n.output]}
        rename[blk.input[0].name] = x
        for n in blk.node:
            n.input[:] = [rename.get(i, i) for i in n.input]
            n.output[:] = [rename.get(o, o) for o in n.output]
            n.name = f"b{b}/{n.name or n.op_type}"
            nodes.append(n)
        for i in blk.initializer:
            i.name = rename[i.name]
            inits.append(i)
        x = rename[blk.output[0].name]
    graph = helper.make_graph(nodes, "stack", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 16, dim])],
                              [helper.make_tensor_value_info(x, TensorProto.FLOAT, [1, 16, dim])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    path = tmp_path / "stack.onnx"
    onnx.save(model, str(path), save_as_external_data=True, all_tensors_to_one_file=True,
              location="stack.onnx.data", size_threshold=0)
    return path


def _samples(n=4, dim=32, seed=0):
    rng = np.random.default_rng(seed)
    return [{"x": rng.normal(size=(1, 16, dim)).astype(np.float32)} for _ in range(n)]


def test_segments_cut_by_weight_bytes_and_read_only_earlier_tensors(tmp_path):
    model = load_model(_stack(tmp_path), load_external_data=False)
    whole = plan_segments(model, segment_bytes=1 << 30)
    assert len(whole) == 1
    cut = plan_segments(model, segment_bytes=3 * 32 * 32 * 4)  # about three projection matrices
    assert len(cut) >= 4
    assert sum(len(s.nodes) for s in cut) == len(model.graph.node)
    produced = {"x"}
    for seg in cut:
        assert set(seg.inputs) <= produced, "a segment reads only graph inputs and earlier segments' tensors"
        assert seg.weight_bytes <= 4 * 32 * 32 * 4
        produced |= {o for n in seg.nodes for o in n.output}


def test_segmented_calibration_equals_the_whole_model_run(tmp_path, monkeypatch):
    model = load_model(_stack(tmp_path), load_external_data=False)
    whole = calibrate(model, _samples())
    monkeypatch.setattr(segments, "SEGMENT_BYTES", 32 * 32 * 4)
    monkeypatch.setattr(segments, "STORE_BYTES", 0)  # every boundary tensor goes through the disk store
    assert len(plan_segments(model, segment_bytes=segments.SEGMENT_BYTES)) > 5
    cut = calibrate(model, _samples())
    assert set(cut.tensors) == set(whole.tensors) and cut.samples == whole.samples == 4
    for name, obs in whole.tensors.items():
        other = cut.tensors[name]
        assert (other.min, other.max, other.count) == (obs.min, obs.max, obs.count), name
        np.testing.assert_array_equal(other.hist, obs.hist)


def test_segmented_moments_equal_the_whole_model_run(tmp_path, monkeypatch):
    model = load_model(_stack(tmp_path), load_external_data=False)
    whole = collect_moments(model, _samples())
    monkeypatch.setattr(segments, "SEGMENT_BYTES", 32 * 32 * 4)
    cut = collect_moments(model, _samples())
    assert whole.layers.keys() == cut.layers.keys() and len(whole.layers) == 18
    for name, m in whole.layers.items():
        assert cut.layers[name].rows == m.rows and cut.layers[name].holdout_rows == m.holdout_rows
        np.testing.assert_allclose(cut.layers[name].matrix, m.matrix, rtol=1e-6, atol=1e-9)


def test_a_failing_sample_names_its_index_and_the_data(tmp_path, monkeypatch):
    model = load_model(_stack(tmp_path), load_external_data=False)
    monkeypatch.setattr(segments, "SEGMENT_BYTES", 32 * 32 * 4)
    bad = _samples(3)
    bad[2] = {"x": np.zeros((1, 16, 7), np.float32)}
    from edgeq.errors import CalibrationDataError

    with pytest.raises(CalibrationDataError, match="evaluation sample 2"):
        run_segmented(model, bad, ["x"], lambda i, v: None, what="evaluation")
    with pytest.raises(CalibrationDataError, match="contains no samples"):
        run_segmented(model, [], ["x"], lambda i, v: None)


def test_sample_store_spills_to_disk_past_its_budget_and_cleans_up():
    store = SampleStore(budget=100)
    small, big = np.arange(10, dtype=np.float32), np.arange(1000, dtype=np.float32)
    store.put(0, "a", small)
    store.put(0, "b", big)
    assert isinstance(store.get(0, "b"), np.memmap) and not isinstance(store.get(0, "a"), np.memmap)
    np.testing.assert_array_equal(store.get(0, "b"), big)
    folder = store.folder
    assert folder is not None and folder.exists()
    store.drop({"a"})
    assert store.in_memory == 0
    store.close()
    assert not folder.exists()


def test_node_reads_include_what_a_subgraph_takes_from_outside():
    then = helper.make_graph([helper.make_node("Add", ["outer", "local"], ["t"])], "then", [],
                             [helper.make_tensor_value_info("t", TensorProto.FLOAT, None)],
                             [onnx.numpy_helper.from_array(np.ones(1, np.float32), "local")])
    other = helper.make_graph([helper.make_node("Identity", ["other_outer"], ["e"])], "else", [],
                              [helper.make_tensor_value_info("e", TensorProto.FLOAT, None)])
    node = helper.make_node("If", ["cond"], ["y"], then_branch=then, else_branch=other)
    assert set(node_reads(node)) == {"cond", "outer", "other_outer"}


def test_validation_of_a_large_reference_runs_it_in_segments(tmp_path, monkeypatch):
    import edgeq.api
    import edgeq.validation

    path = _stack(tmp_path)
    np.savez(tmp_path / "c.npz", x=np.stack([s["x"][0] for s in _samples(4)]))
    small = edgeq.api.quantize(path, target="ort-cpu", calib=tmp_path / "c.npz", eval_data=tmp_path / "c.npz",
                               output=tmp_path / "q.onnx", latency_runs=2)
    from edgeq.model_io import model_size_bytes
    from edgeq.profiles import load_profile

    monkeypatch.setattr(segments, "SEGMENT_BYTES", 32 * 32 * 4)
    ref = small.report["validation"]["outputs"][0]
    # only the reference is over the limit: the candidate runs whole and is timed
    monkeypatch.setattr(edgeq.validation, "LARGE_MODEL_BYTES", model_size_bytes(tmp_path / "q.onnx") + 1)
    # then both: the candidate runs in segments too, nothing is timed
    for both in (False, True):
        if both:
            monkeypatch.setattr(edgeq.validation, "LARGE_MODEL_BYTES", 0)
        large = edgeq.validation.compare(path, tmp_path / "q.onnx", edgeq.api.open_dataset(
            tmp_path / "c.npz", edgeq.api.model_inputs(load_model(path))),
            thresholds=load_profile("ort-cpu").thresholds, latency_runs=2)
        got = large.outputs[0]
        assert got["name"] == ref["name"] and large.samples == 4
        assert got["cosine_mean"] == pytest.approx(ref["cosine_mean"], abs=1e-5)
        assert got["sqnr_db"] == pytest.approx(ref["sqnr_db"], abs=0.05)
        if both:
            assert "reference" not in large.latency_ms and "reference and candidate" in large.latency_ms["note"]
        else:
            assert large.latency_ms["reference"] is None and large.latency_ms["candidate"]["runs"] == 2
            assert "the reference is over" in large.latency_ms["note"]


def test_a_first_segment_with_nothing_to_keep_still_takes_in_the_samples(tmp_path):
    """Segment 0 computes only dead ends (its outputs are neither wanted nor read later): the samples must still be
    counted and the graph input passed on to the segment that reads it."""
    path = _stack(tmp_path, blocks=1)
    model = load_model(path, load_external_data=False)
    rng = np.random.default_rng(0)
    dead = onnx.numpy_helper.from_array(rng.normal(size=(32, 32)).astype(np.float32), "dead_w")
    model.graph.initializer.append(dead)
    model.graph.node.insert(0, helper.make_node("MatMul", ["x", "dead_w"], ["dead"], name="dead_end"))
    seen = []
    count = run_segmented(model, _samples(3), [model.graph.output[0].name], lambda i, v: seen.append(i),
                          segment_bytes=32 * 32 * 4)
    assert count == 3 and sorted(set(seen)) == [0, 1, 2]
