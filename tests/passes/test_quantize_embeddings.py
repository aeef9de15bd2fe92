"""quantize_embeddings: constant Gather tables as int8 rows, dequantized per gathered row."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from conftest import init, run_ort
from edgeq import api
from edgeq.ir import to_graph, to_model
from edgeq.pass_base import PassContext, make_pass
from edgeq.passes.quantize_embeddings import quantize_table
from edgeq.precision import PrecisionPlan


def _embedding_model(table: np.ndarray, *, tied: bool = False, small: np.ndarray | None = None) -> onnx.ModelProto:
    """ids -> Gather(table) [-> + Gather(small)] [-> MatMul(table^T), a tied output projection]."""
    nodes = [helper.make_node("Gather", ["table", "ids"], ["e"], name="embed")]
    inits = [init("table", table)]
    out = "e"
    if small is not None:
        nodes += [helper.make_node("Gather", ["small", "pos"], ["p"], name="pos_embed"),
                  helper.make_node("Add", ["e", "p"], ["ep"], name="add")]
        inits.append(init("small", small))
        inits.append(numpy_helper.from_array(np.arange(5, dtype=np.int64)[None], "pos"))
        out = "ep"
    if tied:
        nodes += [helper.make_node("Transpose", ["table"], ["table_t"], name="tr", perm=[1, 0]),
                  helper.make_node("MatMul", [out, "table_t"], ["logits"], name="head")]
        out = "logits"
    g = helper.make_graph(nodes, "emb", [helper.make_tensor_value_info("ids", TensorProto.INT64, [2, 5])],
                          [helper.make_tensor_value_info(out, TensorProto.FLOAT, None)], inits)
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])


def _table(rows=1000, dim=96, outlier_cols=(), seed=0):
    rng = np.random.default_rng(seed)
    t = rng.normal(0, 0.05, (rows, dim)).astype(np.float32)
    for c in outlier_cols:
        t[:, c] *= 40.0
    return t


def _run_pass(model, **opts):
    graph = to_graph(model)
    ctx = PassContext(precision=opts.pop("precision", None))
    result = make_pass("quantize_embeddings", opts).run(graph, ctx)
    return to_model(graph, model), result


IDS = {"ids": np.array([[0, 5, 999, 17, 3], [42, 42, 7, 500, 1]], dtype=np.int64)}


def test_rows_are_int8_and_only_gathered_rows_are_dequantized():
    table = _table()
    model = _embedding_model(table)
    out, result = _run_pass(model)
    assert result.rewrites == 1
    ops = [n.op_type for n in out.graph.node]
    assert ops.count("Gather") == 2 and "DequantizeLinear" not in ops and ops.count("Cast") == 1
    inits = {t.name: numpy_helper.to_array(t) for t in out.graph.initializer}
    assert inits["table/int8_rows"].dtype == np.int8 and inits["table/int8_rows"].shape == table.shape
    assert "table" not in inits  # the float table is gone: ~4x smaller
    got = run_ort(out, IDS)[0]
    want = run_ort(model, IDS)[0]
    # each element within half a step of its row (max|row| / 254); no column scales on a plain table
    step = np.abs(table).max(axis=1) / 127.0
    assert np.all(np.abs(got - want) <= step[IDS["ids"]][..., None] / 2 + 1e-7)
    note = result.notes["tables"][0]
    assert note["int8_bytes"] * 4 == note["float_bytes"] and not note["column_scales"] and note["sqnr_db"] > 40


def test_outlier_columns_get_column_scales():
    table = _table(outlier_cols=(3, 50))
    q, rows, cols, sqnr = quantize_table(table)
    sqnr_rows_only = _rows_only_sqnr(table)
    assert cols is not None and sqnr > sqnr_rows_only + 10
    model = _embedding_model(table)
    out, result = _run_pass(model)
    assert result.notes["tables"][0]["column_scales"]
    got, want = run_ort(out, IDS)[0], run_ort(model, IDS)[0]
    assert 10 * np.log10(np.sum(want ** 2) / np.sum((got - want) ** 2)) > 40


def _rows_only_sqnr(t):
    step = np.abs(t).max(axis=1, keepdims=True) / 127.0
    q = np.round(t / step) * step
    return 10 * np.log10(np.sum(t.astype(np.float64) ** 2) / np.sum((q - t) ** 2))


def test_skips_tied_small_kept_and_inaccurate_tables():
    table = _table()
    _, result = _run_pass(_embedding_model(table, tied=True))
    assert result.rewrites == 0 and "tied output projection" in result.skipped[0].reason
    small = _table(rows=5, dim=96, seed=1)  # 480 elements: below min_elements, untouched without a note
    out, result = _run_pass(_embedding_model(table, small=small))
    assert result.rewrites == 1 and not result.skipped
    assert "small" in {t.name for t in out.graph.initializer}
    _, result = _run_pass(_embedding_model(table), precision=PrecisionPlan(float_nodes={"embed"}))
    assert result.rewrites == 0 and "precision plan" in result.skipped[0].reason
    _, result = _run_pass(_embedding_model(table), min_sqnr_db=80.0)
    assert result.rewrites == 0 and "min_sqnr_db" in result.skipped[0].reason


def test_bad_option_is_a_profile_error():
    from edgeq.errors import ProfileError

    with pytest.raises(ProfileError, match="min_elements"):
        make_pass("quantize_embeddings", {"min_elements": 0})


def test_ort_cpu_profile_quantizes_embeddings_end_to_end(tmp_path):
    table = _table(rows=2000, dim=64)
    rng = np.random.default_rng(5)
    w = rng.normal(0, 0.2, (64, 32)).astype(np.float32)
    g = helper.make_graph(
        [helper.make_node("Gather", ["table", "ids"], ["e"], name="embed"),
         helper.make_node("MatMul", ["e", "w"], ["y"], name="proj")],
        "m", [helper.make_tensor_value_info("ids", TensorProto.INT64, [1, 8])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 8, 32])], [init("table", table), init("w", w)])
    model = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    src = tmp_path / "m.onnx"
    onnx.save(model, str(src))
    feeds = [{"ids": rng.integers(0, 2000, (1, 8)).astype(np.int64)} for _ in range(8)]
    res = api.quantize(src, target="ort-cpu", calib=feeds, output=tmp_path / "q.onnx", eval_data=feeds)
    q = onnx.load(str(tmp_path / "q.onnx"))
    kinds = {t.name: numpy_helper.to_array(t).dtype for t in q.graph.initializer}
    assert kinds["table/int8_rows"] == np.int8 and "table" not in kinds
    assert res.report["validation"]["outputs"][0]["cosine_mean"] > 0.999
    assert (tmp_path / "q.onnx").stat().st_size < table.nbytes / 2
