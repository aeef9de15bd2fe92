"""``edgeq demo``: the whole job on the bundled digits CNN (real data from scikit-learn's digits)."""

from __future__ import annotations

import tempfile
from importlib import resources
from pathlib import Path

import numpy as np

from edgeq.calibration.calibrate import make_session
from edgeq.model_io import load_model
from edgeq.report import write_report


def bundled_example() -> dict[str, Path]:
    root = resources.files("edgeq.calibration_data")
    files = {"model": "digits_cnn.onnx", "calib": "digits_calib.npz", "eval": "digits_eval.npz",
             "labels": "digits_eval_labels.npy"}
    return {k: Path(str(root / v)) for k, v in files.items()}


def accuracy(model_path: Path, eval_path: Path, labels_path: Path) -> float:
    session = make_session(load_model(model_path, check=False), optimize="all")
    x = np.load(eval_path)["image"]
    labels = np.load(labels_path)
    logits = session.run(None, {session.get_inputs()[0].name: x})[0]
    return float((logits.argmax(axis=1) == labels).mean())


def run_demo(*, output_dir: str | Path | None = None, target: str = "tensorrt", progress: bool = False) -> dict:
    from edgeq.api import quantize

    ex = bundled_example()
    with tempfile.TemporaryDirectory(prefix="edgeq-demo-") as tmp:
        out_dir = Path(output_dir) if output_dir else Path(tmp)
        out_dir.mkdir(parents=True, exist_ok=True)
        out = out_dir / f"digits_cnn.{target}.int8.onnx"
        report_path = out_dir / f"digits_cnn.{target}.report.json"
        result = quantize(ex["model"], target=target, calib=ex["calib"], eval_data=ex["eval"], output=out,
                          progress=progress)
        rep = result.report
        rep["demo"] = {
            "fp32_accuracy": accuracy(ex["model"], ex["eval"], ex["labels"]),
            "int8_accuracy": accuracy(out, ex["eval"], ex["labels"]),
            "fp32_size_bytes": ex["model"].stat().st_size,
            "int8_size_bytes": out.stat().st_size,
            "output_dir": str(out_dir) if output_dir else None,
        }
        if output_dir:
            write_report(rep, report_path)
        return rep
