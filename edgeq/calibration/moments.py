"""First and second moments of the inputs of weighted layers, for error-compensating weight rounding (GPTQ-style)
and bias correction.

For a layer ``y = W x`` the output error of a quantized weight ``Q`` is ``(Q - W) H (Q - W)ᵀ`` with
``H = Σ x xᵀ`` over the calibration rows; :func:`edgeq.rounding.gptq_round` chooses integer weights that minimise
it; the mean input ``Σ x / n`` gives the mean output shift ``(Q - W) x̄`` that
:func:`edgeq.rounding.bias_shift` takes out of the bias. This module measures both per layer in a streaming pass over the calibration data (float model, ONNX
Runtime CPU): one row per token for MatMul/Gemm, one unfolded receptive field per output position (and group) for
Conv. Rows are subsampled per sample to bound the cost; the matrices are float64 sums with the row count kept.

Layers whose reduction length exceeds ``max_reduction`` or that would exceed the memory budget are left out
(their weights are rounded to nearest) and reported in :attr:`MomentSet.skipped`.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable

import numpy as np
import onnx
from onnx import helper

from edgeq.op_tables import conv_pads

log = logging.getLogger(__name__)


@dataclass
class LayerMoments:
    """``matrix[g]`` is ``Σ x xᵀ`` over the rows seen by group ``g`` (one group except for grouped Conv);
    ``holdout`` is the part of that sum from every second calibration sample, so that a rounding fitted on the
    other samples can be checked on data it did not see."""

    node: str
    op: str
    matrix: np.ndarray  # (groups, K, K) float64
    rows: int = 0
    holdout: np.ndarray | None = None  # (groups, K, K), included in matrix
    holdout_rows: int = 0
    total: np.ndarray | None = None  # (groups, K): Σ x, for the mean input (bias correction)
    holdout_total: np.ndarray | None = None  # (groups, K), included in total


@dataclass
class MomentSet:
    layers: dict[str, LayerMoments] = field(default_factory=dict)
    skipped: dict[str, str] = field(default_factory=dict)  # node name -> reason
    samples: int = 0
    # rounding results by (node, weight layout): insert_qdq reruns per fallback trial, the rounding need not
    rounded: dict[tuple, Any] = field(default_factory=dict)

    def get(self, node_name: str) -> LayerMoments | None:
        m = self.layers.get(node_name)
        return m if m is not None and m.rows > 0 else None


@dataclass(frozen=True)
class _Layer:
    node: onnx.NodeProto
    groups: int
    reduction: int


def _attrs(node: onnx.NodeProto) -> dict:
    return {a.name: helper.get_attribute_value(a) for a in node.attribute}


def _weighted_layers(model: onnx.ModelProto, max_reduction: int, budget_bytes: int,
                     skipped: dict[str, str]) -> list[_Layer]:
    shapes = {i.name: tuple(i.dims) for i in model.graph.initializer if i.data_type == onnx.TensorProto.FLOAT}
    uses: dict[str, int] = {}
    for node in model.graph.node:
        for name in node.input:
            uses[name] = uses.get(name, 0) + 1
    layers, used = [], 0
    for node in model.graph.node:
        if node.op_type not in ("Conv", "MatMul", "Gemm") or len(node.input) < 2 or node.input[1] not in shapes:
            continue
        if node.input[0] in shapes:
            continue  # constant input: nothing to measure
        w, attrs = shapes[node.input[1]], _attrs(node)
        if uses.get(node.input[1], 0) != 1:
            skipped[node.name] = "weight shared by several nodes"
            continue
        if node.op_type == "Conv":
            if len(w) not in (3, 4):
                skipped[node.name] = f"{len(w) - 2}-D convolution"
                continue
            groups, k = int(attrs.get("group", 1)), int(np.prod(w[1:]))
        elif len(w) != 2 or (node.op_type == "Gemm" and attrs.get("transA", 0)):
            skipped[node.name] = "weight is not a 2-D matrix on the right"
            continue
        else:
            groups, k = 1, w[1] if node.op_type == "Gemm" and attrs.get("transB", 0) else w[0]
        if k > max_reduction:
            skipped[node.name] = f"reduction length {k} > {max_reduction}"
            continue
        cost = 2 * groups * k * k * 8  # the sum and its held-out part
        if used + cost > budget_bytes:
            skipped[node.name] = "input moments exceed the memory budget"
            continue
        used += cost
        layers.append(_Layer(node, groups, int(k)))
    return layers


def conv_rows(x: np.ndarray, attrs: dict, weight_shape: tuple[int, ...]) -> np.ndarray:
    """Unfolded Conv input: (groups, positions, K) with K ordered like ``weight[o].ravel()`` (channel, kernel)."""
    kernel = tuple(weight_shape[2:])
    n_sp = len(kernel)
    strides = list(attrs.get("strides", [1] * n_sp))
    dilations = list(attrs.get("dilations", [1] * n_sp))
    auto_pad = attrs.get("auto_pad", "NOTSET")
    pads = conv_pads(auto_pad.decode() if isinstance(auto_pad, bytes) else auto_pad, attrs.get("pads"),
                     x.shape[2:], kernel, strides, dilations)
    if n_sp == 1:  # a 1-D convolution as 2-D with height 1
        x, kernel = x[:, :, None, :], (1, *kernel)
        strides, dilations, pads = [1, *strides], [1, *dilations], [(0, 0), *pads]
    x = np.pad(x, ((0, 0), (0, 0), *pads))
    n, c, h, w = x.shape
    oh = (h - (kernel[0] - 1) * dilations[0] - 1) // strides[0] + 1
    ow = (w - (kernel[1] - 1) * dilations[1] - 1) // strides[1] + 1
    cols = np.empty((n, c, kernel[0], kernel[1], oh, ow), np.float32)
    for i in range(kernel[0]):
        for j in range(kernel[1]):
            hi, wj = i * dilations[0], j * dilations[1]
            cols[:, :, i, j] = x[:, :, hi:hi + strides[0] * (oh - 1) + 1:strides[0],
                                 wj:wj + strides[1] * (ow - 1) + 1:strides[1]]
    groups = int(attrs.get("group", 1))
    k = c // groups * kernel[0] * kernel[1]
    return cols.reshape(n, groups, k, oh * ow).transpose(1, 0, 3, 2).reshape(groups, -1, k)


def _rows(layer: _Layer, x: np.ndarray, weight_shape) -> np.ndarray:
    if layer.node.op_type == "Conv":
        return conv_rows(np.asarray(x, np.float32), _attrs(layer.node), weight_shape)
    return np.asarray(x, np.float32).reshape(1, -1, layer.reduction)


def collect_moments(model: onnx.ModelProto, data: Iterable[dict[str, np.ndarray]], *,
                    rows_per_sample: int = 4096, max_reduction: int = 4096, budget_bytes: int = 1 << 30,
                    seed: int = 0, progress: Callable[[int, int | None], None] | None = None,
                    total: int | None = None) -> MomentSet:
    """Measure ``Σ x xᵀ`` of every eligible Conv/MatMul/Gemm input of ``model`` over ``data``."""
    from edgeq.calibration.segments import run_segmented

    result = MomentSet()
    layers = _weighted_layers(model, max_reduction, budget_bytes, result.skipped)
    if not layers:
        return result
    wshape = {i.name: tuple(i.dims) for i in model.graph.initializer}
    inputs = sorted({layer.node.input[0] for layer in layers})
    for layer in layers:
        shape = (layer.groups, layer.reduction, layer.reduction)
        result.layers[layer.node.name] = LayerMoments(layer.node.name, layer.node.op_type, np.zeros(shape),
                                                      holdout=np.zeros(shape), total=np.zeros(shape[:2]),
                                                      holdout_total=np.zeros(shape[:2]))
    rng = np.random.default_rng(seed)

    def accumulate(sample: int, values: dict[str, np.ndarray]) -> None:
        for layer in layers:  # in node order, whatever segment the values come from
            if layer.node.input[0] not in values:
                continue
            rows = _rows(layer, values[layer.node.input[0]], wshape[layer.node.input[1]])
            if rows.shape[1] > rows_per_sample:
                rows = rows[:, rng.choice(rows.shape[1], rows_per_sample, replace=False)]
            if not np.all(np.isfinite(rows)):
                continue
            rows = rows.astype(np.float64)  # float32 sums overflow on inputs near its range
            acc = result.layers[layer.node.name]
            product = np.matmul(rows.transpose(0, 2, 1), rows)
            first = rows.sum(axis=1)
            acc.matrix += product
            acc.total += first
            acc.rows += rows.shape[1]
            if sample % 2:
                acc.holdout += product
                acc.holdout_total += first
                acc.holdout_rows += rows.shape[1]

    result.samples = run_segmented(model, data, inputs, accumulate, progress=progress, total=total)
    log.info("measured input moments of %d layers on %d samples", len(layers), result.samples)
    return result

