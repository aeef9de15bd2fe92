"""Folder-of-images calibration data with declarative preprocessing.

The preprocessing YAML (``preprocess.yaml`` in the image folder, or a path given with ``--preprocess``)::

    input: image          # model input name (default: the model's only input)
    size: [224, 224]      # final [height, width]
    resize: 256           # optional: resize the shorter side first, then centre-crop to `size`
    grayscale: false
    scale: 0.00392156862  # multiply 0..255 pixels by this
    mean: [0.485, 0.456, 0.406]
    std: [0.229, 0.224, 0.225]
    layout: NCHW          # or NHWC
    dtype: float32
    channel_order: RGB    # or BGR
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import yaml

from edgeq.calibration.data import Dataset, InputSpec
from edgeq.errors import CalibrationDataError


@dataclass(frozen=True, kw_only=True)
class ImagePreprocess:
    input: str | None = None
    size: tuple[int, int] | None = None
    resize: int | None = None
    grayscale: bool = False
    scale: float = 1.0 / 255.0
    mean: tuple[float, ...] = (0.0,)
    std: tuple[float, ...] = (1.0,)
    layout: Literal["NCHW", "NHWC"] = "NCHW"
    dtype: Literal["float32", "float16", "uint8"] = "float32"
    channel_order: Literal["RGB", "BGR"] = "RGB"


def load_preprocess(path: Path) -> ImagePreprocess:
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except (OSError, yaml.YAMLError) as exc:
        raise CalibrationDataError(f"cannot read image preprocessing {path}: {str(exc).splitlines()[0]}") from None
    if not isinstance(raw, dict):
        raise CalibrationDataError(f"{path}: image preprocessing must be a mapping")
    fields = {f.name for f in dataclasses.fields(ImagePreprocess)}
    unknown = sorted(set(raw) - fields, key=repr)
    if unknown:
        raise CalibrationDataError(f"{path}: unknown key {unknown[0]!r}; valid keys: {', '.join(sorted(fields))}")
    try:
        for key in ("size", "mean", "std"):
            if key in raw and raw[key] is not None:
                raw[key] = tuple(raw[key]) if isinstance(raw[key], (list, tuple)) else (raw[key],)
        if "scale" in raw:
            raw["scale"] = _number(raw["scale"])
        pre = ImagePreprocess(**raw)
    except Exception as exc:
        raise CalibrationDataError(f"{path}: bad image preprocessing: {exc}") from None
    if pre.layout not in ("NCHW", "NHWC") or pre.channel_order not in ("RGB", "BGR"):
        raise CalibrationDataError(f"{path}: layout must be NCHW/NHWC and channel_order RGB/BGR")
    problem = _bad_value(pre)
    if problem:
        raise CalibrationDataError(f"{path}: {problem}")
    return pre


def _bad_value(pre: ImagePreprocess) -> str | None:
    def pixels(v) -> bool:
        return isinstance(v, int) and not isinstance(v, bool) and v > 0

    def number(v) -> bool:
        return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)

    if pre.size is not None and (len(pre.size) != 2 or not all(pixels(d) for d in pre.size)):
        return f"size must be [height, width] in pixels, got {list(pre.size)}"
    if pre.resize is not None and not pixels(pre.resize):
        return f"resize must be a positive number of pixels, got {pre.resize!r}"
    if not isinstance(pre.grayscale, bool):
        return f"grayscale must be true or false, got {pre.grayscale!r}"
    if not pre.mean or not pre.std or not all(number(v) for v in (pre.scale, *pre.mean, *pre.std)):
        return "scale, mean and std must be finite numbers (mean and std: one per channel, or one for all)"
    if any(v == 0 for v in pre.std):
        return f"std must not be 0, got {list(pre.std)}"
    return None


def image_dataset(folder: Path, images: list[Path], inputs: list[InputSpec], *, preprocess, what: str) -> Dataset:
    try:
        from PIL import Image
    except ImportError:
        raise CalibrationDataError("image calibration data needs Pillow: pip install pillow") from None
    pre_path = Path(preprocess) if preprocess else folder / "preprocess.yaml"
    if isinstance(preprocess, ImagePreprocess):
        pre = preprocess
    elif preprocess and not pre_path.is_file():
        raise CalibrationDataError(f"{what}: image preprocessing file not found: {pre_path}")
    elif pre_path.exists():
        pre = load_preprocess(pre_path)
    else:
        raise CalibrationDataError(f"{what}: image folder {folder} needs preprocessing: put a preprocess.yaml in it "
                                   f"or pass --preprocess FILE (keys: size, resize, mean, std, scale, layout, ...)")
    float_inputs = [i for i in inputs if i.dtype is not None and i.dtype.kind == "f"]
    name = pre.input or (inputs[0].name if len(inputs) == 1 else None)
    if name is None or name not in {i.name for i in inputs}:
        raise CalibrationDataError(f"{what}: preprocessing must name the image input ('input:'); the model's inputs "
                                   f"are {', '.join(i.name for i in inputs)}")
    if len(inputs) != 1:
        raise CalibrationDataError(f"{what}: a folder of images can only feed a model with one input; use a "
                                   f".npz or a module:function for {len(inputs)} inputs")
    spec = next(i for i in inputs if i.name == name)
    size = pre.size
    if size is not None and len(spec.shape) == 4:
        dims = spec.shape[2:4] if pre.layout == "NCHW" else spec.shape[1:3]
        if all(isinstance(d, int) and d > 0 for d in dims) and tuple(size) != tuple(dims):
            raise CalibrationDataError(f"{what}: preprocessing size {list(size)} does not match the model's input "
                                       f"{name!r} ({list(dims)} for {pre.layout})")
    if size is None and len(spec.shape) == 4:
        dims = spec.shape[2:4] if pre.layout == "NCHW" else spec.shape[1:3]
        if all(isinstance(d, int) and d > 0 for d in dims):
            size = tuple(dims)
    del float_inputs

    def load(path: Path) -> np.ndarray:
        try:
            with Image.open(path) as img:
                img = img.convert("L" if pre.grayscale else "RGB")
                if pre.resize:
                    w, h = img.size
                    k = pre.resize / min(w, h)
                    img = img.resize((max(1, round(w * k)), max(1, round(h * k))), Image.BILINEAR)
                if size is not None:
                    img = _center_crop_or_resize(img, size, crop=bool(pre.resize))
                arr = np.asarray(img, dtype=np.float32)
        except (OSError, ValueError) as exc:
            raise CalibrationDataError(f"{what}: cannot read image {path}: {exc}") from None
        if arr.ndim == 2:
            arr = arr[:, :, None]
        if pre.channel_order == "BGR":
            arr = arr[:, :, ::-1]
        if pre.dtype != "uint8":
            arr = (arr * pre.scale - np.asarray(pre.mean, np.float32)) / np.asarray(pre.std, np.float32)
        if pre.layout == "NCHW":
            arr = arr.transpose(2, 0, 1)
        return np.ascontiguousarray(arr[None].astype(pre.dtype))

    def gen():
        for p in images:
            yield {name: load(p)}

    return Dataset(gen, inputs, label=f"{what} {folder.name}/", length=len(images), fingerprint=str(folder))


def _center_crop_or_resize(img, size, *, crop: bool):
    from PIL import Image

    h, w = size
    if not crop:
        return img.resize((w, h), Image.BILINEAR) if img.size != (w, h) else img
    W, H = img.size
    left, top = max(0, (W - w) // 2), max(0, (H - h) // 2)
    return img.crop((left, top, left + w, top + h))


def _number(value) -> float:
    """A float, also written as a fraction such as ``1/255``."""
    if isinstance(value, str) and "/" in value:
        num, den = value.split("/", 1)
        return float(num) / float(den)
    return float(value)
