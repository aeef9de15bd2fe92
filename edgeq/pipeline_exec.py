"""Run a planned pipeline on one sample: stages in order, loops stepped, every feed optionally captured.

The same runner executes the FP32 pipeline (whose captured feeds become the calibration data of every stage, so a
downstream model is calibrated on what its upstream model really produces) and the quantized pipeline (whose
final values are compared with FP32 end to end). Sessions are ONNX Runtime CPU sessions, as in validation.
"""

from __future__ import annotations

import logging
import time
from collections import defaultdict
from pathlib import Path
from typing import Callable

import numpy as np

from edgeq.calibration.calibrate import make_session
from edgeq.errors import EdgeqError
from edgeq.model_io import load_model
from edgeq.pipeline_plan import Plan, StagePlan
from edgeq.pipeline_spec import PipelineError, TokenSpec

log = logging.getLogger(__name__)

Capture = Callable[[StagePlan, int, dict[str, np.ndarray]], None]


class PipelineRunner:
    """The pipeline over one set of models (``models[stage name]``, default: each stage's FP32 model)."""

    def __init__(self, plan: Plan, models: dict[str, Path] | None = None, *, threads: int = 0):
        self.plan = plan
        self.models = {s.name: Path((models or {}).get(s.name, s.model)) for s in plan.stages}
        self.sessions = {}
        for stage in plan.stages:
            session = make_session(load_model(self.models[stage.name], check=False), threads=threads,
                                   optimize="all")
            names = [o.name for o in session.get_outputs()]
            missing = [o for o in stage.output_names if o not in names]
            if missing:
                raise PipelineError(f"{stage.where}: {self.models[stage.name]} lacks output(s) {', '.join(missing)}")
            self.sessions[stage.name] = session
        self.seconds: dict[str, float] = defaultdict(float)
        self.calls: dict[str, int] = defaultdict(int)

    def __call__(self, sample: dict[str, np.ndarray], capture: Capture | None = None) -> dict[str, np.ndarray]:
        """All values of the pipeline (inputs, constants and every stage's published outputs) for ``sample``."""
        values: dict[str, np.ndarray] = {**self.plan.constants, **sample}
        for stage in self.plan.stages:
            feeds = {name: values[value] for name, value in stage.inputs.items()}
            if stage.spec.loop is None:
                outputs = self._run(stage, 0, feeds, capture)
                values.update({value: outputs[name] for name, value in stage.outputs.items()})
            else:
                values.update(self._loop(stage, feeds, capture))
        return values

    def _run(self, stage: StagePlan, step: int, feeds: dict, capture: Capture | None) -> dict[str, np.ndarray]:
        if capture is not None:
            capture(stage, step, feeds)
        start = time.perf_counter()
        try:
            results = self.sessions[stage.name].run(stage.output_names, feeds)
        except Exception as exc:
            msg = str(exc).strip().splitlines()[0][:300] if str(exc).strip() else type(exc).__name__
            raise PipelineError(f"{stage.where}: running {self.models[stage.name].name} failed at step {step}: "
                                f"{msg}") from None
        self.seconds[stage.name] += time.perf_counter() - start
        self.calls[stage.name] += 1
        return dict(zip(stage.output_names, results))

    def _loop(self, stage: StagePlan, feeds: dict, capture: Capture | None) -> dict[str, np.ndarray]:
        loop = stage.spec.loop
        token: TokenSpec | None = loop.token
        token_dtype = next((s.dtype for s in stage.input_specs if token and s.name == token.feed), None) or np.int64
        generated: list[int] = []
        outputs: dict[str, np.ndarray] = {}
        for step in range(loop.max_steps):
            outputs = self._run(stage, step, feeds, capture)
            following = dict(feeds)
            following.update({inp: outputs[out] for out, inp in stage.carry.items()})
            stop = False
            if token is not None:
                chosen = choose_token(outputs[token.logits], step, token)
                stop = token.stop is not None and chosen == token.stop
                if not stop:
                    generated.append(chosen)
                    following[token.feed] = np.array([[chosen]], dtype=token_dtype)
            if stage.update is not None:
                following.update(self._update(stage, step, feeds, outputs))
            feeds = following
            if stop:
                break
        published = {}
        for name, value in stage.outputs.items():
            published[value] = outputs[name] if name in outputs else feeds[name]
        if token is not None:
            published[token.collect] = np.array([generated], dtype=np.int64)
        return published

    def _update(self, stage: StagePlan, step: int, feeds: dict, outputs: dict) -> dict[str, np.ndarray]:
        try:
            changes = stage.update(step, dict(feeds), dict(outputs))
        except EdgeqError:
            raise
        except Exception as exc:
            raise PipelineError(f"{stage.where}: loop.update hook failed at step {step}: "
                                f"{type(exc).__name__}: {exc}") from exc
        if changes is None:
            return {}
        if not isinstance(changes, dict):
            raise PipelineError(f"{stage.where}: loop.update must return a dict of model inputs (or None), got "
                                f"{type(changes).__name__}")
        unknown = sorted(set(changes) - set(stage.inputs))
        if unknown:
            raise PipelineError(f"{stage.where}: loop.update returned {unknown[0]!r}, which is not a model input; "
                                f"inputs: {', '.join(stage.inputs)}")
        return {k: np.asarray(v) for k, v in changes.items()}

    def timing(self) -> dict[str, dict]:
        return {name: {"calls": self.calls[name], "seconds": round(self.seconds[name], 4),
                       "ms_per_call": 1000 * self.seconds[name] / self.calls[name] if self.calls[name] else None}
                for name in self.sessions}


def choose_token(logits: np.ndarray, step: int, token: TokenSpec) -> int:
    """Greedy id from the last position's scores (batch 1), with the suppressed ids masked out."""
    scores = np.asarray(logits)
    row = scores.reshape(-1, scores.shape[-1])[-1].astype(np.float32, copy=True)
    too_big = [i for i in (*token.suppress, *token.suppress_first) if not 0 <= i < row.size]
    if too_big:
        raise PipelineError(f"loop.token: id {too_big[0]} is outside the {row.size} scores of {token.logits!r}")
    if token.suppress:
        row[list(token.suppress)] = -np.inf
    if step == 0 and token.suppress_first:
        row[list(token.suppress_first)] = -np.inf
    return int(np.argmax(row))
