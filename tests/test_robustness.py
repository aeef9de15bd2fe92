"""Malformed inputs give a one-line error and exit 2, never a traceback, a hang, a partial output or a changed input.

A corpus of broken models, calibration data, profiles and output paths is built once per module. Every case runs
through the real CLI (``python -m edgeq ...`` in its own process, see ``edgeq_cli`` in conftest) and through the
Python API, and each run is checked the same way: exit code 2 (or an :class:`EdgeqError`), exactly one ``error:``
line naming the problem, no ``Traceback``, and every file in the corpus and the output folder byte-for-byte as
before (so: input untouched, no output, no temporary or partial file left behind).
"""

from __future__ import annotations

import hashlib
import importlib.util
import re
import shutil
import zipfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from conftest import ROOT

from edgeq import api
from edgeq.errors import EdgeqError
from edgeq.profiles import load_profile

DIGITS = ROOT / "calibration_data"
HAS_COMPILE = importlib.util.find_spec("edgeq.compile") is not None


# ------------------------------------------------------------------------------------------------ corpus
def _digits_like(*nodes, inits=(), opset=13, inputs=None, outputs=None, domains=()) -> onnx.ModelProto:
    """A tiny graph with the digits model's interface (image [N,1,8,8] -> y)."""
    inputs = inputs or [helper.make_tensor_value_info("image", TensorProto.FLOAT, ["N", 1, 8, 8])]
    outputs = outputs or [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 4, 6, 6])]
    graph = helper.make_graph(list(nodes), "g", inputs, outputs, list(inits))
    opsets = [helper.make_opsetid("", opset)] + [helper.make_opsetid(d, 1) for d in domains]
    model = helper.make_model(graph, opset_imports=opsets)
    model.ir_version = 7
    return model


def _external(model: onnx.ModelProto, location: str) -> onnx.ModelProto:
    """Mark the model's first initializer as stored externally at ``location``."""
    t = model.graph.initializer[0]
    t.ClearField("raw_data")
    t.data_location = TensorProto.EXTERNAL
    for k, v in (("location", location), ("offset", "0"), ("length", str(4 * int(np.prod(t.dims))))):
        e = t.external_data.add()
        e.key, e.value = k, v
    return model


def build_models(d: Path) -> None:
    good = (DIGITS / "digits_cnn.onnx").read_bytes()
    (d / "model.onnx").write_bytes(good)
    (d / "truncated.onnx").write_bytes(good[: len(good) // 2])
    (d / "corrupt.onnx").write_bytes(good[:200] + b"\xff" * 64 + good[264:])
    (d / "text.onnx").write_text("this is a README, not a model\n" * 20)
    png = (DIGITS / "digits_png" / "0001.png").read_bytes()
    (d / "image.onnx").write_bytes(png)
    (d / "image.png").write_bytes(png)
    (d / "empty.onnx").write_bytes(b"")
    (d / "folder.onnx").mkdir()
    (d / "header_only.onnx").write_bytes(helper.make_model(helper.make_graph([], "g", [], [])).SerializeToString()[:2])
    w = numpy_helper.from_array(np.ones((4, 1, 3, 3), np.float32), "w")
    conv = helper.make_node("Conv", ["image", "w"], ["c"], name="conv")
    # A cycle: a = Add(c, b); b = Relu(a).
    onnx.save(_digits_like(conv, helper.make_node("Add", ["c", "b"], ["a"], name="add"),
                           helper.make_node("Relu", ["a"], ["b"], name="relu"),
                           helper.make_node("Identity", ["b"], ["y"], name="out"), inits=[w]), str(d / "cycle.onnx"))
    onnx.save(_digits_like(conv, helper.make_node("Add", ["c", "ghost"], ["y"], name="add"), inits=[w]),
              str(d / "dangling.onnx"))
    onnx.save(_digits_like(conv, helper.make_node("Relu", ["c"], ["y"], name="r1"),
                           helper.make_node("Relu", ["c"], ["y"], name="r2"), inits=[w]), str(d / "two_writers.onnx"))
    onnx.save(_digits_like(conv, helper.make_node("FrobnicateV2", ["c"], ["y"], name="frob"), inits=[w]),
              str(d / "unknown_op.onnx"))
    onnx.save(_digits_like(conv, helper.make_node("MyOp", ["c"], ["y"], name="mine", domain="com.example"),
                           inits=[w], domains=["com.example"]), str(d / "custom_op.onnx"))
    onnx.save(_digits_like(helper.make_node("Relu", ["image"], ["y"], name="r"), opset=7), str(d / "opset7.onnx"))
    onnx.save(_digits_like(conv, helper.make_node("Relu", ["c"], ["y"]), inits=[w], opset=99), str(d / "opset99.onnx"))
    onnx.save(_external(_digits_like(conv, helper.make_node("Relu", ["c"], ["y"]), inits=[w]), "weights.bin"),
              str(d / "ext_missing.onnx"))
    (d / "secret.bin").write_bytes(np.ones(36, np.float32).tobytes())
    (d / "sub").mkdir()
    onnx.save(_external(_digits_like(conv, helper.make_node("Relu", ["c"], ["y"]), inits=[w]), "../secret.bin"),
              str(d / "sub" / "ext_outside.onnx"))
    onnx.save(_external(_digits_like(conv, helper.make_node("Relu", ["c"], ["y"]), inits=[w]), "/etc/hostname"),
              str(d / "ext_absolute.onnx"))
    onnx.save(_digits_like(conv, helper.make_node("Relu", ["c"], ["y"]), inits=[w],
                           inputs=[helper.make_tensor_value_info("image", TensorProto.STRING, ["N", 1, 8, 8])]),
              str(d / "string_input.onnx"))
    q = helper.make_node("QuantizeLinear", ["image", "s", "z"], ["q"], name="q")
    dq = helper.make_node("DequantizeLinear", ["q", "s", "z"], ["y"], name="dq")
    onnx.save(_digits_like(q, dq, inits=[numpy_helper.from_array(np.float32(0.1), "s"),
                                         numpy_helper.from_array(np.uint8(128), "z")]), str(d / "already_qdq.onnx"))
    (d / "dangling_link.onnx").symlink_to(d / "nothing-here.onnx")
    (d / "model-link.onnx").hardlink_to(d / "model.onnx")


def build_data(d: Path) -> None:
    calib = np.load(DIGITS / "digits_calib.npz")["image"][:16]
    shutil.copy(DIGITS / "digits_calib.npz", d / "calib.npz")
    np.savez(d / "eval.npz", image=np.load(DIGITS / "digits_eval.npz")["image"][:16])
    np.savez(d / "wrong_name.npz", pixels=calib)
    np.savez(d / "extra_name.npz", image=calib, mask=calib)
    np.savez(d / "int_dtype.npz", image=calib.astype(np.int32))
    np.savez(d / "str_dtype.npz", image=np.full((4, 1, 8, 8), "x"))
    np.savez(d / "complex_dtype.npz", image=calib.astype(np.complex64))
    np.savez(d / "bool_dtype.npz", image=calib > 0)
    np.savez(d / "wrong_rank.npz", image=calib[:, 0])
    np.savez(d / "wrong_dims.npz", image=np.zeros((4, 1, 9, 9), np.float32))
    np.savez(d / "scalar.npz", image=np.float32(1.0))
    nan, inf = calib.copy(), calib.copy()
    nan[3, 0, 2, 2], inf[5, 0, 1, 1] = np.nan, -np.inf
    np.savez(d / "nan.npz", image=nan)
    np.savez(d / "inf.npz", image=inf)
    np.savez(d / "huge.npz", image=calib * np.float32(1e30))
    np.savez(d / "zero_samples.npz", image=np.zeros((0, 1, 8, 8), np.float32))
    np.savez(d / "no_arrays.npz")
    np.savez(d / "object.npz", image=np.array([{"a": 1}], dtype=object))
    (d / "corrupt.npz").write_bytes(b"PK\x03\x04" + bytes(range(256)) * 4)
    good = (d / "calib.npz").read_bytes()
    (d / "truncated.npz").write_bytes(good[: len(good) // 2])
    with zipfile.ZipFile(d / "bad_member.npz", "w") as z:
        z.writestr("image.npy", b"\x93NUMPY garbage")
    (d / "calib.txt").write_text("1 2 3\n")
    (d / "empty_dir").mkdir()
    (d / "junk_dir").mkdir()
    (d / "junk_dir" / "notes.txt").write_text("nothing to see")
    (d / "npz_dir").mkdir()
    np.savez(d / "npz_dir" / "000.npz", image=calib[:1])
    (d / "npz_dir" / "001.npz").write_bytes(b"not a zip")
    (d / "png_dir").mkdir()
    shutil.copy(DIGITS / "digits_png" / "0001.png", d / "png_dir" / "0001.png")
    (d / "png_dir" / "0002.png").write_bytes(b"\x89PNG\r\n\x1a\n broken")
    shutil.copy(DIGITS / "digits_png.yaml", d / "png_dir" / "preprocess.yaml")
    (d / "bad_pre").mkdir()
    shutil.copy(DIGITS / "digits_png" / "0001.png", d / "bad_pre" / "0001.png")
    (d / "bad_pre" / "preprocess.yaml").write_text("size: [8, 8]\ngrayscale: true\nmena: [0.3]\n")
    for folder, text in (("pre_huge", "size: [100000, 100000]\ngrayscale: true\n"),
                         ("pre_std0", "size: [8, 8]\ngrayscale: true\nstd: [0]\n"),
                         ("pre_null_key", "~: 1\n")):
        (d / folder).mkdir()
        shutil.copy(DIGITS / "digits_png" / "0001.png", d / folder / "0001.png")
        (d / folder / "preprocess.yaml").write_text(text)
    (d / "calib_funcs.py").write_text(
        "import numpy as np\n"
        "def raises():\n    raise ValueError('the camera is unplugged')\n"
        "def not_iterable():\n    return 5\n"
        "def lists():\n    yield [np.zeros((1, 1, 8, 8), np.float32)]\n"
        "def bad_shape():\n    yield {'image': np.zeros((1, 3, 8, 8), np.float32)}\n"
        "def empty():\n    return []\n"
        "def fails_later():\n"
        "    yield {'image': np.zeros((1, 1, 8, 8), np.float32)}\n"
        "    raise RuntimeError('disk went away')\n"
        "NOT_CALLABLE = 3\n")
    (d / "broken_module.py").write_text("def f(:\n")


PROFILES = {
    "p_type_dtype.yaml": "extends: tensorrt\nactivations:\n  dtype: 8\n",
    "p_type_int.yaml": "extends: tensorrt\nmin_opset: '13'\n",
    "p_type_map.yaml": "extends: tensorrt\nthresholds: [1, 2]\n",
    "p_type_bool.yaml": "extends: tensorrt\nstatic_shapes: 'yes'\n",
    "p_type_list.yaml": "extends: tensorrt\nplacement:\n  ops: Conv\n",
    "p_literal.yaml": "extends: tensorrt\nplacement:\n  mode: everything\n",
    "p_unknown.yaml": "extends: tensorrt\nactivatons:\n  dtype: int8\n",
    "p_unknown_nested.yaml": "extends: tensorrt\nweights:\n  dtyp: int8\n",
    "p_cycle_a.yaml": "extends: p_cycle_b.yaml\n",
    "p_cycle_b.yaml": "extends: p_cycle_a.yaml\n",
    "p_self.yaml": "extends: p_self.yaml\n",
    "p_missing_parent.yaml": "extends: no_such_target\n",
    "p_missing_file.yaml": "extends: not_there.yaml\n",
    "p_extends_type.yaml": "extends: 5\n",
    "p_invalid.yaml": "activations: [unclosed\n  dtype: : int8\n",
    "p_tabs.yaml": "activations:\n\tdtype: int8\n",
    "p_empty.yaml": "",
    "p_list.yaml": "- tensorrt\n- qnn\n",
    "p_scalar.yaml": "tensorrt\n",
    "p_unknown_pass.yaml": "extends: tensorrt\npasses: [make_it_fast]\n",
    "p_pass_option.yaml": "extends: tensorrt\npasses:\n  - name: fold_constants\n    options: {bogus: 1}\n",
    "p_percentile.yaml": "extends: tensorrt\nactivations:\n  percentile: 150\n",
    "p_block.yaml": "extends: tensorrt\nweights:\n  block_size: -4\n",
    "p_override.yaml": "extends: tensorrt\noverrides:\n  - op_type: Conv\n    precision: int3\n",
    "p_fixed_scale.yaml": "extends: qnn\nplacement:\n  fixed_output_scales:\n    Sigmoid: {scale: -1, zero_point: 0}\n",
}


def build_profiles(d: Path) -> None:
    for name, text in PROFILES.items():
        (d / name).write_text(text)
    (d / "p_binary.yaml").write_bytes(bytes(range(256)))
    (d / "p_dir.yaml").mkdir()


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("corpus")
    build_models(d)
    build_data(d)
    build_profiles(d)
    return d


# ------------------------------------------------------------------------------------------------ cases
@dataclass(frozen=True)
class Case:
    id: str
    argv: tuple[str, ...]  # "{d}" is the corpus folder, "{o}" the (empty) output folder of this run
    expect: str | None  # regex the error line must match (case-insensitive); None: a valid result
    full: bool = False  # only in the full matrix (-m slow): the same code path is covered by another command


def q(model="{d}/model.onnx", *, target="tensorrt", calib="{d}/calib.npz", out="{o}/out.onnx", extra=()):
    return ("quantize", model, "-t", target, "--calib", calib, "-o", out, *extra)


MODEL_CASES = {  # file -> what the error must say
    "truncated.onnx": r"truncated\.onnx.*not a valid ONNX model",
    "corrupt.onnx": r"corrupt\.onnx.*not a valid ONNX model",
    "text.onnx": r"text\.onnx.*(not a valid ONNX model|does not contain an ONNX graph)",
    "image.onnx": r"image\.onnx.*(not a valid ONNX model|does not contain an ONNX graph)",
    "image.png": r"image\.png.*(not a valid ONNX model|does not contain an ONNX graph)",
    "empty.onnx": r"empty\.onnx.*empty",
    "folder.onnx": r"folder\.onnx.*directory",
    "missing.onnx": r"not found.*missing\.onnx",
    "dangling_link.onnx": r"not found.*dangling_link\.onnx",
    "header_only.onnx": r"header_only\.onnx.*(does not contain an ONNX graph|not a valid ONNX model)",
    "cycle.onnx": r"cycle\.onnx.*(topologically sorted|cycle)",
    "dangling.onnx": r"dangling\.onnx.*ghost",
    "two_writers.onnx": r"two_writers\.onnx.*\by\b",
    "unknown_op.onnx": r"unknown_op\.onnx.*FrobnicateV2",
    "opset7.onnx": r"opset7\.onnx.*opset 7.*opset >= ",
    "opset99.onnx": r"opset99\.onnx.*opset 99",
    "ext_missing.onnx": r"ext_missing\.onnx.*external data.*weights\.bin",
    "sub/ext_outside.onnx": r"ext_outside\.onnx.*external data.*outside",
    "ext_absolute.onnx": r"ext_absolute\.onnx.*external data.*outside",
}
# Models that are legal ONNX but that edgeq cannot quantize; inspect and check still describe them (None: must
# succeed, exit 0 or 1).
UNSUPPORTED_CASES = {
    "custom_op.onnx": {"quantize": r"com\.example.*MyOp|MyOp.*com\.example", "calibrate": r"MyOp",
                       "inspect": None, "check": None},
    "already_qdq.onnx": {"quantize": r"already contains QuantizeLinear", "calibrate": None, "inspect": None,
                         "check": None},
    "string_input.onnx": {"quantize": r"image.*string|string.*image", "calibrate": r"image.*string|string.*image",
                          "inspect": None, "check": None},
}

DATA_CASES = {  # calibration spec -> what the error must say
    "{d}/wrong_name.npz": r"missing key.*image.*unknown key.*pixels",
    "{d}/extra_name.npz": r"unknown key.*mask",
    "{d}/int_dtype.npz": r"image.*dtype int32.*float32",
    "{d}/str_dtype.npz": r"image.*(dtype <U1|not a numeric).*",
    "{d}/complex_dtype.npz": r"image.*dtype complex64",
    "{d}/bool_dtype.npz": r"image.*dtype bool",
    "{d}/wrong_rank.npz": r"image.*rank 3.*rank 4",
    "{d}/wrong_dims.npz": r"image.*shape \[1, 1, 9, 9\].*axis 2",
    "{d}/scalar.npz": r"scalar|zero samples|no samples|axis 0",
    "{d}/nan.npz": r"sample 3.*image.*NaN",
    "{d}/inf.npz": r"sample 5.*image.*Inf",
    "{d}/zero_samples.npz": r"zero samples",
    "{d}/no_arrays.npz": r"no arrays",
    "{d}/object.npz": r"object\.npz",
    "{d}/corrupt.npz": r"corrupt\.npz",
    "{d}/truncated.npz": r"truncated\.npz",
    "{d}/bad_member.npz": r"bad_member\.npz",
    "{d}/calib.txt": r"calib\.txt.*not a \.npz",
    "{d}/empty_dir": r"empty_dir.*no \.npz files and no images",
    "{d}/junk_dir": r"junk_dir.*no \.npz files and no images",
    "{d}/npz_dir": r"001\.npz",
    "{d}/png_dir": r"0002\.png",
    "{d}/bad_pre": r"unknown key 'mena'",
    "{d}/pre_huge": r"size \[100000, 100000\] does not match the model's input 'image'",
    "{d}/pre_std0": r"preprocess\.yaml: std must not be 0",
    "{d}/pre_null_key": r"unknown key None",
    "{d}/no_such.npz": r"not found.*no_such\.npz",
    "no_such_module_xyz:load": r"cannot import 'no_such_module_xyz'",
    "{d}/broken_module.py:f": r"cannot import.*broken_module\.py.*SyntaxError",
    "{d}/calib_funcs.py:nope": r"no callable 'nope'",
    "{d}/calib_funcs.py:NOT_CALLABLE": r"no callable 'NOT_CALLABLE'",
    "{d}/calib_funcs.py:raises": r"the camera is unplugged",
    "{d}/calib_funcs.py:not_iterable": r"not iterable|cannot read data",
    "{d}/calib_funcs.py:lists": r"sample 0.*expected a dict",
    "{d}/calib_funcs.py:bad_shape": r"image.*shape \[1, 3, 8, 8\]",
    "{d}/calib_funcs.py:empty": r"no samples",
    "{d}/calib_funcs.py:fails_later": r"sample 1.*disk went away",
    "{d}/missing_file.py:load": r"missing_file\.py.*not found",
    "::": r"neither a file nor 'module:function'|not found|cannot import",
}

PROFILE_CASES = {  # -t value -> what the error must say
    "{d}/p_type_dtype.yaml": r"p_type_dtype\.yaml.*activations\.dtype must be one of",
    "{d}/p_type_int.yaml": r"p_type_int\.yaml.*min_opset must be an integer",
    "{d}/p_type_map.yaml": r"p_type_map\.yaml.*thresholds must be a mapping",
    "{d}/p_type_bool.yaml": r"static_shapes must be true or false",
    "{d}/p_type_list.yaml": r"placement\.ops must be a list",
    "{d}/p_literal.yaml": r"placement\.mode must be one of.*everything",
    "{d}/p_unknown.yaml": r"p_unknown\.yaml.*unknown key 'activatons'.*valid keys: .*activations",
    "{d}/p_unknown_nested.yaml": r"p_unknown_nested\.yaml.*unknown key 'dtyp' in weights.*valid keys: .*dtype",
    "{d}/p_cycle_a.yaml": r"circular 'extends'.*p_cycle_a\.yaml.*p_cycle_b\.yaml",
    "{d}/p_self.yaml": r"circular 'extends'.*p_self\.yaml",
    "{d}/p_missing_parent.yaml": r"unknown target 'no_such_target'",
    "{d}/p_missing_file.yaml": r"not_there\.yaml.*not found|not found.*not_there\.yaml",
    "{d}/p_extends_type.yaml": r"'extends' must be",
    "{d}/p_invalid.yaml": r"p_invalid\.yaml.*invalid YAML",
    "{d}/p_tabs.yaml": r"p_tabs\.yaml.*invalid YAML",
    "{d}/p_empty.yaml": r"p_empty\.yaml.*mapping",
    "{d}/p_list.yaml": r"p_list\.yaml.*mapping",
    "{d}/p_scalar.yaml": r"p_scalar\.yaml.*mapping",
    "{d}/p_binary.yaml": r"p_binary\.yaml.*(invalid YAML|mapping)",
    "{d}/p_dir.yaml": r"p_dir\.yaml.*directory",
    "{d}/p_nowhere.yaml": r"not found.*p_nowhere\.yaml",
    "{d}/p_unknown_pass.yaml": r"unknown pass 'make_it_fast'",
    "{d}/p_pass_option.yaml": r"unknown option.*bogus.*fold_constants",
    "{d}/p_percentile.yaml": r"percentile.*150",
    "{d}/p_block.yaml": r"block_size.*-4",
    "{d}/p_override.yaml": r"precision must be one of.*int3",
    "{d}/p_fixed_scale.yaml": r"scale.*-1",
    "no_such_target": r"unknown target 'no_such_target'.*tensorrt",
    "": r"unknown target ''|target",
}


def _cases() -> list[Case]:
    """Each input once per code path by default; the full command x input matrix (``full``) under ``-m slow``."""
    cases = []
    for name, msg in MODEL_CASES.items():
        m = "{d}/" + name
        cases += [Case(f"quantize-{name}", q(m), msg), Case(f"inspect-{name}", ("inspect", m), msg),
                  Case(f"validate-cand-{name}", ("validate", "{d}/model.onnx", m, "--data", "{d}/eval.npz"), msg),
                  Case(f"calibrate-{name}", ("calibrate", m, "--calib", "{d}/calib.npz", "-o", "{o}/s.npz"), msg,
                       full=True),
                  Case(f"check-{name}", ("check", m, "-t", "tensorrt"), msg, full=True),
                  Case(f"validate-ref-{name}", ("validate", m, "{d}/model.onnx", "--data", "{d}/eval.npz"), msg,
                       full=True)]
        if HAS_COMPILE:
            cases.append(Case(f"compile-{name}", ("compile", m, "-t", "tensorrt", "-o", "{o}/out.engine"), msg,
                              full=name not in ("truncated.onnx", "cycle.onnx", "opset7.onnx")))
    for name, expected in UNSUPPORTED_CASES.items():
        m = "{d}/" + name
        argv = {"quantize": q(m), "calibrate": ("calibrate", m, "--calib", "{d}/calib.npz", "-o", "{o}/s.npz"),
                "inspect": ("inspect", m), "check": ("check", m, "-t", "qnn")}
        cases += [Case(f"{cmd}-{name}", argv[cmd], msg) for cmd, msg in expected.items()]
    for spec, msg in DATA_CASES.items():
        label = spec.replace("{d}/", "")
        cases += [Case(f"quantize-calib-{label}", q(calib=spec), msg),
                  Case(f"validate-data-{label}", ("validate", "{d}/model.onnx", "{d}/model.onnx", "--data", spec),
                       msg),
                  Case(f"calibrate-{label}", ("calibrate", "{d}/model.onnx", "--calib", spec, "-o", "{o}/s.npz"),
                       msg, full=True)]
    cases += [Case("quantize-calib-huge-values", q(calib="{d}/huge.npz"), None),
              Case("quantize-eval-nan", q(extra=("--eval", "{d}/nan.npz")), DATA_CASES["{d}/nan.npz"]),
              Case("quantize-eval-fails-midway", q(extra=("--eval", "{d}/calib_funcs.py:fails_later")),
                   r"evaluation data.*sample 1.*disk went away")]
    for spec, msg in PROFILE_CASES.items():
        label = spec.replace("{d}/", "") or "empty-name"
        cases += [Case(f"quantize-profile-{label}", q(target=spec), msg),
                  Case(f"targets-show-{label}", ("targets", "show", spec), msg),
                  Case(f"check-profile-{label}", ("check", "{d}/model.onnx", "-t", spec), msg, full=True)]
    cases.append(Case("validate-profile-p_unknown", ("validate", "{d}/model.onnx", "{d}/model.onnx", "--data",
                                                     "{d}/eval.npz", "-t", "{d}/p_unknown.yaml"),
                      PROFILE_CASES["{d}/p_unknown.yaml"]))
    same = r"same file as the input|overwrite the input"
    cases += [
        Case("quantize-output-is-input", q(out="{d}/model.onnx"), same),
        Case("quantize-output-is-input-hardlink", q(out="{d}/model-link.onnx"), same),
        Case("quantize-output-is-input-respelled", q(out="{d}/sub/../model.onnx"), same),
        Case("quantize-output-is-input-relative", q(model="{d}/model.onnx", out="{d}/./model.onnx"), same),
        Case("calibrate-output-is-input", ("calibrate", "{d}/model.onnx", "--calib", "{d}/calib.npz", "-o",
                                           "{d}/model.onnx"), same),
        Case("quantize-report-is-input", q(extra=("--report", "{d}/model.onnx")), same),
        Case("validate-report-is-input", ("validate", "{d}/model.onnx", "{d}/model.onnx", "--data", "{d}/eval.npz",
                                          "--report", "{d}/model.onnx"), same),
        Case("quantize-output-missing-dir", q(out="{o}/no/such/dir/out.onnx"), r"directory does not exist.*no/such"),
        Case("calibrate-output-missing-dir", ("calibrate", "{d}/model.onnx", "--calib", "{d}/calib.npz", "-o",
                                              "{o}/nodir/stats.npz"), r"directory does not exist.*nodir"),
        Case("quantize-report-missing-dir", q(extra=("--report", "{o}/nodir/report.json")),
             r"directory does not exist.*nodir"),
        Case("quantize-stats-missing-dir", q(extra=("--stats", "{o}/nodir/stats.npz")),
             r"directory does not exist.*nodir"),
        Case("quantize-stats-not-stats", q(extra=("--stats", "{d}/calib.npz")), r"calib\.npz.*statistics"),
        Case("quantize-output-is-dir", q(out="{o}"), r"is a directory"),
        Case("quantize-output-parent-is-file", q(out="{d}/model.onnx/out.onnx"), r"not a directory"),
        Case("validate-report-missing-dir", ("validate", "{d}/model.onnx", "{d}/model.onnx", "--data",
                                             "{d}/eval.npz", "--report", "{o}/nodir/r.json"),
             r"directory does not exist.*nodir"),
        Case("quantize-unknown-target", q(target="tensorrtt"), r"unknown target 'tensorrtt'.*tensorrt"),
        Case("quantize-min-cosine-nan", q(extra=("--min-cosine", "nan")), r"min_cosine must be in \[-1, 1\], got nan"),
        Case("validate-min-sqnr-nan", ("validate", "{d}/model.onnx", "{d}/model.onnx", "--data", "{d}/eval.npz",
                                       "--min-sqnr", "nan"), r"min_sqnr_db must be a number"),
        Case("quantize-dump-dir-is-a-file", q(extra=("--dump-dir", "{d}/calib.txt")), r"graph dump.*calib\.txt"),
        Case("quantize-eval-wrong-name", q(extra=("--eval", "{d}/wrong_name.npz")), r"evaluation data.*pixels"),
        Case("quantize-preprocess-missing", q(calib="{d}/png_dir", extra=("--preprocess", "{d}/nope.yaml")),
             r"nope\.yaml"),
    ]
    if HAS_COMPILE:
        cases += [Case("compile-unknown-target", ("compile", "{d}/model.onnx", "-t", "nosuch", "-o", "{o}/x"),
                       r"unknown target 'nosuch'"),
                  Case("compile-output-is-input", ("compile", "{d}/model.onnx", "-t", "tensorrt", "-o",
                                                   "{d}/model.onnx"), same),
                  Case("compile-output-missing-dir", ("compile", "{d}/model.onnx", "-t", "tensorrt", "-o",
                                                      "{o}/nodir/x.engine"), r"directory does not exist")]
    return cases


CASES = [pytest.param(c, id=c.id, marks=[pytest.mark.slow] if c.full else []) for c in _cases()]


# ------------------------------------------------------------------------------------------------ checks
def snapshot(folder: Path) -> dict[str, str]:
    """Every file (and folder) under ``folder`` with its content hash."""
    out = {}
    for p in sorted(folder.rglob("*")):
        if "__pycache__" in p.parts:
            continue
        if p.is_symlink() and not p.exists():
            out[str(p)] = "dangling link"
        else:
            out[str(p)] = "dir" if p.is_dir() else hashlib.sha256(p.read_bytes()).hexdigest()
    return out


def _fill(argv: tuple[str, ...], d: Path, o: Path) -> list[str]:
    return [a.replace("{d}", str(d)).replace("{o}", str(o)) for a in argv]


def assert_clean_failure(res, expect: str) -> None:
    assert res.returncode == 2, res
    assert "Traceback" not in res.output, res
    errors = [line for line in res.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, res
    assert res.stderr.rstrip().splitlines()[-1] == errors[0], res
    assert re.search(expect, errors[0], re.IGNORECASE | re.DOTALL), f"{errors[0]!r} does not match {expect!r}"


def assert_untouched(corpus: Path, before: dict, out: Path, *, output_allowed: bool) -> None:
    assert snapshot(corpus) == before, "an input file changed, or a file appeared next to the inputs"
    left = [p.name for p in out.rglob("*")]
    if output_allowed:
        assert not [n for n in left if n.startswith(".")], f"temporary files left behind: {left}"
    else:
        assert not left, f"a failed run left files in the output folder: {left}"


@pytest.mark.parametrize("case", CASES)
def test_cli(case: Case, corpus: Path, tmp_path: Path, edgeq_cli):
    out = tmp_path / "out"
    out.mkdir()
    before = snapshot(corpus)
    res = edgeq_cli(*_fill(case.argv, corpus, out), timeout=120)
    assert res.returncode != "timeout", f"{case.id} hung"
    if case.expect is None:
        assert res.returncode in (0, 1) and "Traceback" not in res.output and "error:" not in res.stderr, res
    else:
        assert_clean_failure(res, case.expect)
    assert_untouched(corpus, before, out, output_allowed=case.expect is None)


def call_api(argv: list[str]):
    """Run the API function behind a CLI command line (the corpus uses only options with values)."""
    cmd, rest = argv[0], argv[1:]
    if cmd == "targets":
        return load_profile(rest[1])
    pos, opt = [], {}
    it = iter(rest)
    for a in it:
        if a.startswith("-"):
            opt[a.lstrip("-")] = next(it)
        else:
            pos.append(a)
    if cmd == "quantize":
        number = lambda key: float(opt[key]) if key in opt else None  # noqa: E731
        return api.quantize(pos[0], target=opt["t"], calib=opt["calib"], output=opt["o"], eval_data=opt.get("eval"),
                            report=opt.get("report"), stats=opt.get("stats"), preprocess=opt.get("preprocess"),
                            min_cosine=number("min-cosine"), dump_dir=opt.get("dump-dir"), latency_runs=0)
    if cmd == "calibrate":
        return api.calibrate(pos[0], opt["calib"], stats_out=opt["o"])
    if cmd == "check":
        return api.check(pos[0], target=opt["t"])
    if cmd == "inspect":
        return api.inspect_model(pos[0])
    if cmd == "validate":
        return api.validate(pos[0], pos[1], data=opt["data"], target=opt.get("t"), report=opt.get("report"),
                            min_sqnr=float(opt["min-sqnr"]) if "min-sqnr" in opt else None, latency_runs=0)
    if cmd == "compile":
        return api.compile_model(pos[0], target=opt["t"], output=opt["o"])
    raise AssertionError(cmd)


@pytest.mark.parametrize("case", CASES)
def test_api(case: Case, corpus: Path, tmp_path: Path):
    out = tmp_path / "out"
    out.mkdir()
    before = snapshot(corpus)
    if case.expect is None:
        call_api(_fill(case.argv, corpus, out))
    else:
        with pytest.raises(EdgeqError) as info:
            call_api(_fill(case.argv, corpus, out))
        assert "\n" not in str(info.value).strip()
        assert re.search(case.expect, str(info.value), re.IGNORECASE | re.DOTALL), str(info.value)
    assert_untouched(corpus, before, out, output_allowed=case.expect is None)
