"""Calibration / evaluation data sources.

Formats (chosen from what ``spec`` is):

* ``data.npz`` — keys are the model's input names, samples stacked on axis 0 (sample ``i`` is ``arr[i:i+1]``).
* ``folder/`` of ``.npz`` files — one feed dict per file, full shapes; samples may differ in shape.
* ``folder/`` of images — with preprocessing from a YAML (``preprocess.yaml`` in the folder, or given explicitly).
* ``module:function`` or ``path/to/file.py:function`` — a callable returning an iterable of feed dicts.

Every sample is checked against the model's inputs (names, dtypes, ranks, static dimensions, finite values) and a
mismatch raises :class:`CalibrationDataError` saying which input and sample is wrong.
"""

from __future__ import annotations

import importlib
import importlib.util
import math
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator

import numpy as np
import onnx

from edgeq.errors import CalibrationDataError

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp")

_ONNX_TO_NP = {
    onnx.TensorProto.FLOAT: np.float32, onnx.TensorProto.FLOAT16: np.float16, onnx.TensorProto.DOUBLE: np.float64,
    onnx.TensorProto.INT64: np.int64, onnx.TensorProto.INT32: np.int32, onnx.TensorProto.INT8: np.int8,
    onnx.TensorProto.UINT8: np.uint8, onnx.TensorProto.BOOL: np.bool_, onnx.TensorProto.INT16: np.int16,
    onnx.TensorProto.UINT16: np.uint16,
}


@dataclass(frozen=True)
class InputSpec:
    name: str
    dtype: Any  # numpy dtype or None
    shape: tuple  # ints for static dims, str/None for symbolic


def model_inputs(model: onnx.ModelProto) -> list[InputSpec]:
    inits = {i.name for i in model.graph.initializer}
    specs = []
    for vi in model.graph.input:
        if vi.name in inits:
            continue
        tt = vi.type.tensor_type
        dims = tuple(d.dim_value if d.HasField("dim_value") else (d.dim_param or None) for d in tt.shape.dim)
        specs.append(InputSpec(vi.name, np.dtype(_ONNX_TO_NP[tt.elem_type]) if tt.elem_type in _ONNX_TO_NP else None,
                               dims if tt.HasField("shape") else ()))
    return specs


class Dataset:
    """An iterable of validated feed dicts; iterating again restarts from the first sample."""

    def __init__(self, source: Callable[[], Iterable[dict]], inputs: list[InputSpec], *, label: str,
                 length: int | None, fingerprint: str = ""):
        self._source = source
        self.inputs = inputs
        self.label = label
        self.length = length
        self.fingerprint = fingerprint

    def __len__(self) -> int:
        if self.length is None:
            raise TypeError("length unknown")
        return self.length

    def __iter__(self) -> Iterator[dict[str, np.ndarray]]:
        count = 0
        try:
            iterator = iter(self._source())
        except CalibrationDataError:
            raise
        except Exception as exc:
            raise CalibrationDataError(f"{self.label}: cannot read data: {type(exc).__name__}: {exc}") from None
        while True:
            try:
                sample = next(iterator)
            except StopIteration:
                break
            except CalibrationDataError:
                raise
            except Exception as exc:
                raise CalibrationDataError(f"{self.label}: reading sample {count} failed: "
                                           f"{type(exc).__name__}: {exc}") from None
            yield check_sample(sample, self.inputs, where=f"{self.label} sample {count}")
            count += 1
        if count == 0:
            raise CalibrationDataError(f"{self.label} contains no samples")

    def take(self, n: int) -> list[dict[str, np.ndarray]]:
        out = []
        for s in self:
            out.append(s)
            if len(out) >= n:
                break
        return out


def check_sample(sample: Any, inputs: list[InputSpec], *, where: str) -> dict[str, np.ndarray]:
    if not isinstance(sample, dict):
        raise CalibrationDataError(f"{where}: expected a dict of input name -> array, got {type(sample).__name__}")
    _check_names(set(sample), inputs, where, noun="input")
    feed = {}
    for spec in inputs:
        arr = np.asarray(sample[spec.name])
        if arr.dtype == object:
            raise CalibrationDataError(f"{where}: input {spec.name!r} is not a numeric array")
        if spec.dtype is not None and arr.dtype != spec.dtype:
            arr = _cast(arr, spec, where)
        if spec.shape and arr.ndim != len(spec.shape):
            raise CalibrationDataError(f"{where}: input {spec.name!r} has rank {arr.ndim} (shape {list(arr.shape)}), "
                                       f"the model expects rank {len(spec.shape)} {_fmt_shape(spec.shape)}")
        for axis, (got, want) in enumerate(zip(arr.shape, spec.shape)):
            if isinstance(want, int) and want > 0 and got != want:
                raise CalibrationDataError(f"{where}: input {spec.name!r} has shape {list(arr.shape)}, the model "
                                           f"expects {_fmt_shape(spec.shape)} (axis {axis})")
        if arr.dtype.kind == "f" and not np.isfinite(arr).all():
            bad = "NaN" if np.isnan(arr).any() else "Inf"
            raise CalibrationDataError(f"{where}: input {spec.name!r} contains {bad} values")
        feed[spec.name] = np.ascontiguousarray(arr)
    return feed


def _check_names(given: set, inputs: list[InputSpec], where: str, *, noun: str) -> None:
    """One error naming every missing and unknown name, and the model's real input names."""
    names = {i.name for i in inputs}
    missing, extra = sorted(names - given), sorted(given - names, key=str)
    if missing or extra:
        parts = [f"missing {noun}(s) {', '.join(missing)}"] if missing else []
        if extra:
            parts.append(f"unknown {'name' if noun == 'input' else noun}(s) {', '.join(map(str, extra))}")
        raise CalibrationDataError(f"{where}: {'; '.join(parts)}; the model's inputs are {', '.join(sorted(names))}")


def _cast(arr: np.ndarray, spec: InputSpec, where: str) -> np.ndarray:
    want = spec.dtype
    ok = (arr.dtype.kind == "f" and want.kind == "f") or (arr.dtype.kind in "iu" and want.kind in "iu") or \
         (arr.dtype.kind == "b" and want.kind == "b") or (arr.dtype.kind in "iub" and want.kind == "b")
    if not ok:
        raise CalibrationDataError(f"{where}: input {spec.name!r} has dtype {arr.dtype}, the model expects {want}")
    if arr.dtype.kind in "iu" and want.kind in "iu" and arr.size:
        info = np.iinfo(want)
        if arr.min() < info.min or arr.max() > info.max:
            raise CalibrationDataError(f"{where}: input {spec.name!r} has values outside the range of {want}")
    if arr.dtype.kind == "f" and want == np.float16 and arr.size and np.abs(arr).max() > 65504:
        raise CalibrationDataError(f"{where}: input {spec.name!r} has values too large for float16")
    return arr.astype(want)


def _fmt_shape(shape: tuple) -> str:
    return "[" + ", ".join(str(d) if d not in (None, "") else "?" for d in shape) + "]"


# ----------------------------------------------------------------------------------------------------------------


def open_dataset(spec: Any, inputs: list[InputSpec], *, preprocess: str | Path | None = None,
                 limit: int | None = None, what: str = "calibration data") -> Dataset:
    """Open ``spec`` (path, ``module:function``, callable, or list of feed dicts) as a :class:`Dataset`."""
    if callable(spec) and not isinstance(spec, (str, Path)):
        return _limited(Dataset(spec, inputs, label=f"{what} ({getattr(spec, '__name__', 'callable')})",
                                length=None), limit)
    if isinstance(spec, (list, tuple)):
        items = list(spec)
        return _limited(Dataset(lambda: items, inputs, label=what, length=len(items)), limit)
    text = str(spec)
    path = Path(text)
    if not path.exists() and ":" in text and not text.endswith(".npz"):
        return _limited(_callable_dataset(text, inputs, what), limit)
    if not path.exists():
        raise CalibrationDataError(f"{what} not found: {path}")
    if path.is_file():
        if path.suffix.lower() != ".npz":
            raise CalibrationDataError(f"{what}: {path} is not a .npz file (expected .npz, a folder of .npz files, "
                                       f"a folder of images, or module:function)")
        return _limited(_npz_stacked(path, inputs, what), limit)
    npz_files = sorted(p for p in path.iterdir() if p.suffix.lower() == ".npz")
    images = sorted(p for p in path.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
    if npz_files:
        return _limited(_npz_folder(path, npz_files, inputs, what), limit)
    if images:
        from edgeq.calibration.images import image_dataset

        return _limited(image_dataset(path, images, inputs, preprocess=preprocess, what=what), limit)
    raise CalibrationDataError(f"{what}: folder {path} contains no .npz files and no images")


def _limited(ds: Dataset, limit: int | None) -> Dataset:
    if not limit:
        return ds
    source = ds._source

    def head():
        for i, s in enumerate(source()):
            if i >= limit:
                break
            yield s

    length = min(ds.length, limit) if ds.length is not None else None
    return Dataset(head, ds.inputs, label=ds.label, length=length, fingerprint=ds.fingerprint)


def _open_npz(path: Path, what: str):
    try:
        return np.load(path, allow_pickle=False)
    except Exception as exc:
        raise CalibrationDataError(f"{what}: cannot read {path} as .npz: {str(exc).splitlines()[0][:200]}") from None


def _npz_stacked(path: Path, inputs: list[InputSpec], what: str) -> Dataset:
    with _open_npz(path, what) as npz:
        try:
            arrays = {k: npz[k] for k in npz.files}
        except Exception as exc:
            raise CalibrationDataError(f"{what}: {path} is corrupt: {str(exc).splitlines()[0][:200]}") from None
    if not arrays:
        raise CalibrationDataError(f"{what}: {path} contains no arrays")
    _check_names(set(arrays), inputs, f"{what}: {path}", noun="key")
    counts = {k: (v.shape[0] if v.ndim else 0) for k, v in arrays.items()}
    if len(set(counts.values())) != 1:
        raise CalibrationDataError(f"{what}: {path}: arrays have different sample counts on axis 0: {counts}")
    n = next(iter(counts.values()))
    if n == 0:
        raise CalibrationDataError(f"{what}: {path} contains zero samples")

    label = f"{what} {path.name}"
    # Fail before any model work: all samples share sample 0's dtype and shape, and non-finite values are found by
    # one vectorised scan.
    check_sample({k: v[:1] for k, v in arrays.items()}, inputs, where=f"{label} sample 0")
    for k, v in arrays.items():
        if v.dtype.kind == "f" and not np.isfinite(v).all():
            i = int(np.argmax(~np.isfinite(v.reshape(n, -1)).all(axis=1)))
            check_sample({k2: v2[i:i + 1] for k2, v2 in arrays.items()}, inputs, where=f"{label} sample {i}")

    def gen():
        for i in range(n):
            yield {k: v[i:i + 1] for k, v in arrays.items()}

    return Dataset(gen, inputs, label=label, length=n, fingerprint=str(path))


def _npz_folder(folder: Path, files: list[Path], inputs: list[InputSpec], what: str) -> Dataset:
    def gen():
        for f in files:
            with _open_npz(f, what) as npz:
                try:
                    yield {k: npz[k] for k in npz.files}
                except Exception as exc:
                    raise CalibrationDataError(f"{what}: {f} is corrupt: {str(exc).splitlines()[0][:200]}") from None

    return Dataset(gen, inputs, label=f"{what} {folder.name}/", length=len(files), fingerprint=str(folder))


def _callable_dataset(text: str, inputs: list[InputSpec], what: str) -> Dataset:
    target, _, func_name = text.rpartition(":")
    if not target or not func_name:
        raise CalibrationDataError(f"{what}: {text!r} is neither a file nor 'module:function'")
    try:
        if target.endswith(".py"):
            file = Path(target)
            if not file.exists():
                raise CalibrationDataError(f"{what}: {file} not found")
            spec = importlib.util.spec_from_file_location(f"edgeq_user_data_{file.stem}", file)
            module = importlib.util.module_from_spec(spec)
            spec.loader.exec_module(module)
        else:
            if "" not in sys.path and "." not in sys.path:
                sys.path.insert(0, "")
            module = importlib.import_module(target)
    except CalibrationDataError:
        raise
    except Exception as exc:
        raise CalibrationDataError(f"{what}: cannot import {target!r}: {type(exc).__name__}: {exc}") from None
    func = getattr(module, func_name, None)
    if not callable(func):
        raise CalibrationDataError(f"{what}: {target!r} has no callable {func_name!r}")
    return Dataset(func, inputs, label=f"{what} ({text})", length=None, fingerprint=text)


def finite_or_raise(value: float, what: str) -> float:
    if not math.isfinite(value):
        raise CalibrationDataError(f"{what} is not finite")
    return value
