"""edgeq: quantize ONNX models for TensorRT, Qualcomm QNN and Core ML, and validate them against FP32.

Python API (each CLI command is a thin layer over one of these)::

    import edgeq
    result = edgeq.quantize("model.onnx", target="qnn", calib="calib.npz", output="model.int8.onnx",
                            eval_data="eval.npz")
    report = edgeq.validate("model.onnx", "model.int8.onnx", data="eval.npz", target="qnn")
"""

from __future__ import annotations

import importlib
import importlib.util
import sys
from pathlib import Path

__version__ = "0.1.0"


def _map_source_tree() -> None:
    """Make ``edgeq.passes``/``edgeq.targets``/``edgeq.calibration_data`` importable from a source checkout.

    An installed edgeq has these as real subpackages (setup.cfg maps the top-level folders into the package);
    in a checkout they are siblings of ``edgeq/``.
    """
    here = Path(__file__).resolve().parent
    for sub in ("passes", "targets", "calibration_data"):
        name = f"{__name__}.{sub}"
        source = here.parent / sub / "__init__.py"
        if name in sys.modules or (here / sub).exists() or not source.exists():
            continue
        spec = importlib.util.spec_from_file_location(name, source, submodule_search_locations=[str(source.parent)])
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        spec.loader.exec_module(module)


_map_source_tree()

_API = {
    "quantize": "edgeq.api",
    "validate": "edgeq.api",
    "inspect_model": "edgeq.api",
    "check": "edgeq.api",
    "compile_model": "edgeq.api",
    "calibrate": "edgeq.api",
    "demo": "edgeq.api",
    "load_profile": "edgeq.profiles",
    "list_targets": "edgeq.profiles",
    "TargetProfile": "edgeq.profiles",
    "CalibrationStats": "edgeq.calibration.stats",
    "EdgeqError": "edgeq.errors",
}


def __getattr__(name: str):
    if name in _API:
        return getattr(importlib.import_module(_API[name]), name)
    raise AttributeError(f"module 'edgeq' has no attribute {name!r}")


__all__ = sorted(_API) + ["__version__"]
