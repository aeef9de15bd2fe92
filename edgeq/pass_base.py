"""The graph-pass contract and the runner that sequences passes.

A pass is a class with keyword-only, typed options (a frozen dataclass ``Options``) and a ``run(graph, ctx)`` method
returning a :class:`PassResult`. Passes never run models: calibration results reach them through the
:class:`PassContext`. The :class:`PassManager` (not the pass) times each pass, optionally dumps the graph after it,
checks the graph, and turns a failure into a :class:`PassError` naming the pass and those that ran before it.
"""

from __future__ import annotations

import dataclasses
import importlib
import logging
import time
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import onnx_graphsurgeon as gs

from edgeq.errors import EdgeqError, OutputError, PassError, ProfileError

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Skip:
    """A candidate a pass did not rewrite, and why (shown in reports)."""

    pass_name: str
    target: str
    reason: str

    def __str__(self) -> str:
        return f"{self.target}: {self.reason}"


@dataclass
class PassResult:
    changed: bool = False
    rewrites: int = 0
    skipped: list[Skip] = field(default_factory=list)
    notes: dict[str, Any] = field(default_factory=dict)


@dataclass
class PassContext:
    """What passes may read besides the graph: the profile, calibration statistics and the overrides."""

    profile: Any = None  # edgeq.profiles.TargetProfile
    stats: Any = None  # edgeq.calibration.stats.CalibrationStats
    precision: Any = None  # edgeq.precision.PrecisionPlan
    moments: Any = None  # edgeq.calibration.moments.MomentSet (weights.rounding: gptq)
    spill: Any = None  # edgeq.large_model.WeightSpill: large models' new weights go to disk as they are made
    extra: dict[str, Any] = field(default_factory=dict)


class GraphPass:
    """Base class: subclasses set ``name`` and ``Options`` and implement ``run``."""

    name: ClassVar[str] = ""

    @dataclass(frozen=True, kw_only=True)
    class Options:
        pass

    def __init__(self, options: "GraphPass.Options | None" = None):
        self.options = options if options is not None else self.Options()

    def stats_tensors(self, model, profile=None) -> list[str] | None:
        """With ``needs_stats``: the tensors of ``model`` (an ``onnx.ModelProto``) whose calibration statistics the
        pass reads under ``profile``; None means all of them, an empty list that calibration before the pass can be
        skipped."""
        return None

    def channel_tensors(self, model, profile) -> dict[str, int]:
        """With ``needs_stats``: tensors whose per-channel statistics the pass reads beyond the inputs of
        MatMul/Gemm/Conv (which are always gathered), mapped to their channel axis."""
        return {}

    def run(self, graph: gs.Graph, ctx: PassContext) -> PassResult:  # pragma: no cover - abstract
        raise NotImplementedError

    def skip(self, result: PassResult, target: str, reason: str) -> None:
        result.skipped.append(Skip(self.name, target, reason))


# name -> module in edgeq.passes; imported lazily so unused passes cost nothing.
PASS_MODULES = {
    "infer_shapes": "shape_inference",
    "fold_constants": "constant_folding",
    "fold_batchnorm": "fold_batchnorm",
    "remove_identity": "remove_identity",
    "fold_pad": "fold_pad",
    "insert_qdq": "insert_qdq",
    "smoothquant": "smoothquant",
    "equalize_cross_layer": "cross_layer_equalization",
    "fold_channel_scale": "fold_channel_scale",
    "clamp_mask_constants": "clamp_mask_constants",
    "to_matmulnbits": "matmul_nbits",
    "to_fp16": "convert_fp16",
    "quantize_embeddings": "quantize_embeddings",
    "defer_softmax_normalization": "defer_softmax_normalization",
    "pin_matmul_bias": "pin_matmul_bias",
    "equalize_conv_outputs": "equalize_conv_outputs",
}


def pass_class(name: str) -> type[GraphPass]:
    if name not in PASS_MODULES:
        raise ProfileError(f"unknown pass {name!r}; valid passes: {', '.join(sorted(PASS_MODULES))}")
    module_name = f"edgeq.passes.{PASS_MODULES[name]}"
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as exc:
        if exc.name != module_name:
            raise
        raise ProfileError(f"pass {name!r} is not available in this edgeq installation ({module_name} is "
                           f"missing)") from None
    for obj in vars(module).values():
        if isinstance(obj, type) and issubclass(obj, GraphPass) and obj.name == name:
            return obj
    raise RuntimeError(f"module edgeq.passes.{PASS_MODULES[name]} defines no pass named {name!r}")


def make_pass(name: str, options: dict[str, Any] | None = None, *, source: str = "profile") -> GraphPass:
    """Instantiate a pass from a name and an options mapping, rejecting unknown or mistyped options."""
    cls = pass_class(name)
    opts = dict(options or {})
    fields = {f.name: f for f in dataclasses.fields(cls.Options)}
    unknown = sorted(set(opts) - set(fields))
    if unknown:
        raise ProfileError(
            f"{source}: unknown option(s) {', '.join(unknown)} for pass {name!r}; valid: {', '.join(sorted(fields)) or 'none'}"
        )
    from edgeq.profiles import check_value

    hints = typing.get_type_hints(cls.Options)
    opts = {k: check_value(hints[k], v, source, f"passes.{name}.options.{k}") for k, v in opts.items()}
    try:
        return cls(cls.Options(**opts))
    except (TypeError, ValueError) as exc:
        raise ProfileError(f"{source}: bad options for pass {name!r}: {exc}") from None


@dataclass
class PassRecord:
    name: str
    seconds: float
    changed: bool
    rewrites: int
    skipped: list[Skip]
    notes: dict[str, Any]


class PassManager:
    """Runs passes in order with timing, optional dumps and a structural check after each."""

    def __init__(self, *, dump_dir: Path | None = None, check: bool = True):
        self.dump_dir = Path(dump_dir) if dump_dir else None
        self.check = check
        self.records: list[PassRecord] = []

    def run(self, graph: gs.Graph, passes: list[GraphPass], ctx: PassContext) -> gs.Graph:
        for i, p in enumerate(passes):
            start = time.perf_counter()
            try:
                result = p.run(graph, ctx)
                graph.cleanup(remove_unused_graph_inputs=False).toposort()
                if self.check:
                    self._check(graph)
            except EdgeqError as exc:
                raise PassError(f"pass {p.name!r} failed{self._after()}: {exc}") from exc
            except Exception as exc:
                raise RuntimeError(f"bug in pass {p.name!r}{self._after()}: {type(exc).__name__}: {exc}") from exc
            seconds = time.perf_counter() - start
            self.records.append(
                PassRecord(p.name, seconds, result.changed, result.rewrites, result.skipped, result.notes)
            )
            log.info("pass %-22s %6.2fs changed=%s rewrites=%d skipped=%d", p.name, seconds, result.changed,
                     result.rewrites, len(result.skipped))
            if self.dump_dir is not None:
                self._dump(graph, i, p.name)
        return graph

    def _after(self) -> str:
        if not self.records:
            return " (first pass)"
        return " (after " + ", ".join(r.name for r in self.records) + ")"

    @staticmethod
    def _check(graph: gs.Graph) -> None:
        produced: set[str] = {t.name for t in graph.inputs} | {n for n, t in graph.tensors().items()
                                                                if isinstance(t, gs.Constant)}
        for node in graph.nodes:  # graph is topologically sorted
            for t in node.inputs:
                if t.name and not isinstance(t, gs.Constant) and t.name not in produced and not t.inputs:
                    raise RuntimeError(f"node {node.name} reads {t.name!r}, which nothing produces")
            produced.update(t.name for t in node.outputs)

    def _dump(self, graph: gs.Graph, index: int, name: str) -> None:
        import onnx

        try:
            self.dump_dir.mkdir(parents=True, exist_ok=True)
            onnx.save(gs.export_onnx(graph.copy(), do_type_check=False), str(self.dump_dir / f"{index:02d}_{name}.onnx"))
        except OSError as exc:
            raise OutputError(f"cannot write the graph dump to {self.dump_dir}: {exc.strerror or exc}") from None
