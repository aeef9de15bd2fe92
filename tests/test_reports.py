"""The report contract: JSON that matches its documented schema, a self-contained HTML page, and JUnit XML that a
CI system accepts and whose failures are exactly the threshold violations."""

from __future__ import annotations

import configparser
import copy
import hashlib
import importlib.resources
import importlib.util
import json
import re
import shutil
import subprocess
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

import numpy as np
import pytest

from conftest import ROOT

XSD = ROOT / "tests" / "junit.xsd"


def edgeq(*args) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "edgeq", *map(str, args)], capture_output=True, text=True, cwd=ROOT,
                          timeout=300)


def _sha(path: Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


@pytest.fixture(scope="module")
def schema() -> dict:
    return json.loads((importlib.resources.files("edgeq") / "report_schema.json").read_text())


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict:
    """Real reports: the CLI's quantize (qnn) and a failing validate, each with --report --html --junit."""
    d = ROOT / "calibration_data"
    tmp = tmp_path_factory.mktemp("reports")
    out = {}
    q = edgeq("quantize", d / "digits_cnn.onnx", "-t", "qnn", "--calib", d / "digits_calib.npz", "--eval",
              d / "digits_eval.npz", "-o", tmp / "q.onnx", "--report", tmp / "q.json", "--html", tmp / "q.html",
              "--junit", tmp / "q.xml")
    assert q.returncode == 0, q.stderr
    v = edgeq("validate", d / "digits_cnn.onnx", tmp / "q.onnx", "--data", d / "digits_eval.npz", "-t", "qnn",
              "--min-sqnr", "200", "--report", tmp / "v.json", "--html", tmp / "v.html", "--junit", tmp / "v.xml")
    assert v.returncode == 1, v.stdout + v.stderr
    for name in ("q", "v"):
        out[name] = {"json": json.loads((tmp / f"{name}.json").read_text()), "html": tmp / f"{name}.html",
                     "xml": tmp / f"{name}.xml"}
    out["dir"] = tmp
    return out


@pytest.fixture(scope="module")
def no_eval_report(tmp_path_factory) -> dict:
    from edgeq import api

    d = ROOT / "calibration_data"
    out = tmp_path_factory.mktemp("noeval") / "q.onnx"
    return api.quantize(d / "digits_cnn.onnx", target="tensorrt", calib=d / "digits_calib.npz", output=out).report


def _validator(schema):
    jsonschema = pytest.importorskip("jsonschema", reason="jsonschema is not installed; pip install jsonschema")
    jsonschema.Draft202012Validator.check_schema(schema)
    return jsonschema.Draft202012Validator(schema)


def _errors(validator, report: dict) -> list[str]:
    from edgeq.report import _clean

    return [f"{'/'.join(map(str, e.absolute_path))}: {e.message}" for e in validator.iter_errors(_clean(report))]


# -- JSON schema ----------------------------------------------------------------------------------------------


def test_schema_ships_as_package_data():
    cfg = configparser.ConfigParser()
    cfg.read(ROOT / "setup.cfg")
    assert "report_schema.json" in cfg["options.package_data"]["edgeq"]


def test_real_reports_match_the_schema(schema, runs, no_eval_report):
    v = _validator(schema)
    for report in (runs["q"]["json"], runs["v"]["json"], no_eval_report):
        assert _errors(v, report) == [], report["command"]


@pytest.mark.parametrize("breakage", ["no onnx version", "short sha", "null verdict with validation",
                                      "unknown backend", "no seed", "inf as a number string"])
def test_schema_rejects_broken_reports(schema, runs, breakage):
    v = _validator(schema)
    rep = copy.deepcopy(runs["q"]["json"])
    if breakage == "no onnx version":
        del rep["versions"]["onnx"]
    elif breakage == "short sha":
        rep["model"]["sha256"] = "abc123"
    elif breakage == "null verdict with validation":
        rep["passed"] = None
    elif breakage == "unknown backend":
        rep["validation"]["backend"] = "gpu"
    elif breakage == "no seed":
        del rep["seed"]
    else:
        rep["validation"]["outputs"][0]["sqnr_db"] = "Infinity"
    assert _errors(v, rep), breakage


def test_the_doc_names_every_schema_key(schema):
    doc = (ROOT / "docs" / "report-schema.md").read_text()
    keys = set(schema["properties"])
    for branch in schema["allOf"]:
        keys |= set(branch["then"].get("properties", {}))
    for name in ("calibration", "validation", "output_metrics", "thresholds", "latency", "layer"):
        keys |= set(schema["$defs"][name]["properties"])
    missing = sorted(k for k in keys if f"`{k}`" not in doc)
    assert not missing, f"docs/report-schema.md does not describe {missing}"


def test_reports_carry_the_hashes_and_versions_to_reproduce_a_run(runs):
    d = ROOT / "calibration_data"
    q, v = runs["q"]["json"], runs["v"]["json"]
    assert q["model"]["sha256"] == _sha(d / "digits_cnn.onnx")
    assert q["output"]["sha256"] == _sha(runs["dir"] / "q.onnx")
    assert q["calibration"]["data_sha256"] == _sha(d / "digits_calib.npz")
    assert q["calibration"]["source"] == "file"
    assert q["eval_data_sha256"] == v["data_sha256"] == _sha(d / "digits_eval.npz")
    # validate ran with --min-sqnr 200: another threshold is another profile, and the hash says so
    assert q["profile_sha256"] != v["profile_sha256"]
    assert all(re.fullmatch(r"[0-9a-f]{64}", r["profile_sha256"]) for r in (q, v))
    assert isinstance(q["seed"], int)
    for rep in (q, v):
        assert {"edgeq", "onnx", "onnxruntime"} <= set(rep["versions"])
    assert v["candidate"]["sha256"] == q["output"]["sha256"]


def test_data_without_a_file_is_hashed_by_content(tmp_path, schema):
    """A list of samples, a callable and a folder each get a SHA-256 that changes exactly when the data does."""
    from edgeq import api

    d = ROOT / "calibration_data"
    images = np.load(d / "digits_calib.npz")["image"][:8]
    samples = [{"image": images[i:i + 1]} for i in range(len(images))]
    changed = copy.deepcopy(samples)
    changed[3]["image"] = changed[3]["image"] + np.float32(0.01)
    folder = tmp_path / "calib"
    folder.mkdir()
    for i, s in enumerate(samples):
        np.savez(folder / f"{i:02d}.npz", **s)

    def calib(data, name):
        return api.quantize(d / "digits_cnn.onnx", target="tensorrt", calib=data, output=tmp_path / f"{name}.onnx",
                            check=False).report["calibration"]

    as_list, as_callable = calib(samples, "list"), calib(lambda: iter(samples), "callable")
    as_changed, as_folder = calib(changed, "changed"), calib(folder, "folder")
    assert (as_list["source"], as_callable["source"], as_folder["source"]) == ("samples", "callable", "folder")
    assert as_list["data_sha256"] == as_callable["data_sha256"]
    assert re.fullmatch(r"[0-9a-f]{64}", as_list["data_sha256"])
    assert as_changed["data_sha256"] != as_list["data_sha256"]
    assert re.fullmatch(r"[0-9a-f]{64}", as_folder["data_sha256"])

    rep = api.validate(d / "digits_cnn.onnx", tmp_path / "list.onnx", data=samples, latency_runs=0).report
    assert rep["data_sha256"] == as_list["data_sha256"]


def _fake_backend(monkeypatch) -> None:
    """Stand in for the QNN/Core ML/TensorRT runners (same callable contract) with ORT."""
    from edgeq import validation

    real = validation._ort_runner
    monkeypatch.setattr(validation, "candidate_runner",
                        lambda path, backend, *, threads=0, soc=None: real(path, threads))


@pytest.mark.parametrize("backend", ["qnn", "coreml", "tensorrt"])
def test_validate_records_the_backend_with_the_same_structure(schema, runs, monkeypatch, backend):
    from edgeq import api

    d = ROOT / "calibration_data"
    ort_rep = runs["v"]["json"]
    _fake_backend(monkeypatch)
    rep = api.validate(d / "digits_cnn.onnx", runs["dir"] / "q.onnx", data=d / "digits_eval.npz", target="qnn",
                       backend=backend, min_sqnr=200, latency_runs=2).report
    assert rep["validation"]["backend"] == backend
    assert _shape(json.loads(json.dumps(rep, default=str))) == _shape(ort_rep)
    if importlib.util.find_spec("jsonschema"):
        assert _errors(_validator(schema), rep) == []


def _shape(obj, path=""):
    if isinstance(obj, dict):
        return {f"{path}/{k}" for k in obj} | set().union(*(_shape(v, f"{path}/{k}") for k, v in obj.items()))
    if isinstance(obj, list) and obj and isinstance(obj[0], dict):
        return _shape(obj[0], path + "[]")
    return set()


# -- HTML -----------------------------------------------------------------------------------------------------


def test_html_is_one_self_contained_page(runs):
    page = runs["q"]["html"].read_text()
    rep = runs["q"]["json"]
    for forbidden in ("<script", "<link", "<iframe", "<img", " src=", "url(", "@import", "http://", "https://"):
        assert forbidden not in page, forbidden
    assert page.count("<svg") >= 1
    for needed in ("PASSED", "logits", rep["model"]["sha256"], rep["calibration"]["data_sha256"],
                   rep["profile_sha256"], rep["versions"]["onnxruntime"], "Skipped tensors", "Latency and size",
                   "≥ 0.98"):
        assert needed in page, needed
    failed = runs["v"]["html"].read_text()
    assert "FAILED" in failed and "≥ 200" in failed
    assert all(f.split(":")[0] in failed for f in runs["v"]["json"]["validation"]["failures"])


def test_html_plots_layers_and_lists_fallback_and_escapes_names(runs, tmp_path):
    from edgeq.html_report import render_html

    rep = copy.deepcopy(runs["v"]["json"])
    rep["validation"]["outputs"][0]["name"] = "<b>logits</b>"
    rep["layers"] = [{"tensor": f"/blk.{i}/out", "op": "MatMul", "sqnr_db": 40.0 - 3 * i,
                      "added_noise": 0.01 * (i == 4)} for i in range(8)] + [{"tensor": "exact", "sqnr_db": "inf"}]
    rep["fallback"] = [{"node": "/blk.4/Softmax", "decision": "float", "reason": "adds 6 dB of noise"}]
    page = render_html(rep)
    assert "<b>logits</b>" not in page and "&lt;b&gt;logits&lt;/b&gt;" in page
    chart = page[page.index("<svg"):page.index("</svg>")]
    assert chart.count("<rect") == 9 and "/blk.7/out" in chart and "#cf222e" in chart
    assert "Fallback decisions (1)" in page and "adds 6 dB of noise" in page
    rep["fallback"] = {"met": True, "stopped": "budget met", "float_nodes": ["/blk.4/Softmax"],
                       "budget": {"min_cosine": 0.98, "min_sqnr_db": 20.0},
                       "baseline": {"cosine": 0.95, "sqnr_db": 14.0}, "best": {"cosine": 0.99, "sqnr_db": 22.5},
                       "curve": [{"float_layers": 0, "added": None, "sqnr_db": 14.0, "met": False},
                                 {"float_layers": 1, "added": "/blk.4/Softmax", "sqnr_db": 22.5, "met": True}],
                       "ranking": [{"node": "/blk.4/Softmax", "op": "Softmax", "prior": 0.2, "gain": 8.5}]}
    page = render_html(rep)
    section = page[page.index("Fallback decisions"):page.index("<h2>", page.index("Fallback decisions"))]
    assert "budget met" in section and "<code>/blk.4/Softmax</code>" in section and "22.5" in section
    assert "sensitivity ranking (1 layers)" in section


def test_html_without_evaluation_says_so_and_histograms_skip_reasons(no_eval_report):
    from edgeq.html_report import render_html

    rep = copy.deepcopy(no_eval_report)
    rep["skipped"] = [{"pass": "insert_qdq", "target": f"t{i}", "reason": f"calibrated range [-{i}e5, 3] exceeds "
                                                                          f"+-1e4; kept in float"} for i in range(3)]
    page = render_html(rep)
    assert "NOT VALIDATED" in page and "Per-output metrics" not in page
    assert "skip reasons" in page and page.count("<svg") == 1


@pytest.mark.skipif(not (shutil.which("chromium") or shutil.which("chromium-browser")),
                    reason="chromium is not installed (apt-get install chromium)")
def test_html_renders_in_a_real_browser(runs, tmp_path):
    browser = shutil.which("chromium") or shutil.which("chromium-browser")
    png = tmp_path / "page.png"
    r = subprocess.run([browser, "--headless", "--no-sandbox", "--disable-gpu", f"--screenshot={png}",
                        "--window-size=1000,1400", runs["v"]["html"].resolve().as_uri()],
                       capture_output=True, text=True, timeout=120)
    assert png.exists() and png.stat().st_size > 20_000, r.stderr[-500:]
    try:
        from PIL import Image
    except ImportError:
        return
    pixels = np.asarray(Image.open(png).convert("RGB"))
    red_badge = (pixels[..., 0] > 190) & (pixels[..., 1] < 60) & (pixels[..., 2] < 70)
    assert red_badge.sum() > 500, "the FAILED badge is not visible"
    assert len(np.unique(pixels.reshape(-1, 3)[::97], axis=0)) > 20, "the page rendered blank"


# -- JUnit ----------------------------------------------------------------------------------------------------


def _xsd_check(paths: list[Path]) -> list[str]:
    """Validation errors per file, with xmllint or lxml; skips the test when neither is present."""
    if shutil.which("xmllint"):
        r = subprocess.run(["xmllint", "--noout", "--schema", str(XSD), *map(str, paths)], capture_output=True,
                           text=True)
        return [] if r.returncode == 0 else [r.stderr]
    try:
        from lxml import etree
    except ImportError:
        pytest.skip("neither xmllint (apt-get install libxml2-utils) nor lxml is installed")
    xsd = etree.XMLSchema(etree.parse(str(XSD)))
    return [str(xsd.error_log) for p in paths if not xsd.validate(etree.parse(str(p)))]


def test_junit_matches_the_xsd(runs, no_eval_report, tmp_path):
    from edgeq.junit import write_junit

    write_junit(no_eval_report, tmp_path / "noeval.xml")
    assert _xsd_check([runs["q"]["xml"], runs["v"]["xml"], tmp_path / "noeval.xml"]) == []


def test_the_xsd_rejects_malformed_junit(tmp_path):
    bad = tmp_path / "bad.xml"
    bad.write_text('<testsuites><testsuite name="s" tests="x" failures="0" errors="0">'
                   '<testcase classname="c"><failure message="m"/><skipped/></testcase></testsuite></testsuites>')
    assert _xsd_check([bad])


def _cases(path: Path) -> list[ET.Element]:
    return list(ET.parse(path).getroot().iter("testcase"))


def test_junit_failures_are_exactly_the_threshold_failures(runs):
    root = ET.parse(runs["v"]["xml"]).getroot()
    suites = root.findall("testsuite")
    assert [s.get("name") for s in suites] == ["edgeq.validate"]
    cases = _cases(runs["v"]["xml"])
    failed = [c for c in cases if c.find("failure") is not None]
    rep = runs["v"]["json"]
    assert len(failed) == len(rep["validation"]["failures"]) >= 1
    sqnr = next(c for c in failed if c.get("name") == "sqnr")
    assert sqnr.get("classname") == "edgeq.validate.logits"
    assert re.search(r"SQNR dB [\d.]+ < 200", sqnr.find("failure").get("message"))
    for el in (root, suites[0]):
        assert int(el.get("tests")) == len(cases)
        assert int(el.get("failures")) == len(failed)
        assert int(el.get("skipped")) == sum(c.find("skipped") is not None for c in cases)
    props = {p.get("name"): p.get("value") for p in suites[0].iter("property")}
    assert props["candidate.sha256"] == rep["candidate"]["sha256"] and props["backend"] == "ort"


def test_junit_has_a_case_per_output_metric_and_one_for_legality(runs):
    rep = runs["q"]["json"]
    cases = {(c.get("classname"), c.get("name")): c for c in _cases(runs["q"]["xml"])}
    for metric in ("cosine", "sqnr", "max_abs", "top1", "finite"):
        assert ("edgeq.quantize.logits", metric) in cases
    assert cases["edgeq.quantize.logits", "max_abs"].find("skipped") is not None  # the qnn profile sets no bound
    legality = cases["edgeq.quantize", f"legality[{rep['lint']['target']}]"]
    failure = legality.find("failure")
    assert (failure is not None) == (rep["lint"]["errors"] > 0)
    if failure is not None:
        assert rep["lint"]["findings"][0]["rule"] in failure.get("message")


def test_junit_without_evaluation_skips_validation(no_eval_report):
    from edgeq.junit import build_junit

    cases = list(build_junit(no_eval_report).iter("testcase"))
    names = [c.get("name") for c in cases]
    assert names[0] == "validation" and cases[0].find("skipped") is not None
    assert names[1].startswith("legality[tensorrt")


def test_latency_is_measured_on_the_session_a_user_gets():
    """Validation and pipelines run ONNX Runtime at its full optimisation level (Q/DQ fused into integer kernels);
    the calibration's basic level would time the unfused float simulation instead."""
    import onnxruntime as ort

    from edgeq.calibration.calibrate import make_session
    from edgeq.example import bundled_example
    from edgeq.validation import candidate_runner

    model = bundled_example()["model"]
    run = candidate_runner(model, "ort")
    assert run.session.get_session_options().graph_optimization_level == ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    observe = make_session(model)
    assert observe.get_session_options().graph_optimization_level == ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
