"""Mixed precision: which nodes stay in float or get 16-bit activations, and automatic fallback.

:class:`PrecisionPlan` is what ``insert_qdq`` reads (``float_nodes`` are left unquantized, ``wide_nodes`` get
16-bit activations on whole-graph targets such as QNN). :func:`plan_from_overrides` resolves a profile's
``overrides`` (by op type, node or tensor) into a plan for a given graph.

:func:`auto_fallback` finds the fewest layers to keep in float so that the quantized model meets a fidelity budget
(minimum cosine / SQNR of every output, the profile's top-1 agreement, or a user task metric). On whole-graph
integer targets (QNN) the chosen layers get 16-bit activations instead, so they stay on the NPU, and the candidates
include the non-compute nodes whose outputs are quantized (residual Adds, LayerNorms). At most
``max_float_fraction`` of the candidates, and of the compute layers kept in float, are given up:

1. quantize everything once (one calibration, reused: only ``insert_qdq`` reruns, which is cheap) and score it;
2. rank candidate layers by a one-run prior (the noise each layer adds, as ``edgeq debug`` measures it), then
   measure, in that order and while the time budget allows, the gain from keeping each single layer in float;
3. also measure groups of structurally alike nodes (same op type feeding the same op types), which matters when
   the error is spread over many layers;
4. take the moves greedily by measured gain, keeping each only if the score improves (every try is a point of the
   trade-off curve), and stop when the budget is met, the limits are reached or time runs out. The best model
   found is returned.

It evaluates on (a subset of) the calibration data, never on the user's evaluation data, so that ``--eval`` stays
an honest held-out measurement of the model the fallback chose.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import time
from dataclasses import dataclass, field
from typing import Callable, Sequence

import numpy as np
import onnx

from edgeq.errors import EdgeqError

log = logging.getLogger(__name__)

CANDIDATE_OPS = ("Conv", "ConvTranspose", "MatMul", "Gemm", "Einsum")


@dataclass(frozen=True)
class PrecisionPlan:
    """Nodes kept in float and nodes given 16-bit activations (by node name in the canonical graph)."""

    float_nodes: frozenset[str] = frozenset()
    wide_nodes: frozenset[str] = frozenset()

    def __post_init__(self):
        object.__setattr__(self, "float_nodes", frozenset(self.float_nodes))
        object.__setattr__(self, "wide_nodes", frozenset(self.wide_nodes))

    def with_float(self, names) -> "PrecisionPlan":
        return PrecisionPlan(self.float_nodes | set(names), self.wide_nodes)

    def union(self, other: "PrecisionPlan | None") -> "PrecisionPlan":
        if other is None:
            return self
        return PrecisionPlan(self.float_nodes | other.float_nodes, self.wide_nodes | other.wide_nodes)

    def as_dict(self) -> dict:
        return {"float_nodes": sorted(self.float_nodes), "wide_nodes": sorted(self.wide_nodes)}


def plan_from_overrides(profile, model: onnx.ModelProto) -> PrecisionPlan:
    """The plan a profile's ``overrides`` mean for ``model``; a ``tensor`` override applies to its producer."""
    floats, wide = set(), set()
    for ov in profile.overrides:
        names = {n.name for n in model.graph.node if ov.matches(n.op_type, n.name, n.output)}
        names |= {ov.node} if ov.node else set()
        if ov.precision in ("float", "fp16"):
            floats |= names
        elif ov.precision in ("int16", "uint16"):
            wide |= names
    return PrecisionPlan(frozenset(floats), frozenset(wide))


# ------------------------------------------------------------------------------------------------------------------
# Fidelity budget and scores


@dataclass(frozen=True, kw_only=True)
class FallbackOptions:
    time_limit_s: float = 300.0
    max_float_fraction: float = 0.10  # of the candidate compute layers
    max_samples: int = 16  # calibration samples used to score the trade-off curve
    rank_samples: int = 4  # of those, how many score each single-layer trial (cheaper, so more get measured)
    min_cosine: float | None = None  # None: the profile's threshold
    min_sqnr_db: float | None = None
    min_top1_agreement: float | None = None
    metric: str | Callable | None = None  # "module:function"(reference_outputs, candidate_outputs) -> float
    min_metric: float | None = None
    # what chosen layers get: "float", or "wide" (16-bit activations, stays on the NPU); "auto": wide on
    # whole-graph integer targets (QNN), float elsewhere
    precision: str = "auto"

    def __post_init__(self):
        if self.time_limit_s <= 0 or not 0 <= self.max_float_fraction <= 1 or min(self.max_samples,
                                                                                    self.rank_samples) < 1:
            raise EdgeqError("fallback options: need time_limit_s > 0, 0 <= max_float_fraction <= 1, "
                             "max_samples >= 1 and rank_samples >= 1")
        if self.precision not in ("auto", "float", "wide"):
            raise EdgeqError(f"fallback options: precision must be auto, float or wide, got {self.precision!r}")
        if self.metric is not None and self.min_metric is None:
            raise EdgeqError("fallback options: a task metric needs min_metric (the value it must reach)")


@dataclass(frozen=True)
class Score:
    cosine: float  # worst output's mean cosine
    sqnr_db: float  # worst output's SQNR
    top1: float | None
    metric: float | None

    def key(self) -> float:
        """One number to maximise: the task metric when there is one, else the worst SQNR."""
        return self.metric if self.metric is not None else self.sqnr_db

    def as_dict(self) -> dict:
        return {"cosine": self.cosine, "sqnr_db": _finite(self.sqnr_db), "top1_agreement": self.top1,
                "metric": self.metric}


@dataclass(frozen=True)
class Budget:
    min_cosine: float
    min_sqnr_db: float
    min_top1: float | None
    min_metric: float | None

    def met(self, s: Score) -> bool:
        return (s.cosine >= self.min_cosine and s.sqnr_db >= self.min_sqnr_db
                and (self.min_top1 is None or s.top1 is None or s.top1 >= self.min_top1)
                and (self.min_metric is None or (s.metric is not None and s.metric >= self.min_metric)))

    def as_dict(self) -> dict:
        return dataclasses.asdict(self)


def resolve_metric(metric: str | Callable | None) -> Callable | None:
    """A task metric from ``module:function`` or ``file.py:function``; it is called as
    ``fn(reference_outputs, candidate_outputs) -> float`` (lists of {output name: array}, one per sample), higher
    is better."""
    if metric is None or callable(metric):
        return metric
    import importlib
    import importlib.util
    import sys
    from pathlib import Path

    target, _, func_name = str(metric).rpartition(":")
    if not target or not func_name:
        raise EdgeqError(f"task metric {metric!r}: expected 'module:function' or 'file.py:function'")
    try:
        if target.endswith(".py"):
            spec = importlib.util.spec_from_file_location(f"edgeq_user_metric_{Path(target).stem}", target)
            module = importlib.util.module_from_spec(spec)
            spec.loader.exec_module(module)
        else:
            if "" not in sys.path:
                sys.path.insert(0, "")
            module = importlib.import_module(target)
    except Exception as exc:
        raise EdgeqError(f"task metric {metric!r}: cannot import {target!r}: {type(exc).__name__}: {exc}") from None
    fn = getattr(module, func_name, None)
    if not callable(fn):
        raise EdgeqError(f"task metric {metric!r}: {target!r} has no callable {func_name!r}")
    return fn


class Scorer:
    """Runs candidate models on fixed feeds and scores them against the float reference outputs."""

    def __init__(self, reference: onnx.ModelProto, feeds: Sequence[dict], metric: Callable | None = None):
        from edgeq.calibration.calibrate import make_session

        self.feeds = list(feeds)
        session = make_session(reference)
        self.names = [o.name for o in session.get_outputs()]
        self.reference = [dict(zip(self.names, session.run(self.names, f))) for f in self.feeds]
        self.metric = metric
        self.evaluations = 0

    def outputs(self, model: onnx.ModelProto) -> list[dict]:
        from edgeq.calibration.calibrate import make_session

        session = make_session(model)
        return [dict(zip(self.names, session.run(self.names, f))) for f in self.feeds]

    def score(self, model: onnx.ModelProto) -> Score:
        from edgeq.metrics import OutputMetrics

        outs = self.outputs(model)
        self.evaluations += 1
        metrics = {n: OutputMetrics(n) for n in self.names}
        for ref, cand in zip(self.reference, outs):
            for n in self.names:
                metrics[n].update(ref[n], cand[n])
        d = [m.as_dict() for m in metrics.values()]
        floats = [o for o, n in zip(d, self.names) if np.asarray(self.reference[0][n]).dtype.kind == "f"] or d
        top1 = [o["top1_agreement"] for o in floats if "top1_agreement" in o]
        value = float(self.metric(self.reference, outs)) if self.metric is not None else None
        return Score(cosine=min(o["cosine_mean"] for o in floats), sqnr_db=min(o["sqnr_db"] for o in floats),
                     top1=min(top1) if top1 else None, metric=value)


# ------------------------------------------------------------------------------------------------------------------
# Automatic fallback


@dataclass
class FallbackResult:
    plan: PrecisionPlan
    model: onnx.ModelProto
    met: bool
    stopped: str
    budget: Budget
    baseline: Score
    best: Score
    candidates: int
    ranking: list[dict] = field(default_factory=list)  # {"node", "op", "prior", "gain"}
    curve: list[dict] = field(default_factory=list)  # {"float_layers", "added", ...score}
    seconds: float = 0.0
    evaluations: int = 0
    base_float_nodes: frozenset = frozenset()  # kept in float before the fallback (profile/user)
    precision: str = "float"  # what the fallback gives the chosen layers: "float" or "wide" (16-bit activations)
    op_of: dict = field(default_factory=dict)  # op type of each chosen node

    def as_dict(self) -> dict:
        return {"met": self.met, "stopped": self.stopped, "budget": self.budget.as_dict(),
                "data": "calibration data (the --eval data is never used to choose layers)",
                "float_nodes": sorted(self.plan.float_nodes - self.base_float_nodes),
                "wide_nodes": sorted(self.plan.wide_nodes), "precision": self.precision,
                "candidates": self.candidates,
                "baseline": self.baseline.as_dict(), "best": self.best.as_dict(), "curve": self.curve,
                "ranking": self.ranking[:50], "seconds": round(self.seconds, 2), "evaluations": self.evaluations}


def quantize_with_plan(canonical: onnx.ModelProto, profile, stats, plan: PrecisionPlan | None,
                       template: onnx.ModelProto | None = None, moments=None) -> onnx.ModelProto:
    """Run insert_qdq and the profile's post_passes on the (named, canonical) model with the given plan."""
    from edgeq.ir import to_graph, to_model
    from edgeq.pass_base import PassContext, make_pass

    graph = to_graph(canonical)
    ctx = PassContext(profile=profile, stats=stats, precision=plan, moments=moments)
    for p in [make_pass("insert_qdq"), *post_passes(profile)]:
        p.run(graph, ctx)
    return to_model(graph, template or canonical)


def post_passes(profile, source: str = "profile") -> list:
    """The passes that run after Q/DQ insertion: the profile's ``post_passes``, plus ``to_fp16`` limited to the
    overridden nodes when overrides ask for fp16 and the profile does not convert to float16 anyway."""
    from edgeq.pass_base import make_pass

    post = [make_pass(s.name, s.options, source=source) for s in profile.post_passes]
    if any(ov.precision == "fp16" for ov in profile.overrides) and not any(p.name == "to_fp16" for p in post):
        post.append(make_pass("to_fp16", {"scope": "overrides"}))
    return post


def name_all_nodes(model: onnx.ModelProto) -> onnx.ModelProto:
    """A copy with every node named (plans refer to nodes by name; insert_qdq names them the same way)."""
    out = onnx.ModelProto()
    out.CopyFrom(model)
    seen: set[str] = set()
    for i, node in enumerate(out.graph.node):
        name = node.name or f"{node.op_type}_{i}"
        while name in seen:
            name = f"{name}_{i}"
        node.name = name
        seen.add(name)
    return out


def auto_fallback(canonical: onnx.ModelProto, profile, stats, feeds: Sequence[dict], *,
                  options: FallbackOptions = FallbackOptions(), base_plan: PrecisionPlan | None = None,
                  template: onnx.ModelProto | None = None, moments=None) -> FallbackResult:
    """Keep the fewest, most sensitive compute layers of ``canonical`` in float until the budget is met."""
    start = time.perf_counter()
    deadline = start + options.time_limit_s
    canonical = name_all_nodes(canonical)
    thr = profile.thresholds
    budget = Budget(min_cosine=options.min_cosine if options.min_cosine is not None else thr.min_cosine,
                    min_sqnr_db=options.min_sqnr_db if options.min_sqnr_db is not None else thr.min_sqnr_db,
                    min_top1=options.min_top1_agreement if options.min_top1_agreement is not None
                    else thr.min_top1_agreement, min_metric=options.min_metric)
    scorer = Scorer(canonical, feeds, resolve_metric(options.metric))
    base = base_plan or PrecisionPlan()
    wide = _fallback_precision(options, profile) == "wide"
    if wide:
        from edgeq.model_io import ensure_opset

        canonical = ensure_opset(canonical, 21, why="16-bit activations for the layers the fallback widens")
    build = lambda plan: quantize_with_plan(canonical, profile, stats, plan, template, moments)  # noqa: E731
    relax = (lambda plan, names: PrecisionPlan(plan.float_nodes, plan.wide_nodes | set(names))) if wide else \
        (lambda plan, names: plan.with_float(names))
    model = build(base)
    baseline = scorer.score(model)
    curve = [{"float_layers": 0, "added": None, **baseline.as_dict(), "met": budget.met(baseline)}]
    candidates = _candidates(canonical, model, base, profile)
    n_compute = sum(1 for n in candidates if n.op_type in CANDIDATE_OPS)
    limit = int(math.floor(options.max_float_fraction * len(candidates)))
    compute_limit = limit if wide else int(math.floor(options.max_float_fraction * n_compute))
    result = FallbackResult(plan=base, model=model, met=budget.met(baseline), stopped="", budget=budget,
                            baseline=baseline, best=baseline, candidates=len(candidates), curve=curve)
    result.base_float_nodes = base.float_nodes
    if result.met:
        result.stopped = "the fully quantized model meets the budget"
    elif not candidates or limit == 0:
        result.stopped = f"no layer may be kept in float ({len(candidates)} candidates, max_float_fraction " \
                         f"{options.max_float_fraction})"
    else:
        quick = scorer if len(scorer.feeds) <= options.rank_samples else \
            Scorer(canonical, scorer.feeds[: options.rank_samples], scorer.metric)
        quick_baseline = baseline if quick is scorer else quick.score(model)
        ranking = _rank(canonical, model, candidates, quick, build, relax, base, quick_baseline, start,
                        options.time_limit_s, limit)
        scorer.evaluations += quick.evaluations if quick is not scorer else 0
        result.ranking = ranking
        result.precision = "wide" if wide else "float"
        result.stopped = _greedy(result, ranking, scorer, build, relax, base, budget, limit, compute_limit,
                                 deadline)
    result.seconds = time.perf_counter() - start
    result.evaluations = scorer.evaluations
    log.info("auto fallback: %s; %d layer(s) in float, %.1fs, %d evaluations", result.stopped,
             len(result.plan.float_nodes - base.float_nodes), result.seconds, result.evaluations)
    return result


def _candidates(canonical: onnx.ModelProto, quantized: onnx.ModelProto, base: PrecisionPlan, profile) -> list:
    """Nodes whose quantization the fallback may undo: compute nodes that read a DequantizeLinear output, and on
    whole-graph targets also every other node whose own output is quantized (residual Adds, LayerNorms...)."""
    from edgeq.op_tables import NEVER_QUANTIZED, SCALE_SHARING

    producers = {o: n.op_type for n in quantized.graph.node for o in n.output}
    quantized_outputs = {n.input[0] for n in quantized.graph.node if n.op_type == "QuantizeLinear"}
    by_name = {n.name: n for n in quantized.graph.node}
    whole_graph = profile.placement.mode == "all"
    out = []
    for n in canonical.graph.node:
        q = by_name.get(n.name)
        if n.name in base.float_nodes or q is None or n.op_type in NEVER_QUANTIZED:
            continue
        if n.op_type in CANDIDATE_OPS:
            if any(producers.get(t) == "DequantizeLinear" for t in q.input[:2]):
                out.append(n)
        elif whole_graph and n.op_type not in SCALE_SHARING and any(o in quantized_outputs for o in q.output):
            out.append(n)
    return out


def _fallback_precision(options: "FallbackOptions", profile) -> str:
    if options.precision != "auto":
        return options.precision
    integer = profile.activations.dtype in ("int8", "uint8")
    return "wide" if profile.placement.mode == "all" and integer else "float"


def _rank(canonical, quantized, candidates, scorer: Scorer, build, relax, base, baseline: Score, start: float,
          time_limit: float, limit: int) -> list[dict]:
    """Moves to try, best first: single layers (prior from one run -- the noise each adds, as ``edgeq debug``
    measures it -- then measured gains while half the time lasts) and groups of structurally alike nodes (same op
    type feeding the same op types, e.g. every residual Add before a LayerNorm) while three quarters last. Groups
    matter when the error is spread over many layers, where no single one gains much."""
    from edgeq.debug import compare_tensors, noise_to_signal

    pairs = {}
    for n in candidates:
        pairs[n.output[0]] = n.output[0]
        if n.input and n.input[0]:
            pairs[n.input[0]] = n.input[0]
    known = {o for node in quantized.graph.node for o in node.output} | {i.name for i in quantized.graph.input}
    pairs = {k: v for k, v in pairs.items() if k in known}
    acc = compare_tensors(canonical, quantized, scorer.feeds[:2], pairs)
    ranking = []
    for n in candidates:
        out_nsr = noise_to_signal(acc[n.output[0]].sqnr_db) if n.output[0] in acc else 0.0
        in_nsr = noise_to_signal(acc[n.input[0]].sqnr_db) if n.input and n.input[0] in acc else 0.0
        ranking.append({"node": n.name, "nodes": [n.name], "op": n.op_type, "prior": out_nsr - in_nsr,
                        "gain": None})
    ranking.sort(key=lambda r: -r["prior"])
    prior = {r["node"]: r["prior"] for r in ranking}
    for until, moves in ((0.5, ranking), (0.75, _groups(canonical, candidates, prior, limit))):
        for r in moves:
            if time.perf_counter() > start + until * time_limit:
                break
            r["gain"] = scorer.score(build(relax(base, r["nodes"]))).key() - baseline.key()
        if moves is not ranking:
            ranking += [r for r in moves if r["gain"] is not None]
    measured = sorted((r for r in ranking if r["gain"] is not None), key=lambda r: -r["gain"])
    return measured + [r for r in ranking if r["gain"] is None]


def _groups(canonical: onnx.ModelProto, candidates, prior: dict, limit: int) -> list[dict]:
    """Candidates grouped by (op type, op types reading their outputs); groups of 2..limit nodes, by total prior."""
    readers: dict[str, set] = {}
    for n in canonical.graph.node:
        for t in n.input:
            readers.setdefault(t, set()).add(n.op_type)
    groups: dict[tuple, list[str]] = {}
    for n in candidates:
        key = (n.op_type, tuple(sorted(set().union(*(readers.get(o, set()) for o in n.output)))))
        groups.setdefault(key, []).append(n.name)
    out = [{"node": f"{len(names)} x {op} -> {'/'.join(into) or 'output'}", "nodes": names, "op": op,
            "prior": sum(prior.get(x, 0.0) for x in names), "gain": None}
           for (op, into), names in groups.items() if 2 <= len(names) <= limit]
    return sorted(out, key=lambda r: -r["prior"])


def _greedy(result: FallbackResult, ranking, scorer, build, relax, base, budget: Budget, limit: int,
            compute_limit: int, deadline: float) -> str:
    """Take moves in ranking order within the limits; keep a move only if the score improves."""
    chosen: list[str] = []
    best_key = result.best.key()
    for r in ranking:
        if time.perf_counter() > deadline:
            return "time limit reached"
        if r["gain"] is not None and r["gain"] <= 0:
            return "no remaining move improves fidelity"
        new = [x for x in r["nodes"] if x not in chosen]
        ops = {x: r["op"] for x in r["nodes"]}
        compute = sum(1 for x in chosen if result.op_of.get(x) in CANDIDATE_OPS)
        add_compute = sum(1 for x in new if ops[x] in CANDIDATE_OPS)
        if not new or len(chosen) + len(new) > limit or compute + add_compute > compute_limit:
            continue
        plan = relax(base, chosen + new)
        model = build(plan)
        score = scorer.score(model)
        met = budget.met(score)
        keep = met or score.key() > best_key
        result.curve.append({"float_layers": len(chosen) + len(new), "added": r["node"], **score.as_dict(),
                             "met": met, "kept": keep})
        if keep:
            chosen += new
            result.op_of.update(ops)
            best_key = score.key()
            result.plan, result.model, result.best, result.met = plan, model, score, met
        if met:
            return f"budget met with {len(chosen)} layer(s) changed"
        if len(chosen) >= limit:
            break
    return f"limit of {limit} layer(s) ({compute_limit} compute) reached without meeting the budget" \
        if len(chosen) >= limit else "no remaining move fits the limits or improves fidelity"


def _finite(v: float) -> float | None:
    return v if math.isfinite(v) else None


def fallback_for_pipeline(canonical: onnx.ModelProto, profile, stats, calib_data, *,
                          fallback: "bool | FallbackOptions", time_limit_s: float | None = None,
                          base_plan: PrecisionPlan | None = None, template: onnx.ModelProto | None = None,
                          moments=None) -> tuple[onnx.ModelProto, FallbackResult]:
    """What ``edgeq.api.quantize(fallback=...)`` runs: the named canonical model and the fallback result."""
    import itertools

    options = fallback if isinstance(fallback, FallbackOptions) else FallbackOptions()
    if time_limit_s is not None:
        options = dataclasses.replace(options, time_limit_s=time_limit_s)
    named = name_all_nodes(canonical)
    if _fallback_precision(options, profile) == "wide":
        from edgeq.model_io import ensure_opset

        named = ensure_opset(named, 21, why="16-bit activations for the layers the fallback widens")
    feeds = list(itertools.islice(iter(calib_data), options.max_samples))
    if not feeds:
        raise EdgeqError("automatic fallback needs calibration samples to score candidates")
    return named, auto_fallback(named, profile, stats, feeds, options=options, base_plan=base_plan,
                                template=template, moments=moments)
