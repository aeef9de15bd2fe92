"""Property tests on random small graphs (hypothesis).

* Every exact pass (and the canonical pipeline) leaves the model's outputs unchanged within 1e-5 of the output scale.
* Q/DQ insertion through :func:`edgeq.api.quantize` stays within an error bound derived from the model's own
  scales: the bound is propagated through the graph from each Q/DQ (half a step, plus what clipping cuts off) and
  each quantized weight (its exact rounding error), using each op's Lipschitz constant.
* ``edgeq check`` accepts what ``edgeq quantize`` writes, for every built-in target.

Graphs are chains of Conv/MatMul/Gemm/BatchNormalization/Add/Mul/Relu/LeakyRelu/Sigmoid/Tanh/Clip/MaxPool/
Identity/Dropout/Softmax with residual branches and constant subexpressions, random shapes, opsets 13-21.
"""

from __future__ import annotations

import dataclasses
import importlib.util
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
import pytest
from hypothesis import HealthCheck, given, settings, strategies as st
from onnx import TensorProto, helper, numpy_helper

from conftest import run_ort

from edgeq import api
from edgeq.calibration.calibrate import calibrate as run_calibration, make_session
from edgeq.ir import to_graph, to_model
from edgeq.pass_base import PASS_MODULES, PassContext, PassManager, make_pass
from edgeq.profiles import list_targets, load_profile

PROPS = settings(deadline=None, max_examples=60, suppress_health_check=list(HealthCheck), derandomize=True)

EXACT_PASSES = [name for name in ("infer_shapes", "fold_constants", "remove_identity", "fold_batchnorm", "fold_pad",
                                  "fold_channel_scale", "equalize_cross_layer", "smoothquant")
                if importlib.util.find_spec(f"edgeq.passes.{PASS_MODULES.get(name, name)}") is not None]


# ------------------------------------------------------------------------------------------------ random graphs
@dataclass(repr=False)
class RandomModel:
    model: onnx.ModelProto
    feeds: list[dict[str, np.ndarray]]  # calibration / evaluation samples

    def __repr__(self) -> str:  # what hypothesis prints for a failing example
        ops = [n.op_type for n in self.model.graph.node]
        shape = [d.dim_value or d.dim_param for d in self.model.graph.input[0].type.tensor_type.shape.dim]
        return f"RandomModel(opset={self.model.opset_import[0].version}, input={shape}, ops={ops})"


class _Builder:
    def __init__(self, draw, rng: np.random.Generator):
        self.draw, self.rng = draw, rng
        self.nodes: list[onnx.NodeProto] = []
        self.inits: list[onnx.TensorProto] = []
        self.shapes: dict[str, tuple] = {}
        self.count = 0

    def name(self, base: str) -> str:
        self.count += 1
        return f"{base}{self.count}"

    def const(self, value: np.ndarray) -> str:
        n = self.name("c")
        self.inits.append(numpy_helper.from_array(np.asarray(value, np.float32), n))
        return n

    def node(self, op: str, inputs: list[str], shape: tuple, **attrs) -> str:
        out = self.name("t")
        self.nodes.append(helper.make_node(op, inputs, [out], name=self.name(op.lower()), **attrs))
        self.shapes[out] = shape
        return out

    def weight(self, *shape: int, fan_in: int) -> str:
        return self.const(self.rng.normal(0, 1.0 / np.sqrt(fan_in), shape))


def _channel_const(b: _Builder, x: str, lo: float, hi: float) -> str:
    shape = b.shapes[x]
    c = shape[1] if len(shape) == 4 else shape[-1]
    vshape = (1, c, 1, 1) if len(shape) == 4 else (c,)
    if b.draw(st.booleans()):
        return b.const(b.rng.uniform(lo, hi, vshape))
    # A constant subexpression (folded by fold_constants): c1 * c2.
    c1, c2 = b.const(b.rng.uniform(lo, hi, vshape)), b.const(np.ones(vshape))
    return b.node("Mul", [c1, c2], vshape)


def _layer(b: _Builder, x: str, kind: str, opset: int) -> str:
    shape = b.shapes[x]
    cnn = len(shape) == 4
    if kind == "linear":
        if cnn:
            cin, cout = shape[1], b.draw(st.integers(1, 6))
            k = b.draw(st.sampled_from([1, 3]))
            group = cin if b.draw(st.booleans()) and cout == cin else 1
            inputs = [x, b.weight(cout, cin // group, k, k, fan_in=cin // group * k * k)]
            if b.draw(st.booleans()):
                inputs.append(b.const(b.rng.normal(0, 0.1, cout)))
            return b.node("Conv", inputs, (shape[0], cout, shape[2], shape[3]), pads=[k // 2] * 4, group=group)
        fin, fout = shape[1], b.draw(st.integers(1, 12))
        if b.draw(st.booleans()):
            return b.node("MatMul", [x, b.weight(fin, fout, fan_in=fin)], (shape[0], fout))
        trans = b.draw(st.booleans())
        w = b.weight(*((fout, fin) if trans else (fin, fout)), fan_in=fin)
        return b.node("Gemm", [x, w, b.const(b.rng.normal(0, 0.1, fout))], (shape[0], fout), transB=int(trans))
    if kind == "bn":
        c = shape[1]
        params = [b.const(b.rng.uniform(0.5, 1.5, c)), b.const(b.rng.normal(0, 0.2, c)),
                  b.const(b.rng.normal(0, 0.2, c)), b.const(b.rng.uniform(0.2, 2.0, c))]
        return b.node("BatchNormalization", [x, *params], shape)
    if kind == "act":
        op = b.draw(st.sampled_from(["Relu", "Sigmoid", "Tanh", "LeakyRelu", "Clip"]))
        if op == "LeakyRelu":
            return b.node(op, [x], shape, alpha=0.1)
        if op == "Clip":
            return b.node(op, [x, b.const(np.float32(0)), b.const(np.float32(6))], shape)
        return b.node(op, [x], shape)
    if kind == "add":
        return b.node("Add", [x, _channel_const(b, x, -0.5, 0.5)], shape)
    if kind == "mul":
        return b.node("Mul", [x, _channel_const(b, x, 0.25, 2.0)], shape)
    if kind == "residual":
        same = [t for t, s in b.shapes.items() if s == shape and t != x and not t.startswith("c")]
        if not same:
            return x
        return b.node("Add", [x, b.draw(st.sampled_from(sorted(same)))], shape)
    if kind == "identity":
        return b.node(b.draw(st.sampled_from(["Identity", "Dropout"])), [x], shape)
    if kind == "pool" and cnn:
        return b.node("MaxPool", [x], shape, kernel_shape=[3, 3], pads=[1, 1, 1, 1])
    return x


@st.composite
def random_models(draw, *, static: bool = False, opsets=range(13, 22)) -> RandomModel:
    seed = draw(st.integers(0, 2**32 - 1))
    rng = np.random.default_rng(seed)
    b = _Builder(draw, rng)
    opset = draw(st.sampled_from(list(opsets)))
    batch = draw(st.integers(1, 3))
    cnn = draw(st.booleans())
    shape = (batch, draw(st.integers(1, 4)), draw(st.integers(3, 7)), draw(st.integers(3, 7))) if cnn else \
        (batch, draw(st.integers(1, 10)))
    b.shapes["x"] = shape
    x = "x"
    kinds = ["linear", "bn", "act", "add", "mul", "residual", "identity", "pool"]
    for kind in draw(st.lists(st.sampled_from(kinds), min_size=1, max_size=7)):
        x = _layer(b, x, kind, opset)
    if cnn and draw(st.booleans()):  # classifier head
        p = b.node("GlobalAveragePool", [x], b.shapes[x][:2] + (1, 1))
        x = b.node("Flatten", [p], b.shapes[x][:2])
        x = _layer(b, x, "linear", opset)
    if not cnn and draw(st.booleans()):
        x = b.node("Softmax", [x], b.shapes[x], axis=-1)
    if x == "x":
        x = _layer(b, x, "act", opset)
    out_shape = b.shapes[x]
    in_dims = list(shape) if static else ["N", *shape[1:]]
    out_dims = list(out_shape) if static else ["N", *out_shape[1:]]
    graph = helper.make_graph(b.nodes, "random", [helper.make_tensor_value_info("x", TensorProto.FLOAT, in_dims)],
                              [helper.make_tensor_value_info(x, TensorProto.FLOAT, out_dims)], b.inits)
    opsets_ = [helper.make_opsetid("", opset)]
    model = helper.make_model(graph, opset_imports=opsets_, producer_name="hypothesis")
    model.ir_version = min(helper.find_min_ir_version_for(opsets_), 10)
    onnx.checker.check_model(model)
    feeds = [{"x": rng.normal(0, 1, shape).astype(np.float32)} for _ in range(4)]
    return RandomModel(model, feeds)


def _assert_close(got: list[np.ndarray], want: list[np.ndarray], tol: float = 1e-5, what: str = "") -> None:
    for g, w in zip(got, want):
        assert g.shape == w.shape, what
        scale = max(1.0, float(np.abs(w).max()))
        err = float(np.abs(g.astype(np.float64) - w).max())
        assert err <= tol * scale, f"{what}: max error {err:.3g} > {tol:g} x {scale:.3g}"


# ------------------------------------------------------------------------------------------------ exact passes
def _run_pass(name: str, rm: RandomModel) -> onnx.ModelProto:
    ctx = PassContext(profile=load_profile("tensorrt"))
    if getattr(make_pass(name), "needs_stats", False):
        ctx.stats = run_calibration(rm.model, rm.feeds, per_channel=api._channel_tensors(rm.model))
    graph = to_graph(rm.model)
    PassManager().run(graph, [make_pass(name)], ctx)
    return to_model(graph, rm.model)


@pytest.mark.parametrize("name", EXACT_PASSES)
@PROPS
@given(rm=random_models())
def test_exact_pass_preserves_outputs(name, rm):
    before = rm.model.SerializeToString()
    new = _run_pass(name, rm)
    assert rm.model.SerializeToString() == before, "a pass modified its input model"
    onnx.checker.check_model(new)
    assert [o.name for o in new.graph.output] == [o.name for o in rm.model.graph.output]
    assert [i.name for i in new.graph.input] == [i.name for i in rm.model.graph.input]
    for feed in rm.feeds[:2]:
        _assert_close(run_ort(new, feed), run_ort(rm.model, feed), what=name)


@PROPS
@given(rm=random_models())
def test_canonical_pipeline_preserves_outputs(rm):
    canonical, _ = api.canonicalize(rm.model)
    for feed in rm.feeds[:2]:
        _assert_close(run_ort(canonical, feed), run_ort(rm.model, feed), what="canonicalize")


# ------------------------------------------------------------------------------------------------ Q/DQ error bound
def _values(model: onnx.ModelProto, feed: dict) -> dict[str, np.ndarray]:
    """Every tensor of ``model`` on ``feed`` (ORT, no graph optimisation: Q/DQ run literally)."""
    names = [o for n in model.graph.node for o in n.output if o]
    session = make_session(model, outputs=names, optimize="none")
    outs = [o.name for o in session.get_outputs()]
    return {**feed, **dict(zip(outs, session.run(outs, feed)))}


def _float_twin(q: onnx.ModelProto, canonical: onnx.ModelProto) -> onnx.ModelProto:
    """``q`` with each activation Q->DQ made an Identity and each quantized constant restored to its float value."""
    floats = {t.name: t for t in canonical.graph.initializer}
    inits = {t.name for t in q.graph.initializer}
    producer = {o: n for n in q.graph.node for o in n.output}
    twin = onnx.ModelProto()
    twin.CopyFrom(q)
    del twin.graph.node[:]
    for n in q.graph.node:
        if n.op_type == "QuantizeLinear":
            continue
        if n.op_type == "DequantizeLinear" and n.input[0] in inits:
            src = n.input[0].removesuffix("/quantized")
            assert src in floats, f"no float original for quantized constant {n.input[0]}"
            twin.graph.node.append(helper.make_node("Constant", [], [n.output[0]], value=floats[src]))
        elif n.op_type == "DequantizeLinear":
            twin.graph.node.append(helper.make_node("Identity", [producer[n.input[0]].input[0]], [n.output[0]]))
        else:
            twin.graph.node.append(n)
    return twin


def _conv_abs(x: np.ndarray, w: np.ndarray, pads: list[int], group: int) -> np.ndarray:
    """conv(x, w) for non-negative x and w (stride 1), in float64."""
    n, c, h, wd = x.shape
    k = w.shape[2]
    xp = np.pad(x, ((0, 0), (0, 0), (pads[0], pads[2]), (pads[1], pads[3])))
    oh, ow = xp.shape[2] - k + 1, xp.shape[3] - w.shape[3] + 1
    cols = np.stack([xp[:, :, i:i + oh, j:j + ow] for i in range(k) for j in range(w.shape[3])], axis=2)
    cg, og = c // group, w.shape[0] // group
    out = [np.einsum("nckhw,ock->nohw", cols[:, g * cg:(g + 1) * cg], w[g * og:(g + 1) * og].reshape(og, cg, -1))
           for g in range(group)]
    return np.concatenate(out, axis=1)


def _linear_abs(node, x: np.ndarray, w: np.ndarray) -> np.ndarray:
    attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
    if node.op_type == "Conv":
        return _conv_abs(x, w, list(attrs.get("pads", [0, 0, 0, 0])), int(attrs.get("group", 1)))
    if node.op_type == "Gemm" and attrs.get("transB", 0):
        w = w.T
    return x @ w


def error_bound(q: onnx.ModelProto, fv: dict, qv_consts: dict, twin_consts: dict) -> dict[str, np.ndarray]:
    """Elementwise bound on |quantized - float| for every tensor of ``q``, propagated from the graph inputs."""
    inits = {t.name: numpy_helper.to_array(t) for t in q.graph.initializer}
    e: dict[str, np.ndarray] = {i.name: np.zeros_like(fv[i.name], np.float64) for i in q.graph.input}
    producer = {o: n for n in q.graph.node for o in n.output}

    def val(name):  # the float value of a tensor or constant
        return fv[name] if name in fv else twin_consts.get(name, inits.get(name))

    def err(name):  # quantized constants: their exact rounding error; float constants: none
        if name in e:
            return e[name]
        if name in qv_consts:
            return np.abs(qv_consts[name] - twin_consts[name])
        return np.zeros_like(val(name), np.float64)

    for n in q.graph.node:
        op, ins, out = n.op_type, list(n.input), n.output[0]
        if op == "QuantizeLinear" or (op == "DequantizeLinear" and n.input[0] in inits):
            continue
        if op == "DequantizeLinear":
            qn = producer[ins[0]]
            x, scale = fv[qn.input[0]], float(inits[qn.input[1]])
            zp = inits[qn.input[2]]
            info = np.iinfo(zp.dtype)
            lo, hi = scale * (info.min - int(zp)), scale * (info.max - int(zp))
            clipped = np.maximum(0, np.maximum(x - hi, lo - x))
            e[out] = e[qn.input[0]] + scale / 2 + clipped
            continue
        if op in ("Conv", "MatMul", "Gemm"):
            x, w_name = ins[0], ins[1]
            w_q = qv_consts.get(w_name, val(w_name)).astype(np.float64)
            bound = _linear_abs(n, err(x), np.abs(w_q)) + _linear_abs(n, np.abs(val(x)), err(w_name))
            if len(ins) > 2 and ins[2]:
                b = err(ins[2])
                bound = bound + (b.reshape(1, -1, 1, 1) if op == "Conv" else b)
            e[out] = bound
        elif op in ("Relu", "LeakyRelu", "Clip", "Tanh", "Identity", "Dropout"):
            e[out] = err(ins[0])
        elif op == "Sigmoid":
            e[out] = 0.25 * err(ins[0])
        elif op == "MaxPool":
            t = err(ins[0])
            pad = np.pad(t, ((0, 0), (0, 0), (1, 1), (1, 1)))
            e[out] = np.max([pad[:, :, i:i + t.shape[2], j:j + t.shape[3]] for i in range(3) for j in range(3)], 0)
        elif op in ("Add", "Sub"):
            e[out] = err(ins[0]) + err(ins[1])
        elif op == "Mul":
            a, b = val(ins[0]), val(ins[1])
            ea, eb = err(ins[0]), err(ins[1])
            e[out] = np.abs(a) * eb + np.abs(b) * ea + ea * eb
        elif op == "BatchNormalization":
            g, var = val(ins[1]), val(ins[4])
            eps = next((a.f for a in n.attribute if a.name == "epsilon"), 1e-5)
            factor = np.abs(g) / np.sqrt(var + eps)
            e[out] = err(ins[0]) * (factor.reshape(1, -1, 1, 1) if fv[ins[0]].ndim == 4 else factor)
        elif op == "GlobalAveragePool":
            e[out] = err(ins[0]).mean(axis=(2, 3), keepdims=True)
        elif op == "Flatten":
            e[out] = err(ins[0]).reshape(fv[out].shape)
        elif op == "Softmax":  # z' in z +- E  =>  p' / p in [exp(-2E), exp(2E)]
            big = err(ins[0]).max(axis=-1, keepdims=True)
            e[out] = np.minimum(1.0, fv[out] * np.expm1(2 * big))
        elif op == "Constant":
            continue
        else:
            raise AssertionError(f"no error rule for {op}")
        e[out] = np.broadcast_to(e[out], fv[out].shape)
    return e


def bound_excess(q: onnx.ModelProto, float_model: onnx.ModelProto, feeds: list[dict]) -> float:
    """How far the quantized model's output error exceeds the scale-derived bound (<= 0: within it)."""
    canonical, _ = api.canonicalize(float_model)
    twin = _float_twin(q, canonical)
    inits = {t.name for t in q.graph.initializer}
    weight_dq = [n.output[0] for n in q.graph.node if n.op_type == "DequantizeLinear" and n.input[0] in inits]
    worst = -np.inf
    for feed in feeds:
        qv, fv = _values(q, feed), _values(twin, feed)
        bound = error_bound(q, fv, {k: qv[k].astype(np.float64) for k in weight_dq},
                            {k: fv[k].astype(np.float64) for k in weight_dq})
        _assert_close(run_ort(twin, feed), run_ort(float_model, feed), tol=1e-4, what="float twin")
        for o in q.graph.output:
            got, want = qv[o.name].astype(np.float64), fv[o.name].astype(np.float64)
            slack = 1e-4 * (1 + np.abs(want))  # float32 rounding of the two evaluations
            worst = max(worst, float((np.abs(got - want) - (bound[o.name] * (1 + 1e-3) + slack)).max()))
    return worst


def _quantize(rm: RandomModel, target, tmp: Path, **kw) -> Path:
    src, out = tmp / "float.onnx", tmp / "q.onnx"
    onnx.save(rm.model, str(src))
    api.quantize(src, target=target, calib=rm.feeds, output=out, **kw)
    return out


Q_TARGETS = ["tensorrt", "qnn", "qnn-a16w8", "ort-cpu", "coreml", "tensorrt-int4"]


@pytest.mark.parametrize("target", [t for t in Q_TARGETS if t in {p.name for p in list_targets()}])
@settings(PROPS, max_examples=30)
@given(rm=random_models(static=True))
def test_quantized_error_within_scale_bound(target, rm, tmp_path_factory):
    # bias correction moves biases on purpose (tests/test_bias_correction.py) and graph passes such as SmoothQuant
    # rescale weights (exact in float, tested in tests/passes); the bound is about Q/DQ alone
    profile = load_profile(target)
    profile = dataclasses.replace(profile, passes=(),
                                  weights=dataclasses.replace(profile.weights, bias_correction=False))
    q = onnx.load(str(_quantize(rm, profile, tmp_path_factory.mktemp("q"), check=False)))
    excess = bound_excess(q, rm.model, rm.feeds[:2])
    assert excess <= 0, f"{target}: output error exceeds the scale-derived bound by {excess:.3g}"


def test_bound_catches_a_wrong_scale(tmp_path):
    """The bound is tight enough to matter: a DequantizeLinear whose scale disagrees with its Q breaks it."""
    rng = np.random.default_rng(0)
    w = numpy_helper.from_array(rng.normal(0, 0.5, (4, 6)).astype(np.float32), "w")
    graph = helper.make_graph([helper.make_node("MatMul", ["x", "w"], ["y"])], "g",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 4])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 6])], [w])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 7
    rm = RandomModel(model, [{"x": rng.normal(0, 1, (2, 4)).astype(np.float32)} for _ in range(4)])
    q = onnx.load(str(_quantize(rm, "tensorrt", tmp_path)))
    assert bound_excess(q, model, rm.feeds) <= 0
    dq = next(n for n in q.graph.node if n.op_type == "DequantizeLinear" and n.input[0].startswith("x"))
    scale = next(t for t in q.graph.initializer if t.name == dq.input[1])
    wrong = numpy_helper.from_array(numpy_helper.to_array(scale) * np.float32(1.05), "wrong_scale")
    q.graph.initializer.append(wrong)
    dq.input[1] = "wrong_scale"
    assert bound_excess(q, model, rm.feeds) > 0


# ------------------------------------------------------------------------------------------------ edgeq check
@pytest.mark.parametrize("target", sorted(p.name for p in list_targets()))
@settings(PROPS, max_examples=12)
@given(rm=random_models(static=True))
def test_check_accepts_own_output(target, rm, tmp_path_factory):
    out = _quantize(rm, target, tmp_path_factory.mktemp("chk"))
    result = api.check(out, target=target)
    assert result.passed, [str(f) for f in result.errors]
