"""Which execution provider runs each node of a model: the result type of ``qnn.node_placement``.

ONNX Runtime records, per session, the subgraphs it gave each execution provider and the nodes in them
(``session.record_ep_graph_assignment_info``). Those are the nodes *after* ORT's own rewrites, so they are mapped
back to the model's nodes here:

- QNN needs NHWC, so ORT's layout transformer replaces a Conv ``c1`` by ``c1_token_<n>`` (domain
  ``com.ms.internal.nhwc``) and adds Transposes and Q/DQ copies around it; a DequantizeLinear ``d`` feeding
  several QDQ groups is copied once per consumer (``d/duplicated``). Renamed nodes are mapped back to their
  source; nodes ORT made up are reported as ``inserted``.
- Basic graph optimisations run before partitioning and may delete a node (an Identity, a Dropout), and the
  layout transformer may replace a Q/DQ by a fresh, differently named one. Such model nodes are reported as
  ``rewritten``: they do not run under their own name, and whatever replaced them is among ``inserted``.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

QNN_EP = "QNNExecutionProvider"
QDQ_OPS = frozenset({"QuantizeLinear", "DequantizeLinear"})

_RENAMED = re.compile(r"^(?P<base>.+?)(?:_token_\d+|/duplicated)$")


@dataclass(frozen=True)
class NodeAssignment:
    """One node and the execution provider that runs it (``None``: ORT removed or replaced it first)."""

    name: str
    op_type: str
    ep: str | None
    #: Why the QNN EP refused the node, from its verbose log (empty when on QNN or unknown).
    reason: str = ""

    @property
    def on_qnn(self) -> bool:
        return self.ep == QNN_EP

    @property
    def is_qdq(self) -> bool:
        return self.op_type in QDQ_OPS

    def describe(self) -> str:
        label = f"{self.name or '<unnamed>'} ({self.op_type})"
        return f"{label}: {self.reason}" if self.reason else label


@dataclass(frozen=True)
class QnnPlacement:
    """Where each node of ``model_path`` runs when the QNN EP (with CPU fallback allowed) partitions it."""

    model_path: Path
    #: The model's own nodes, in graph order.
    nodes: tuple[NodeAssignment, ...]
    #: Nodes ORT added while partitioning (layout Transposes, duplicated Q/DQ), with where they run.
    inserted: tuple[NodeAssignment, ...]
    #: Number of subgraphs handed to QNN (each becomes one QNN graph / EPContext node).
    qnn_partitions: int

    @property
    def on_qnn(self) -> tuple[NodeAssignment, ...]:
        return tuple(node for node in self.nodes if node.on_qnn)

    @property
    def not_on_qnn(self) -> tuple[NodeAssignment, ...]:
        """Model nodes that would run on another EP (the CPU), Q/DQ included."""
        return tuple(node for node in self.nodes if node.ep is not None and not node.on_qnn)

    @property
    def rewritten(self) -> tuple[NodeAssignment, ...]:
        """Model nodes ORT removed or replaced before partitioning (see the module docstring)."""
        return tuple(node for node in self.nodes if node.ep is None)

    @property
    def fully_on_qnn(self) -> bool:
        return not self.not_on_qnn and all(node.on_qnn for node in self.inserted)

    def to_dict(self) -> dict:
        def rows(nodes: Iterable[NodeAssignment]) -> list[dict]:
            return [{"name": n.name, "op_type": n.op_type, "ep": n.ep, "reason": n.reason} for n in nodes]

        return {
            "model": str(self.model_path),
            "fully_on_qnn": self.fully_on_qnn,
            "qnn_partitions": self.qnn_partitions,
            "on_qnn": rows(self.on_qnn),
            "not_on_qnn": rows(self.not_on_qnn),
            "rewritten": rows(self.rewritten),
            "inserted": rows(self.inserted),
        }


def original_name(name: str, model_nodes: dict[str, str]) -> str | None:
    """The model node an assigned node came from, or ``None`` if ORT created it."""
    while name not in model_nodes:
        match = _RENAMED.match(name)
        if match is None:
            return None
        name = match["base"]
    return name


def build_placement(
    model_path: Path,
    model_nodes: Sequence[tuple[str, str]],
    assigned: Iterable[tuple[str, str, str]],
    qnn_partitions: int,
    rejections: dict[str, str] | None = None,
) -> QnnPlacement:
    """Map ORT's ``(name, op_type, ep)`` assignments back onto ``model_nodes`` (``(name, op_type)`` in order)."""
    by_name = {name: op_type for name, op_type in model_nodes}
    reasons = {original_name(name, by_name) or name: why for name, why in (rejections or {}).items()}
    ep_of: dict[str, str] = {}
    inserted: list[NodeAssignment] = []
    for name, op_type, ep in assigned:
        source = original_name(name, by_name)
        if source is None:
            inserted.append(NodeAssignment(name, op_type, ep))
        elif ep_of.get(source, QNN_EP) == QNN_EP:  # a node ORT split is off QNN if any piece is
            ep_of[source] = ep
    nodes = tuple(
        NodeAssignment(name, op_type, ep_of.get(name), "" if ep_of.get(name) == QNN_EP else reasons.get(name, ""))
        for name, op_type in model_nodes
    )
    return QnnPlacement(Path(model_path), nodes, tuple(inserted), qnn_partitions)


def offending_nodes_message(placement: QnnPlacement) -> str:
    """Describe the nodes QNN does not take, compute nodes first and their Q/DQ neighbours summarised."""
    off = placement.not_on_qnn
    compute = [node for node in off if not node.is_qdq]
    qdq = [node for node in off if node.is_qdq]
    lines = [f"  {node.describe()}" for node in (compute or qdq)]
    if compute and qdq:
        names = ", ".join(node.name for node in qdq[:8]) + (", ..." if len(qdq) > 8 else "")
        lines.append(f"  + {len(qdq)} Q/DQ node(s) of the same groups: {names}")
    stray = [node for node in placement.inserted if not node.on_qnn]
    if stray:
        lines.append(f"  + {len(stray)} node(s) ORT inserted: {', '.join(n.describe() for n in stray[:4])}")
    return "\n".join(lines)
