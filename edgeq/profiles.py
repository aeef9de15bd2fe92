"""Target profiles: YAML data loaded strictly into frozen dataclasses.

A profile says how a target wants a model quantized (dtypes, symmetry, granularity, where Q/DQ goes, which ops
stay in float), which passes run, how to validate (thresholds) and how to compile. Built-in profiles live in the
``targets/`` folder (shipped as ``edgeq.targets``); a user's YAML can ``extends:`` one of them. An unknown or misspelt
key is an error naming the key, the file and the valid keys.
"""

from __future__ import annotations

import dataclasses
import math
import re
import types
import typing
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any, Literal

import yaml

from edgeq.errors import ProfileError

# float16 is not a quantized dtype: float16 models come from the to_fp16 pass (post_passes), with placement none
ActDType = Literal["uint8", "int8", "uint16", "int16", "float8e4m3fn"]
WeightDType = Literal["int8", "uint8", "int4", "uint4", "float8e4m3fn"]
Observer = Literal["minmax", "percentile", "entropy", "mse"]


@dataclass(frozen=True, kw_only=True)
class ActivationSpec:
    dtype: ActDType = "uint8"
    symmetric: bool = False
    observer: Observer = "minmax"
    percentile: float = 99.999
    # Keep a tensor in float when its calibrated magnitude exceeds this (attention-mask arithmetic, -inf fills).
    max_abs_range: float = 1.0e4
    # Keep a tensor in float (whole-graph targets: 16-bit) when more than this share of its calibrated magnitude
    # would round to zero; 1.0 turns the check off. ``max_underflow`` applies on whole-graph targets and to tensors
    # multiplied by another activation (long-axis attention probabilities); ``max_underflow_other`` to tensors
    # summed only by weight layers on targets that would keep them in float (activations with huge outliers).
    max_underflow: float = 0.1
    max_underflow_other: float = 0.15
    min_real_range: float = 1.0e-5

    def __post_init__(self) -> None:
        _require(0.0 < self.percentile <= 100.0, f"percentile must be in (0, 100], got {self.percentile}")
        _require(_positive(self.max_abs_range), f"max_abs_range must be > 0, got {self.max_abs_range}")
        _require(_positive(self.min_real_range), f"min_real_range must be > 0, got {self.min_real_range}")
        _require(0.0 < self.max_underflow <= 1.0, f"max_underflow must be in (0, 1], got {self.max_underflow}")
        _require(0.0 < self.max_underflow_other <= 1.0,
                 f"max_underflow_other must be in (0, 1], got {self.max_underflow_other}")


@dataclass(frozen=True, kw_only=True)
class WeightSpec:
    dtype: WeightDType = "int8"
    symmetric: bool = True
    per_channel_ops: tuple[str, ...] = ("Conv", "ConvTranspose", "MatMul", "Gemm")
    block_size: int = 0  # >0: blockwise along the reduction axis (int4 weight-only)
    bias: Literal["float", "int32"] = "float"
    # "nearest": round each weight on its own; "gptq": choose the integers that minimise each layer's output
    # error on the calibration data (edgeq.rounding; same scales, one more pass over the data)
    rounding: Literal["nearest", "gptq"] = "nearest"
    # with rounding gptq: subtract each layer's mean output error on the calibration inputs from its bias
    # (edgeq.rounding.bias_shift; a Conv/Gemm bias, or the constant of the Add after a MatMul)
    bias_correction: bool = True

    def __post_init__(self) -> None:
        _require(self.block_size >= 0, f"block_size must be 0 (off) or a positive block length, got {self.block_size}")


@dataclass(frozen=True, kw_only=True)
class FixedScale:
    scale: float
    zero_point: int

    def __post_init__(self) -> None:
        _require(_positive(self.scale), f"scale must be > 0, got {self.scale}")
        _require(-32768 <= self.zero_point <= 65535, f"zero_point {self.zero_point} fits no 8/16-bit type")


@dataclass(frozen=True, kw_only=True)
class PlacementSpec:
    # "inputs": Q/DQ on the activation inputs of `ops` only (TensorRT); "all": every float tensor (QNN);
    # "weights": weights only, activations stay float (weight-only compression).
    mode: Literal["inputs", "all", "weights", "none"] = "inputs"  # none: no Q/DQ (float16 profiles)
    ops: tuple[str, ...] = ("Conv", "ConvTranspose", "Gemm", "MatMul")
    residual_add: bool = False
    float_ops: tuple[str, ...] = ()
    fixed_output_scales: dict[str, FixedScale] = field(default_factory=dict)
    quantize_graph_outputs: bool = False
    # mode "inputs": also quantize the outputs of these ops (every consumer then reads the dequantized value),
    # so a runtime can fuse DQ -> op -> Q into one integer kernel (ONNX Runtime's QLinearConv).
    quantize_outputs_of: tuple[str, ...] = ()
    # Conv/MatMul/Gemm layers that read a network input directly (through Pad, Reshape, ...) stay float when their
    # multiply-accumulates are at most this share of the model's (an image model's stem); 0 turns it off.
    float_input_layers: float = 0.0

    def __post_init__(self) -> None:
        _require(0.0 <= self.float_input_layers <= 1.0,
                 f"float_input_layers must be in [0, 1], got {self.float_input_layers}")


@dataclass(frozen=True, kw_only=True)
class Thresholds:
    min_cosine: float = 0.99
    min_sqnr_db: float = 15.0
    max_abs_error: float | None = None
    min_top1_agreement: float | None = None

    def __post_init__(self) -> None:
        _require(-1.0 <= self.min_cosine <= 1.0, f"min_cosine must be in [-1, 1], got {self.min_cosine}")
        _require(not math.isnan(self.min_sqnr_db), "min_sqnr_db must be a number, got nan")
        _require(self.max_abs_error is None or self.max_abs_error >= 0,
                 f"max_abs_error must be >= 0, got {self.max_abs_error}")
        _require(self.min_top1_agreement is None or 0.0 <= self.min_top1_agreement <= 1.0,
                 f"min_top1_agreement must be in [0, 1], got {self.min_top1_agreement}")


@dataclass(frozen=True, kw_only=True)
class PassSpec:
    name: str
    options: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True, kw_only=True)
class CompileSpec:
    backend: Literal["none", "tensorrt", "qnn", "coreml", "ort"] = "none"
    soc: str | None = None
    fp16: bool = False
    minimum_deployment_target: str | None = None


@dataclass(frozen=True, kw_only=True)
class Override:
    """Mixed precision: keep matching nodes/tensors in another precision."""

    op_type: str | None = None
    node: str | None = None
    tensor: str | None = None
    precision: Literal["float", "int16", "uint16", "fp16", "int8", "uint8"] = "float"

    def matches(self, op: str, name: str, outputs: typing.Iterable[str] = ()) -> bool:
        """Whether this override applies to a node: by op type, by name, or (``tensor``) as the tensor's producer."""
        return (self.op_type is not None and self.op_type == op) or (self.node is not None and self.node == name) \
            or (self.tensor is not None and self.tensor in outputs)


@dataclass(frozen=True, kw_only=True)
class TargetProfile:
    name: str
    description: str = ""
    min_opset: int = 13
    static_shapes: bool = False
    activations: ActivationSpec = field(default_factory=ActivationSpec)
    weights: WeightSpec = field(default_factory=WeightSpec)
    placement: PlacementSpec = field(default_factory=PlacementSpec)
    passes: tuple[PassSpec, ...] = ()  # graph passes before calibration
    post_passes: tuple[PassSpec, ...] = ()  # after Q/DQ insertion, with the final calibration statistics
    thresholds: Thresholds = field(default_factory=Thresholds)
    overrides: tuple[Override, ...] = ()
    compile: CompileSpec = field(default_factory=CompileSpec)
    source: str = ""  # where it was loaded from (not a YAML key)

    def __post_init__(self) -> None:
        _require(self.min_opset > 0, f"min_opset must be an ONNX opset number, got {self.min_opset}")

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d.pop("source", None)
        return d

    def with_overrides(self, **changes: Any) -> "TargetProfile":
        return dataclasses.replace(self, **changes)


def _require(ok: bool, message: str) -> None:
    if not ok:
        raise ValueError(message)


def _positive(x: float) -> bool:
    return 0.0 < x < math.inf


# ----------------------------------------------------------------------------------------------------------------
# Strict loading


def _builtin_dir():
    return resources.files("edgeq.targets")


def _builtin_names() -> list[str]:
    return sorted(p.name[:-5] for p in _builtin_dir().iterdir() if p.name.endswith(".yaml"))


def list_targets() -> list[TargetProfile]:
    """The built-in profiles, sorted by name."""
    return [load_profile(n) for n in _builtin_names()]


def load_profile(name_or_path: str | Path, *, _chain: tuple[str, ...] = ()) -> TargetProfile:
    """Load a built-in profile by name (``qnn``) or a user profile from a YAML path."""
    raw, source = _read_raw(str(name_or_path))
    if source in _chain:
        raise ProfileError(f"circular 'extends' in profiles: {' -> '.join(_chain + (source,))}")
    if not isinstance(raw, dict):
        raise ProfileError(f"{source}: a profile must be a YAML mapping, got {type(raw).__name__}")
    raw = dict(raw)
    parent = raw.pop("extends", None)
    if parent is not None:
        if not isinstance(parent, str):
            raise ProfileError(f"{source}: 'extends' must be a profile name or path, got {parent!r}")
        base_path = parent
        if not parent.endswith((".yaml", ".yml")) or Path(parent).is_absolute():
            pass
        elif not Path(parent).exists() and Path(source).parent.joinpath(parent).exists():
            base_path = str(Path(source).parent / parent)
        base = load_profile(base_path, _chain=_chain + (source,))
        merged = _deep_merge(base.to_dict(), raw)
    else:
        merged = raw
    if "name" not in merged:
        merged["name"] = Path(source).stem
    profile = _build(TargetProfile, merged, source, "")
    _check_passes(profile, source)
    return dataclasses.replace(profile, source=source)


def _check_passes(profile: TargetProfile, source: str) -> None:
    """Unknown passes and pass options are profile errors at load time, not halfway through a run."""
    from edgeq.pass_base import make_pass

    for spec in profile.passes + profile.post_passes:
        make_pass(spec.name, spec.options, source=source)


def _read_raw(name: str) -> tuple[Any, str]:
    if not name.strip():
        raise ProfileError(f"empty target name; built-in targets: {', '.join(_builtin_names())} (or a path to a .yaml)")
    path = Path(name)
    if name.endswith((".yaml", ".yml")) or path.exists():
        if not path.exists():
            raise ProfileError(f"profile file not found: {name}")
        if path.is_dir():
            raise ProfileError(f"{name} is a directory, expected a profile YAML file")
        text, source = path.read_text(encoding="utf-8", errors="replace"), str(path)
    else:
        res = _builtin_dir() / f"{name}.yaml"
        if not res.is_file():
            raise ProfileError(f"unknown target {name!r}; built-in targets: {', '.join(_builtin_names())} "
                               f"(or a path to a .yaml)")
        text, source = res.read_text(encoding="utf-8"), f"{name}.yaml (built-in)"
    try:
        return yaml.safe_load(text), source
    except yaml.YAMLError as exc:
        first = str(exc).strip().splitlines()
        raise ProfileError(f"{source}: invalid YAML: {' '.join(first[:2])}") from None


def _deep_merge(base: dict, over: dict) -> dict:
    out = dict(base)
    for k, v in over.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict) and k != "fixed_output_scales":
            out[k] = _deep_merge(out[k], v)
        else:
            out[k] = v
    return out


def _build(cls, data: Any, source: str, where: str):
    label = where or "profile"
    if isinstance(data, cls):
        return data
    if not isinstance(data, dict):
        raise ProfileError(f"{source}: {label} must be a mapping, got {data!r}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.name != "source"}
    unknown = sorted(set(data) - set(fields), key=repr)  # YAML keys need not be strings (null:, 1:)
    if unknown:
        raise ProfileError(
            f"{source}: unknown key {unknown[0]!r} in {label}; valid keys: {', '.join(sorted(fields))}"
        )
    kwargs = {}
    for key, value in data.items():
        kwargs[key] = _convert(hints[key], value, source, f"{where}.{key}" if where else key)
    try:
        return cls(**kwargs)
    except (TypeError, ValueError) as exc:
        raise ProfileError(f"{source}: {label}: {exc}") from None


def _convert(tp: Any, value: Any, source: str, where: str) -> Any:
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for a in args:
            if a is type(None):
                continue
            try:
                return _convert(a, value, source, where)
            except ProfileError as exc:
                errors.append(str(exc))
        raise ProfileError(errors[0] if errors else f"{source}: {where}: bad value {value!r}")
    if origin is Literal:
        if value not in args:
            raise ProfileError(f"{source}: {where} must be one of {', '.join(map(str, args))}; got {value!r}")
        return value
    if origin is tuple:
        if isinstance(value, (str, dict)) or not isinstance(value, (list, tuple)):
            raise ProfileError(f"{source}: {where} must be a list, got {value!r}")
        return tuple(_convert(args[0], v, source, f"{where}[{i}]") for i, v in enumerate(value))
    if origin is dict:
        if not isinstance(value, dict):
            raise ProfileError(f"{source}: {where} must be a mapping, got {value!r}")
        return {str(k): _convert(args[1], v, source, f"{where}.{k}") for k, v in value.items()}
    if dataclasses.is_dataclass(tp):
        if tp is PassSpec and isinstance(value, str):
            value = {"name": value}
        return _build(tp, value, source, where)
    if tp is Any:
        return value
    if tp is bool:
        if not isinstance(value, bool):
            raise ProfileError(f"{source}: {where} must be true or false, got {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ProfileError(f"{source}: {where} must be an integer, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, str) and _YAML11_EXPONENT.match(value.strip()):
            value = float(value)  # YAML 1.1 reads 1e9 (no dot) as a string; anyone writing it means the number
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ProfileError(f"{source}: {where} must be a number, got {value!r}")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise ProfileError(f"{source}: {where} must be a string, got {value!r}")
        return value
    return value


_YAML11_EXPONENT = re.compile(r"^[+-]?(\d+\.?\d*|\.\d+)[eE][+-]?\d+$")


def check_value(tp: Any, value: Any, source: str, where: str) -> Any:
    """``value`` converted to type ``tp`` the way profile keys are (lists become tuples), or a ProfileError."""
    return _convert(tp, value, source, where)


def profile_yaml(profile: TargetProfile) -> str:
    """The resolved profile as YAML (``edgeq targets show``)."""
    return yaml.safe_dump(_plain(profile.to_dict()), sort_keys=False)


def _plain(obj: Any) -> Any:
    if isinstance(obj, dict):
        return {k: _plain(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_plain(v) for v in obj]
    return obj
