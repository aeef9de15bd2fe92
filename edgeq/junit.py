"""``--junit FILE``: the report as JUnit XML, so CI systems show each check as a test.

One ``<testsuite>`` per command (``edgeq.quantize`` / ``edgeq.validate``) holding a ``<testcase>`` per output per
metric (cosine, sqnr, max_abs, top1 where the output has it, and finite), plus one for legality when the report has
a ``lint`` entry. A metric outside its threshold is a ``<failure>`` whose message says value and bound; a metric
with no threshold in the profile is ``<skipped>``, so nothing reads as checked that was not. The failures are
exactly those in ``validation.failures``. Suite ``<properties>`` carry the hashes and versions of the run.
"""

from __future__ import annotations

import os
import re
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Any

from edgeq.html_report import metric_status
from edgeq.model_io import atomic_path
from edgeq.report import _clean

# (testcase name, metric key, threshold key, higher is better, label in messages)
METRICS = (
    ("cosine", "cosine_mean", "min_cosine", True, "cosine"),
    ("sqnr", "sqnr_db", "min_sqnr_db", True, "SQNR dB"),
    ("max_abs", "max_abs_error", "max_abs_error", False, "max abs error"),
    ("top1", "top1_agreement", "min_top1_agreement", True, "top-1 agreement"),
)


def write_junit(report: dict, path: str | os.PathLike) -> Path:
    out = Path(path)
    tree = ET.ElementTree(build_junit(report))
    ET.indent(tree)
    with atomic_path(out) as tmp:
        tree.write(tmp, encoding="UTF-8", xml_declaration=True)
    return out


def build_junit(report: dict) -> ET.Element:
    rep = _clean(report)
    command = str(rep.get("command", "report"))
    suite_name = f"edgeq.{command}"
    cases = _validation_cases(rep, suite_name)
    if "lint" in rep:
        cases.append(_legality_case(rep["lint"], suite_name))
    suites = ET.Element("testsuites", name="edgeq")
    suite = ET.SubElement(suites, "testsuite", name=suite_name)
    props = ET.SubElement(suite, "properties")
    for name, value in _properties(rep):
        ET.SubElement(props, "property", name=name, value=_text(value))
    suite.extend(cases)
    totals = {"tests": len(cases), "failures": sum(c.find("failure") is not None for c in cases), "errors": 0,
              "skipped": sum(c.find("skipped") is not None for c in cases)}
    seconds = (rep.get("timings") or {}).get("total_s")
    for element in (suites, suite):
        for k, v in totals.items():
            element.set(k, str(v))
        element.set("time", f"{seconds:.3f}" if isinstance(seconds, (int, float)) else "0")
    return suites


def _case(classname: str, name: str) -> ET.Element:
    return ET.Element("testcase", classname=classname, name=name, time="0")


def _fail(case: ET.Element, message: str, kind: str, details: str = "") -> None:
    f = ET.SubElement(case, "failure", message=_text(message), type=kind)
    f.text = _text(details or message)


def _skip(case: ET.Element, message: str) -> None:
    ET.SubElement(case, "skipped", message=_text(message))


def _validation_cases(rep: dict, suite: str) -> list[ET.Element]:
    val = rep.get("validation")
    if not val:
        case = _case(suite, "validation")
        _skip(case, "no evaluation data given (--eval); fidelity was not measured")
        return [case]
    thr, cases = val["thresholds"], []
    for o in val["outputs"]:
        classname = f"{suite}.{o['name']}"
        for name, key, tkey, higher, label in METRICS:
            if key not in o:
                continue  # top-1 exists only for classifier-like outputs
            case = _case(classname, name)
            ok = metric_status(o[key], thr.get(tkey), higher)
            if ok is None:
                _skip(case, f"{label} = {_fmt(o[key])}; no threshold ({tkey}) in the profile")
            elif not ok:
                _fail(case, f"{o['name']}: {label} {_fmt(o[key])} {'<' if higher else '>'} {_fmt(thr[tkey])}",
                      "threshold", f"{label} of output {o['name']} over {o['samples']} samples on the "
                                   f"{val['backend']} backend: {_fmt(o[key])}; {tkey} = {_fmt(thr[tkey])}")
            else:
                ET.SubElement(case, "system-out").text = f"{label} = {_fmt(o[key])} (threshold {_fmt(thr[tkey])})"
            cases.append(case)
        case = _case(classname, "finite")
        if o.get("nonfinite_values"):
            _fail(case, f"{o['name']}: {o['nonfinite_values']} non-finite values in the candidate output", "nonfinite")
        cases.append(case)
    return cases


def _legality_case(lint: dict | None, suite: str) -> ET.Element:
    target = lint["target"] if lint else "target"
    case = _case(suite, f"legality[{target}]")
    if lint is None:
        _skip(case, "legality check not run")
    elif lint["errors"]:
        findings = [f for f in lint["findings"] if f["severity"] == "error"]
        _fail(case, f"{lint['errors']} legality error(s) for {target}: "
                    + ", ".join(f"{r} x{n}" for r, n in sorted(lint["by_rule"].items())), "legality",
              "\n".join(f"{f['rule']} {f['node']}: {f['message']}" for f in findings))
    elif lint["warnings"]:
        ET.SubElement(case, "system-out").text = _text("\n".join(
            f"warning {f['rule']} {f['node']}: {f['message']}" for f in lint["findings"]))
    return case


def _properties(rep: dict) -> list[tuple[str, Any]]:
    props: list[tuple[str, Any]] = []
    for key in ("model", "output", "reference", "candidate"):
        if isinstance(rep.get(key), dict):
            props += [(f"{key}.path", rep[key].get("path")), (f"{key}.sha256", rep[key].get("sha256"))]
    if rep.get("profile"):
        props.append(("profile", rep["profile"].get("name")))
    for key in ("profile_sha256", "eval_data_sha256", "data_sha256", "seed"):
        if key in rep:
            props.append((key, rep[key]))
    if rep.get("calibration"):
        props.append(("calibration.data_sha256", rep["calibration"].get("data_sha256")))
    if rep.get("validation"):
        props.append(("backend", rep["validation"]["backend"]))
    props += [(f"version.{k}", v) for k, v in (rep.get("versions") or {}).items()]
    return [(k, "" if v is None else v) for k, v in props]


def _fmt(v: Any) -> str:
    return f"{v:.6g}" if isinstance(v, float) else str(v)


_XML_ILLEGAL = re.compile("[\x00-\x08\x0b\x0c\x0e-\x1f\ufffe\uffff]")


def _text(v: Any) -> str:
    """XML 1.0 cannot carry most control characters, whatever the escaping; drop them."""
    return _XML_ILLEGAL.sub("", str(v))
