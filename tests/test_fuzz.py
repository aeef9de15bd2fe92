"""Time-bounded fuzzing (``-m slow``) of the model loader, the pipeline behind it and the profile loader.

Valid model bytes and profile YAML are mutated by hypothesis -- byte edits, and edits that keep the file parseable
but break what is inside (op types, tensor names, dims, dtypes, opsets, attributes, external data; YAML keys, value
types, ``extends`` chains). Every input must give a result or an :class:`EdgeqError`: any other exception, or an
input that runs past ``PER_INPUT_S``, is a failure. Each test runs for ``EDGEQ_FUZZ_SECONDS`` (default 60), prints
how many inputs it tried and what it found, and saves failing inputs under the test's tmp folder.
"""

from __future__ import annotations

import os
import signal
import time
import traceback
from pathlib import Path
from typing import Any, Callable

import numpy as np
import onnx
import pytest
import yaml
from hypothesis import HealthCheck, Phase, given, seed, settings, strategies as st
from onnx import TensorProto, helper

from conftest import ROOT, make_cnn, make_transformer_block

from edgeq import api
from edgeq.errors import EdgeqError
from edgeq.inspect import describe
from edgeq.model_io import load_model
from edgeq.profiles import load_profile, profile_yaml

pytestmark = pytest.mark.slow

SECONDS = float(os.environ.get("EDGEQ_FUZZ_SECONDS", "60"))
PER_INPUT_S = 20


class _Hang(Exception):
    pass


def _alarm(signum, frame):
    raise _Hang(f"no result after {PER_INPUT_S} s")


def fuzz(label: str, strategy, target: Callable[[Any, Path], None], workdir: Path,
         seconds: float = SECONDS) -> dict:
    """Run ``target`` on inputs drawn from ``strategy`` until ``seconds`` pass; count outcomes and failures."""
    stats = {"tried": 0, "accepted": 0, "rejected": 0, "failures": []}
    deadline = time.monotonic() + seconds
    batch = 0
    old = signal.signal(signal.SIGALRM, _alarm)
    try:
        while time.monotonic() < deadline:
            @settings(max_examples=50, deadline=None, database=None, phases=[Phase.generate],
                      suppress_health_check=list(HealthCheck))
            @seed(batch)
            @given(strategy)
            def one(case):
                if time.monotonic() > deadline:
                    return
                stats["tried"] += 1
                signal.alarm(PER_INPUT_S)
                try:
                    target(case, workdir)
                    stats["accepted"] += 1
                except EdgeqError:
                    stats["rejected"] += 1
                except Exception as exc:  # noqa: BLE001 - the point is to catch whatever escapes
                    where = workdir / f"failure-{len(stats['failures'])}"
                    where.write_bytes(case if isinstance(case, bytes) else str(case).encode())
                    stats["failures"].append(f"{type(exc).__name__}: {str(exc).splitlines()[0][:200] if str(exc) else ''}"
                                             f" (input saved as {where.name}; "
                                             f"{traceback.extract_tb(exc.__traceback__)[-1].filename.split('/')[-1]}:"
                                             f"{traceback.extract_tb(exc.__traceback__)[-1].lineno})")
                finally:
                    signal.alarm(0)

            one()
            batch += 1
    finally:
        signal.signal(signal.SIGALRM, old)
    unique = sorted(set(f.split(" (input saved")[0] for f in stats["failures"]))
    print(f"\n{label}: {stats['tried']} inputs in {seconds:.0f} s: {stats['accepted']} accepted, "
          f"{stats['rejected']} rejected with an EdgeqError, {len(stats['failures'])} failures "
          f"({len(unique)} distinct)")
    for f in unique:
        print(f"  {f}")
    return stats


# ------------------------------------------------------------------------------------------------ models
def _tiny() -> onnx.ModelProto:
    w = onnx.numpy_helper.from_array(np.random.default_rng(0).normal(0, 0.5, (4, 3)).astype(np.float32), "w")
    nodes = [helper.make_node("MatMul", ["x", "w"], ["h"], name="mm"), helper.make_node("Relu", ["h"], ["y"], name="r")]
    graph = helper.make_graph(nodes, "tiny", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 3])], [w])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 7
    return model


SEEDS = [_tiny(), make_cnn(), make_transformer_block(seq=4, dim=8), onnx.load(str(ROOT / "calibration_data" /
                                                                                     "digits_cnn.onnx"))]
OPS = ["Relu", "Conv", "MatMul", "Gemm", "Add", "Reshape", "Loop", "If", "QuantizeLinear", "DequantizeLinear",
       "Softmax", "Concat", "Identity", "Constant", "Shape", "Gather", "NoSuchOp", "", "Cast"]
NAMES = ["x", "w", "h", "y", "", "ghost", "c1", "logits", "image", "a" * 300, "../x", "\x00"]


def _tensors(m: onnx.ModelProto) -> list[str]:
    return [i.name for i in m.graph.input] + [o for n in m.graph.node for o in n.output] + \
        [t.name for t in m.graph.initializer]


def mutate_structure(m: onnx.ModelProto, draw) -> None:
    """One edit that keeps the protobuf valid but may break the model."""
    g = m.graph
    kind = draw(st.sampled_from(["op", "input", "output", "drop_node", "dup_node", "reverse", "attr", "dims",
                                      "dtype", "raw", "opset", "ir", "in_type", "in_dims", "drop_output",
                                      "external", "domain", "value_info", "drop_init"]))
    pick = lambda seq: draw(st.integers(0, len(seq) - 1)) if len(seq) else None  # noqa: E731
    i = pick(g.node)
    if kind == "op" and i is not None:
        g.node[i].op_type = draw(st.sampled_from(OPS))
    elif kind == "input" and i is not None and g.node[i].input:
        j = pick(g.node[i].input)
        g.node[i].input[j] = draw(st.sampled_from(NAMES + _tensors(m)))
    elif kind == "output" and i is not None and g.node[i].output:
        g.node[i].output[0] = draw(st.sampled_from(NAMES + _tensors(m)))
    elif kind == "drop_node" and i is not None:
        del g.node[i]
    elif kind == "dup_node" and i is not None:
        g.node.append(g.node[i])
    elif kind == "reverse":
        nodes = list(g.node)[::-1]
        del g.node[:]
        g.node.extend(nodes)
    elif kind == "attr" and i is not None:
        node = g.node[i]
        if node.attribute and draw(st.booleans()):
            del node.attribute[pick(node.attribute)]
        else:
            name = draw(st.sampled_from(["axis", "pads", "group", "kernel_shape", "transB", "perm", "to",
                                              "epsilon", "alpha", "strides"]))
            value = draw(st.one_of(st.integers(-2**40, 2**40), st.floats(allow_nan=True),
                                        st.lists(st.integers(-5, 2**33), max_size=6), st.text(max_size=5)))
            if isinstance(value, list) and not value:
                value = [0]
            node.attribute.append(helper.make_attribute(name, value))
    elif kind in ("dims", "dtype", "raw", "external", "drop_init") and g.initializer:
        t = g.initializer[pick(g.initializer)]
        if kind == "dims":
            t.dims[:] = draw(st.lists(st.integers(-3, 2**40), max_size=5))
        elif kind == "dtype":
            t.data_type = draw(st.integers(0, 30))
        elif kind == "raw":
            t.raw_data = t.raw_data[: draw(st.integers(0, max(0, len(t.raw_data))))]
        elif kind == "external":
            t.data_location = TensorProto.EXTERNAL
            del t.external_data[:]
            for key, value in draw(st.lists(st.tuples(
                    st.sampled_from(["location", "offset", "length", "checksum", "bogus"]),
                    st.sampled_from(["w.bin", "../w.bin", "/etc/hostname", "", "-5", "99999999999", "0", "\x00x"])),
                    max_size=3)):
                e = t.external_data.add()
                e.key, e.value = key, value
        else:
            g.initializer.remove(t)
    elif kind == "opset":
        m.opset_import[0].version = draw(st.integers(-1, 40))
    elif kind == "domain":
        imp = m.opset_import.add()
        imp.domain, imp.version = draw(st.sampled_from(["", "com.microsoft", "x", "ai.onnx"])), \
            draw(st.integers(0, 30))
    elif kind == "ir":
        m.ir_version = draw(st.integers(-1, 20))
    elif kind == "in_type" and g.input:
        g.input[pick(g.input)].type.tensor_type.elem_type = draw(st.integers(0, 30))
    elif kind == "in_dims" and g.input:
        shape = g.input[pick(g.input)].type.tensor_type.shape
        if shape.dim:
            d = shape.dim[pick(shape.dim)]
            choice = draw(st.one_of(st.integers(-3, 2**40), st.text(max_size=3)))
            if isinstance(choice, int):
                d.dim_value = choice
            else:
                d.dim_param = choice
    elif kind == "drop_output" and g.output:
        del g.output[pick(g.output)]
    elif kind == "value_info":
        vi = g.value_info.add()
        vi.name = draw(st.sampled_from(NAMES + _tensors(m)))
        vi.type.tensor_type.elem_type = draw(st.integers(0, 30))


@st.composite
def mutated_models(draw) -> bytes:
    base = draw(st.sampled_from(range(len(SEEDS))))
    m = onnx.ModelProto()
    m.CopyFrom(SEEDS[base])
    for _ in range(draw(st.integers(1, 4))):
        mutate_structure(m, draw)
    raw = m.SerializeToString()
    for _ in range(draw(st.integers(0, 2))):  # byte-level edits on top
        if not raw:
            break
        pos = draw(st.integers(0, len(raw) - 1))
        edit = draw(st.sampled_from(["flip", "cut", "insert", "truncate"]))
        if edit == "flip":
            raw = raw[:pos] + bytes([raw[pos] ^ draw(st.integers(1, 255))]) + raw[pos + 1:]
        elif edit == "cut":
            raw = raw[:pos] + raw[pos + draw(st.integers(1, 64)):]
        elif edit == "insert":
            raw = raw[:pos] + draw(st.binary(min_size=1, max_size=16)) + raw[pos:]
        else:
            raw = raw[:pos]
    return raw


def _load_everything(raw: bytes, workdir: Path) -> None:
    path = workdir / "fuzz.onnx"
    path.write_bytes(raw)
    try:
        load_model(path, check=False)
        describe(path)
        api.check(path, target="qnn")
    finally:
        load_model(path)


def test_fuzz_model_loader(tmp_path):
    stats = fuzz("model loader", mutated_models(), _load_everything, tmp_path)
    assert stats["tried"] > 0
    assert not stats["failures"], "\n".join(stats["failures"][:20])


CALIB = {"x": [{"x": np.ones((1, 4), np.float32)}], "image": [{"image": np.ones((1, 1, 8, 8), np.float32)}]}


def _quantize_mutant(raw: bytes, workdir: Path) -> None:
    path = workdir / "fuzz.onnx"
    path.write_bytes(raw)
    model = load_model(path)
    names = [i.name for i in model.graph.input if i.name not in {t.name for t in model.graph.initializer}]
    rng = np.random.default_rng(0)
    feeds = CALIB.get(names[0]) if len(names) == 1 and names[0] in CALIB else \
        [{n: rng.normal(0, 1, [d if isinstance(d, int) and d > 0 else 1 for d in spec.shape]).astype(spec.dtype)
          for n, spec in ((s.name, s) for s in api.model_inputs(model)) if spec.dtype is not None}]
    out = workdir / "fuzz.q.onnx"
    api.quantize(path, target="qnn", calib=feeds, output=out, latency_runs=0)


@st.composite
def loadable_mutants(draw) -> bytes:
    """Mutants of the small seeds that mostly still load, to push the fuzzing into the pipeline."""
    m = onnx.ModelProto()
    m.CopyFrom(SEEDS[draw(st.sampled_from([0, 1]))])
    mutate_structure(m, draw)
    return m.SerializeToString()


def test_fuzz_quantize_pipeline(tmp_path):
    stats = fuzz("quantize pipeline", loadable_mutants(), _quantize_mutant, tmp_path)
    assert stats["tried"] > 0
    assert not stats["failures"], "\n".join(stats["failures"][:20])


# ------------------------------------------------------------------------------------------------ profiles
BUILTIN_YAML = {p.stem: p.read_text() for p in sorted((ROOT / "targets").glob("*.yaml"))}
VALUES = st.one_of(st.none(), st.booleans(), st.integers(-2**64, 2**64), st.floats(allow_nan=True),
                   st.text(max_size=12), st.lists(st.text(max_size=6), max_size=3),
                   st.dictionaries(st.text(max_size=6), st.integers(), max_size=2))
KEYS = ["name", "extends", "min_opset", "static_shapes", "activations", "weights", "placement", "passes",
        "thresholds", "overrides", "compile", "dtype", "symmetric", "observer", "percentile", "block_size",
        "mode", "ops", "fixed_output_scales", "min_cosine", "backend", "bogus", ""]


def _mutate_mapping(d: Any, draw, depth: int = 0) -> Any:
    if not isinstance(d, dict) or not d or depth > 3:
        return draw(VALUES)
    d = dict(d)
    key = draw(st.sampled_from(sorted(d, key=str)))
    edit = draw(st.sampled_from(["value", "deeper", "delete", "add", "extends"]))
    if edit == "value":
        d[key] = draw(VALUES)
    elif edit == "deeper":
        d[key] = _mutate_mapping(d[key], draw, depth + 1)
    elif edit == "delete":
        del d[key]
    elif edit == "add":
        d[draw(st.sampled_from(KEYS))] = draw(VALUES)
    else:
        d["extends"] = draw(st.sampled_from(["tensorrt", "qnn", "fuzz.yaml", "other.yaml", "nope", "", ".", "/",
                                             "targets", "../fuzz.yaml"]))
    return d


@st.composite
def mutated_profiles(draw) -> str:
    name = draw(st.sampled_from(sorted(BUILTIN_YAML)))
    text = BUILTIN_YAML[name]
    if draw(st.booleans()):
        data = yaml.safe_load(text)
        for _ in range(draw(st.integers(1, 3))):
            data = _mutate_mapping(data, draw)
        text = yaml.safe_dump(data, sort_keys=False)
    for _ in range(draw(st.integers(0, 3))):
        pos = draw(st.integers(0, len(text)))
        edit = draw(st.sampled_from(["insert", "cut", "replace"]))
        chunk = draw(st.sampled_from([":", " ", "\n", "\t", "-", "[", "{", "&a", "*a", "!!python/object:os.system",
                                      "'", '"', "#", "? ", "extends: fuzz.yaml\n", "\x00", "é"]))
        if edit == "insert":
            text = text[:pos] + chunk + text[pos:]
        elif edit == "cut":
            text = text[:pos] + text[pos + draw(st.integers(1, 20)):]
        else:
            text = text[:pos] + chunk + text[pos + len(chunk):]
    return text


def _load_profile_text(text: str, workdir: Path) -> None:
    path = workdir / "fuzz.yaml"
    path.write_text(text, encoding="utf-8", errors="surrogateescape")
    (workdir / "other.yaml").write_text("extends: fuzz.yaml\n")
    profile = load_profile(path)
    again = workdir / "roundtrip.yaml"
    again.write_text(profile_yaml(profile))
    assert load_profile(again).to_dict() == profile.to_dict(), "profile_yaml does not round-trip"


def test_fuzz_profile_loader(tmp_path):
    stats = fuzz("profile loader", mutated_profiles(), _load_profile_text, tmp_path)
    assert stats["tried"] > 0
    assert not stats["failures"], "\n".join(stats["failures"][:20])
