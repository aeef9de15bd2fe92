"""Resolve a pipeline spec against its files: models, target profiles, wiring, constants and hooks.

Everything that can be checked before running is checked here, so a misspelt input or value name is a one-line
error naming the stage, the name and what would have been valid, not a failure halfway through calibration.
"""

from __future__ import annotations

import dataclasses
import fnmatch
import importlib
import importlib.util
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np
import onnx

from edgeq.calibration.data import InputSpec, model_inputs
from edgeq.errors import ProfileError
from edgeq.pipeline_spec import PipelineError, PipelineSpec, StageSpec, read_pipeline_yaml
from edgeq.profiles import Override, TargetProfile, check_value, load_profile


@dataclass
class StagePlan:
    spec: StageSpec
    index: int
    model: Path
    profile: TargetProfile | None  # None for a float stage that is not compiled
    inputs: dict[str, str]  # model input -> value name (globs expanded)
    outputs: dict[str, str]  # model output (or, in a loop, model input) -> value name
    carry: dict[str, str]  # loop: model output -> model input of the next step
    input_specs: list[InputSpec]
    output_names: list[str]
    update: Callable | None = None
    sources: dict[str, str] = field(default_factory=dict)  # model input -> where its value comes from

    @property
    def name(self) -> str:
        return self.spec.name

    @property
    def where(self) -> str:
        return f"stages[{self.index}] ({self.spec.name})"


@dataclass
class Plan:
    spec: PipelineSpec
    path: Path
    constants: dict[str, np.ndarray]
    stages: list[StagePlan]
    input_specs: list[InputSpec]  # the pipeline inputs, typed from the first stage that reads each
    metric: Callable | None

    @property
    def base_dir(self) -> Path:
        return self.path.parent

    def data_spec(self, text: str) -> str:
        """A data path or ``file.py:function`` relative to the pipeline file; ``module:function`` unchanged."""
        head, sep, func = text.rpartition(":")
        if sep and head.endswith(".py"):
            return f"{_relative(self.base_dir, head)}:{func}"
        candidate = _relative(self.base_dir, text)
        return str(candidate) if candidate.exists() or not sep else text


def plan(path: str | Path, *, target: str | None = None) -> Plan:
    """Read the pipeline YAML at ``path`` and resolve it (models are read without their weights). ``target``
    replaces the pipeline-level target (a profile path is taken relative to the working directory); stages that
    name their own target keep it."""
    path = Path(path)
    spec = read_pipeline_yaml(path)
    if target is not None:
        if target.endswith((".yaml", ".yml")):
            target = str(Path(target).expanduser().resolve())
        spec = dataclasses.replace(spec, target=target)
    source, base = str(path), path.parent
    constants = {name: _constant(name, c, source) for name, c in spec.constants.items()}
    clash = sorted(set(constants) & set(spec.inputs))
    if clash:
        raise PipelineError(f"{source}: {clash[0]!r} is both a pipeline input and a constant")
    available: dict[str, str] = {n: "pipeline input" for n in spec.inputs}
    available.update({n: "constant" for n in constants})
    stages, typed = [], {}
    for index, stage in enumerate(spec.stages):
        sp = _stage(spec, stage, index, base, source, available)
        for model_input, value in sp.inputs.items():
            if value in spec.inputs and value not in typed:
                s = next(i for i in sp.input_specs if i.name == model_input)
                typed[value] = InputSpec(value, s.dtype, s.shape)
        stages.append(sp)
    missing = [o for o in spec.outputs if o not in available]
    if missing:
        raise PipelineError(f"{source}: pipeline output {missing[0]!r} is produced by no stage; values: "
                            f"{', '.join(sorted(available))}")
    input_specs = [typed.get(n, InputSpec(n, None, ())) for n in spec.inputs]
    metric = None
    if spec.evaluation is not None and spec.evaluation.metric:
        metric = resolve_callable(spec.evaluation.metric, base, f"{source}: evaluation.metric")
    return Plan(spec=spec, path=path, constants=constants, stages=stages, input_specs=input_specs, metric=metric)


def _stage(spec: PipelineSpec, stage: StageSpec, index: int, base: Path, source: str,
           available: dict[str, str]) -> StagePlan:
    where = f"{source}: stages[{index}] ({stage.name})"
    model_path = _relative(base, stage.model)
    if not model_path.is_file():
        raise PipelineError(f"{where}: model file not found: {model_path}")
    try:
        model = onnx.load(str(model_path), load_external_data=False)
    except Exception as exc:
        raise PipelineError(f"{where}: {model_path} is not an ONNX model ({str(exc).splitlines()[0][:200]})") \
            from None
    specs = model_inputs(model)
    in_names = [s.name for s in specs]
    out_names = [o.name for o in model.graph.output]
    needs_profile = stage.quantize or stage.compile_options is not None
    profile = _stage_profile(spec, stage, index, base, source) if needs_profile else None

    inputs: dict[str, str] = {}
    for key, value in sorted(stage.inputs.items(), key=lambda kv: "*" in kv[0]):
        for name in _match(key, in_names, where, "input", "inputs"):
            inputs.setdefault(name, value)
    for name in in_names:
        if name not in inputs:
            if name not in available:
                raise PipelineError(f"{where}: model input {name!r} is not wired; map it in 'inputs:' or produce a "
                                    f"value named {name!r} upstream (values: {', '.join(sorted(available))})")
            inputs[name] = name
    for name, value in inputs.items():
        if value not in available:
            raise PipelineError(f"{where}: input {name!r} reads value {value!r}, which does not exist before this "
                                f"stage; values: {', '.join(sorted(available)) or 'none'}")
    sources = {n: f"{available[v]} {v!r}" for n, v in inputs.items()}

    carry: dict[str, str] = {}
    loop = stage.loop
    if loop is not None:
        for key, value in loop.carry.items():
            for out in _match(key, out_names, where, "output", "loop.carry"):
                target = _substitute(key, value, out)
                if target not in in_names:
                    raise PipelineError(f"{where}: loop.carry maps {out!r} to {target!r}, which is not a model input; "
                                        f"inputs: {', '.join(in_names)}")
                carry[out] = target
        if loop.token is not None:
            _match(loop.token.logits, out_names, where, "output", "loop.token.logits")
            _match(loop.token.feed, in_names, where, "input", "loop.token.feed")
        for name in carry.values():
            sources[name] += " (step 0), then carried from the previous step"
        if loop.token is not None:
            sources[loop.token.feed] += " (step 0), then the chosen token"
    if stage.outputs is None:
        outputs = {o: o for o in out_names}
    else:
        allowed = out_names + (in_names if loop is not None else [])
        outputs = {}
        for key, value in stage.outputs.items():
            for name in _match(key, allowed, where, "output", "outputs"):
                outputs[name] = _substitute(key, value, name)
    new_values = list(outputs.values()) + ([loop.token.collect] if loop is not None and loop.token else [])
    for value in new_values:
        if value in available or new_values.count(value) > 1:
            raise PipelineError(f"{where}: value {value!r} already exists ({available.get(value, 'this stage')}); "
                                f"rename it with 'outputs: {{model_output: new_name}}'")
        available[value] = f"stage {stage.name}"
    update = resolve_callable(loop.update, base, f"{where}: loop.update") if loop is not None and loop.update else None
    return StagePlan(spec=stage, index=index, model=model_path, profile=profile, inputs=inputs, outputs=outputs,
                     carry=carry, input_specs=specs, output_names=out_names, update=update, sources=sources)


def _stage_profile(spec: PipelineSpec, stage: StageSpec, index: int, base: Path, source: str) -> TargetProfile:
    target = stage.target or spec.target
    if not target:
        raise PipelineError(f"{source}: stages[{index}] ({stage.name}) has no target; set 'target' on the stage or "
                            f"on the pipeline (or 'quantize: false' without 'compile')")
    if target.endswith((".yaml", ".yml")):
        target = str(_relative(base, target))
    try:
        profile = load_profile(target)
    except ProfileError as exc:
        raise PipelineError(f"{source}: stages[{index}] ({stage.name}): {exc}") from None
    label = f"{source} stages[{index}].profile"
    if stage.profile:
        merged = _merge(profile.to_dict(), stage.profile)
        try:
            profile = check_value(TargetProfile, merged, source, f"stages[{index}].profile")
            from edgeq.pass_base import make_pass

            for p in profile.passes + profile.post_passes:
                make_pass(p.name, p.options, source=label)
        except ProfileError as exc:
            raise PipelineError(str(exc)) from None
    if stage.keep_float:
        extra = tuple(Override(op_type=k, precision="float") if k[:1].isupper() and "/" not in k
                      else Override(node=k, precision="float") for k in stage.keep_float)
        profile = dataclasses.replace(profile, overrides=profile.overrides + extra)
    changed = " + " + label if stage.profile or stage.keep_float else ""
    return dataclasses.replace(profile, source=profile.source + changed)


def _merge(base: dict, over: dict) -> dict:
    out = dict(base)
    for key, value in over.items():
        out[key] = _merge(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
    return out


def _match(pattern: str, names: list[str], where: str, kind: str, key: str) -> list[str]:
    if "*" in pattern:
        found = [n for n in names if fnmatch.fnmatchcase(n, pattern)]
    else:
        found = [pattern] if pattern in names else []
    if not found:
        raise PipelineError(f"{where}: {key}: {pattern!r} matches no model {kind}; {kind}s: {', '.join(names)}")
    return found


def _substitute(pattern: str, template: str, name: str) -> str:
    """``present_*`` matched ``present_key_0``: the template ``past_*`` becomes ``past_key_0``."""
    if "*" not in pattern or "*" not in template:
        return template
    regex = "^" + "(.*)".join(re.escape(p) for p in pattern.split("*")) + "$"
    groups = re.match(regex, name).groups()
    parts = template.split("*")
    out = parts[0]
    for i, part in enumerate(parts[1:]):
        out += (groups[i] if i < len(groups) else "") + part
    return out


def _constant(name: str, c, source: str) -> np.ndarray:
    try:
        if c.shape is not None:
            return np.full(c.shape, c.fill, dtype=c.dtype)
        return np.asarray(c.value, dtype=c.dtype)
    except (TypeError, ValueError) as exc:
        raise PipelineError(f"{source}: constants.{name}: cannot make a {c.dtype} array: {exc}") from None


def _relative(base: Path, text: str) -> Path:
    p = Path(text).expanduser()
    return p if p.is_absolute() else base / p


def resolve_callable(text: str, base: Path, what: str) -> Callable[..., Any]:
    """``module:function`` (importable from the working directory) or ``file.py:function`` (relative to ``base``)."""
    target, sep, func_name = text.rpartition(":")
    if not sep or not target or not func_name:
        raise PipelineError(f"{what}: {text!r} must be 'module:function' or 'file.py:function'")
    try:
        if target.endswith(".py"):
            file = _relative(base, target)
            if not file.is_file():
                raise PipelineError(f"{what}: {file} not found")
            name = f"edgeq_pipeline_hook_{file.stem}_{abs(hash(str(file.resolve())))}"
            module = sys.modules.get(name)
            if module is None:
                spec = importlib.util.spec_from_file_location(name, file)
                module = importlib.util.module_from_spec(spec)
                sys.modules[name] = module
                try:
                    spec.loader.exec_module(module)
                except BaseException:
                    sys.modules.pop(name, None)
                    raise
        else:
            if "" not in sys.path and "." not in sys.path:
                sys.path.insert(0, "")
            module = importlib.import_module(target)
    except (PipelineError, ProfileError):
        raise
    except Exception as exc:
        raise PipelineError(f"{what}: cannot import {target!r}: {type(exc).__name__}: {exc}") from None
    func = getattr(module, func_name, None)
    if not callable(func):
        raise PipelineError(f"{what}: {target!r} has no callable {func_name!r}")
    return func
