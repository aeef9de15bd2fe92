"""Pipeline YAML: several ONNX models wired by value names, loaded strictly into frozen dataclasses.

A pipeline names its raw inputs (what calibration and evaluation samples hold), optional constants, and an ordered
list of stages. Each stage runs one model once, or in a ``loop`` (autoregressive decoding, denoising steps) that
feeds outputs back as inputs (``carry``), picks a greedy token (``token``) or calls an ``update`` hook. Every value
a stage reads must exist when the stage runs. An unknown or misspelt key is an error naming the key, the file and
the valid keys, exactly as for target profiles. The schema is documented in ``docs/pipelines.md``.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from edgeq.errors import EdgeqError, ProfileError
from edgeq.profiles import check_value

ConstDType = Literal["float32", "float16", "int64", "int32", "int8", "uint8", "bool"]
_NAME = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.-]*$")


class PipelineError(EdgeqError):
    """A pipeline YAML is malformed, names an unknown key, model, input, output or value, or a hook fails."""


@dataclass(frozen=True, kw_only=True)
class ConstantSpec:
    """A fixed value: either ``value`` (nested lists or a number) or zeros/``fill`` of ``shape`` (dims may be 0)."""

    dtype: ConstDType = "float32"
    value: Any = None
    shape: tuple[int, ...] | None = None
    fill: float = 0.0

    def __post_init__(self) -> None:
        if (self.value is None) == (self.shape is None):
            raise ValueError("give exactly one of 'value' or 'shape'")
        if self.shape is not None and any(d < 0 for d in self.shape):
            raise ValueError(f"shape dims must be >= 0, got {list(self.shape)}")


@dataclass(frozen=True, kw_only=True)
class TokenSpec:
    """Greedy token selection: argmax of ``logits`` at the last position, fed back as ``[[id]]`` to ``feed``."""

    logits: str
    feed: str
    collect: str  # pipeline value that receives the generated ids as [1, n] int64 (stop token excluded)
    stop: int | None = None
    suppress: tuple[int, ...] = ()  # never chosen
    suppress_first: tuple[int, ...] = ()  # not chosen at step 0


@dataclass(frozen=True, kw_only=True)
class LoopSpec:
    max_steps: int
    carry: dict[str, str] = field(default_factory=dict)  # model output -> model input of the next step ('*' glob)
    token: TokenSpec | None = None
    update: str | None = None  # 'module:function' or 'file.py:function': (step, feeds, outputs) -> dict | None

    def __post_init__(self) -> None:
        if self.max_steps < 1:
            raise ValueError(f"max_steps must be >= 1, got {self.max_steps}")


@dataclass(frozen=True, kw_only=True)
class StageCalibration:
    every: int = 1  # loop stages: calibrate on every k-th step's feed
    max_samples: int | None = None

    def __post_init__(self) -> None:
        if self.every < 1:
            raise ValueError(f"every must be >= 1, got {self.every}")
        if self.max_samples is not None and self.max_samples < 1:
            raise ValueError(f"max_samples must be >= 1, got {self.max_samples}")


@dataclass(frozen=True, kw_only=True)
class StageCompile:
    backend: Literal["tensorrt", "qnn", "coreml", "ort"] | None = None  # default: the profile's compile backend
    soc: str | None = None
    input_shapes: dict[str, tuple[int, ...]] = field(default_factory=dict)


@dataclass(frozen=True, kw_only=True)
class StageFallback:
    """edgeq's automatic fallback for one stage: the fewest, most sensitive layers leave int8 until the stage meets
    this budget on its captured calibration feeds (see edgeq.precision.FallbackOptions)."""

    min_cosine: float | None = None  # None: the profile's threshold
    min_sqnr_db: float | None = None
    max_float_fraction: float = 0.10
    time_limit_s: float = 300.0
    max_samples: int = 16
    precision: Literal["auto", "float", "wide"] = "auto"


@dataclass(frozen=True, kw_only=True)
class StageSpec:
    name: str
    model: str
    target: str | None = None  # default: the pipeline's target
    profile: dict[str, Any] = field(default_factory=dict)  # profile keys deep-merged over the target
    keep_float: tuple[str, ...] = ()  # op types (Softmax) or node names kept in float
    quantize: bool = True
    compile: bool | StageCompile = False  # true: the profile's compile backend and options
    inputs: dict[str, str] = field(default_factory=dict)  # model input ('*' glob) -> value name
    outputs: dict[str, str] | None = None  # model output (loops: or input) -> value name; default: all outputs
    loop: LoopSpec | None = None
    calibration: StageCalibration = field(default_factory=StageCalibration)
    fallback: bool | StageFallback = False  # true: the fallback's defaults with the profile's thresholds
    latency_runs: int = 10

    def __post_init__(self) -> None:
        if not _NAME.match(self.name):
            raise ValueError(f"stage name {self.name!r} must be letters, digits, '_', '.', '-' (it names files)")
        if self.latency_runs < 0:
            raise ValueError(f"latency_runs must be >= 0, got {self.latency_runs}")

    @property
    def fallback_options(self) -> StageFallback | None:
        if isinstance(self.fallback, StageFallback):
            return self.fallback
        return StageFallback() if self.fallback else None

    @property
    def compile_options(self) -> StageCompile | None:
        if isinstance(self.compile, StageCompile):
            return self.compile
        return StageCompile() if self.compile else None


@dataclass(frozen=True, kw_only=True)
class DataSpec:
    data: str  # .npz, folder of .npz, 'module:function' or 'file.py:function' yielding dicts of pipeline inputs
    max_samples: int | None = None


@dataclass(frozen=True, kw_only=True)
class Bound:
    min: float | None = None
    max: float | None = None


@dataclass(frozen=True, kw_only=True)
class EvaluationSpec:
    data: str
    max_samples: int | None = None
    metric: str | None = None  # 'module:function': (reference: list[dict], candidate: list[dict]) -> dict
    thresholds: dict[str, Bound] = field(default_factory=dict)
    latency: bool = True


@dataclass(frozen=True, kw_only=True)
class PipelineSpec:
    name: str
    description: str = ""
    target: str | None = None
    inputs: tuple[str, ...]
    constants: dict[str, ConstantSpec] = field(default_factory=dict)
    stages: tuple[StageSpec, ...]
    outputs: tuple[str, ...]
    calibration: DataSpec
    evaluation: EvaluationSpec | None = None


def read_pipeline_yaml(path: str | Path) -> PipelineSpec:
    """Parse and type-check a pipeline YAML (no model files are opened; see :func:`edgeq.pipeline_plan.plan`)."""
    import typing

    file = Path(path)
    source = str(file)
    if not file.is_file():
        raise PipelineError(f"pipeline file not found: {file}")
    try:
        raw = yaml.safe_load(file.read_text(encoding="utf-8", errors="replace"))
    except yaml.YAMLError as exc:
        first = str(exc).strip().splitlines()
        raise PipelineError(f"{source}: invalid YAML: {' '.join(first[:2])}") from None
    if not isinstance(raw, dict):
        raise PipelineError(f"{source}: a pipeline must be a YAML mapping, got {type(raw).__name__}")
    hints = typing.get_type_hints(PipelineSpec)
    unknown = sorted(set(raw) - set(hints))
    if unknown:
        raise PipelineError(f"{source}: unknown key {unknown[0]!r} in pipeline; valid keys: {', '.join(sorted(hints))}")
    required = ("name", "inputs", "stages", "outputs", "calibration")
    missing = [k for k in required if k not in raw]
    if missing:
        raise PipelineError(f"{source}: missing key {missing[0]!r} in pipeline (required: {', '.join(required)})")
    _check_required(raw, source)
    kwargs = {}
    try:
        for key, value in raw.items():
            kwargs[key] = check_value(hints[key], value, source, key)
        spec = PipelineSpec(**kwargs)
    except ProfileError as exc:
        raise PipelineError(_as_pipeline_message(str(exc))) from None
    except (TypeError, ValueError) as exc:
        raise PipelineError(f"{source}: {exc}") from None
    if not spec.stages:
        raise PipelineError(f"{source}: 'stages' is empty; a pipeline needs at least one stage")
    names = [s.name for s in spec.stages]
    dup = sorted({n for n in names if names.count(n) > 1})
    if dup:
        raise PipelineError(f"{source}: stage name {dup[0]!r} is used twice; stage names must be unique")
    return spec


def _check_required(raw: dict, source: str) -> None:
    """Missing required keys, named with their place (the dataclass constructors would only say 'argument')."""
    for i, stage in enumerate(raw["stages"] if isinstance(raw["stages"], list) else ()):
        if not isinstance(stage, dict):
            continue
        where = f"stages[{i}]"
        _require_keys(stage, ("name", "model"), source, where)
        loop = stage.get("loop")
        if isinstance(loop, dict):
            _require_keys(loop, ("max_steps",), source, where + ".loop")
            if isinstance(loop.get("token"), dict):
                _require_keys(loop["token"], ("logits", "feed", "collect"), source, where + ".loop.token")
    for key in ("calibration", "evaluation"):
        if isinstance(raw.get(key), dict):
            _require_keys(raw[key], ("data",), source, key)


def _require_keys(raw: dict, keys: tuple[str, ...], source: str, where: str) -> None:
    for key in keys:
        if key not in raw:
            raise PipelineError(f"{source}: missing key {key!r} in {where}")


def _as_pipeline_message(message: str) -> str:
    # The profile loader's converters name "profile" as the fallback label; here everything is a pipeline key.
    return message.replace(" in profile;", " in pipeline;")
