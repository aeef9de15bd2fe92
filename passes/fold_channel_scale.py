"""Fold standalone per-channel ``Mul``/``Div`` by a constant into an adjacent Conv/MatMul/Gemm weight.

Matches: ``Mul(x, c)`` or ``Div(x, c)`` where ``c`` is a constant that is a scalar or varies only along the channel
axis of ``x`` (axis 1 for Conv activations, the last axis for MatMul/Gemm).
Rewrites, in order of preference:
* into the producer: ``Conv|MatMul|Gemm -> Mul`` becomes the producer with its output channels (weight and bias)
  multiplied by ``c``, when the producer's output feeds only the Mul;
* into the consumers: ``Mul -> Conv|MatMul|Gemm`` becomes the consumers with their input channels multiplied by
  ``c``, when every consumer of the Mul's output is such a node reading it as its data input (zero padding stays
  zero, so Conv padding is no obstacle; grouped and depthwise convolutions are handled).
Preconditions: constant weights (and biases); shapes known enough to tell the channel axis.
Skips (with a reason): non-constant or non-per-channel factor, a zero factor in a Div, a shared producer output,
Gemm with ``transA``, consumers that are not linear. Numerically exact up to float rounding (~1e-6 relative).
Targets: all (removes float-only elementwise ops and lets one weight scale cover the layer). The helpers below are
shared with ``smoothquant`` and ``equalize_cross_layer``.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx_graphsurgeon as gs

from edgeq.ir import const_value, has_const_value, unique_name
from edgeq.pass_base import GraphPass, PassContext, PassResult

LINEAR_OPS = ("Conv", "MatMul", "Gemm")


# -- weight layout helpers (shared) -------------------------------------------------------------------------------
def weight_of(node: gs.Node) -> np.ndarray | None:
    """The constant weight of a Conv/MatMul/Gemm reading its activation at input 0, else None."""
    if len(node.inputs) < 2 or node.op not in LINEAR_OPS:
        return None
    if node.op == "Gemm" and int(node.attrs.get("transA", 0)):
        return None
    if has_const_value(node.inputs[0]):
        return None
    w = const_value(node.inputs[1])
    if w is None or w.dtype.kind != "f":
        return None
    if node.op == "MatMul" and w.ndim != 2:
        return None
    return w


def in_channels(node: gs.Node, w: np.ndarray) -> int:
    if node.op == "Conv":
        return w.shape[1] * int(node.attrs.get("group", 1))
    if node.op == "Gemm":
        return w.shape[1] if int(node.attrs.get("transB", 0)) else w.shape[0]
    return w.shape[0]


def out_channels(node: gs.Node, w: np.ndarray) -> int:
    if node.op == "Gemm":
        return w.shape[0] if int(node.attrs.get("transB", 0)) else w.shape[1]
    return w.shape[0] if node.op == "Conv" else w.shape[1]


def input_scale_tensor(node: gs.Node, w: np.ndarray, s: np.ndarray) -> np.ndarray:
    """Broadcastable factor that multiplies the weight entries reading input channel ``j`` by ``s[j]``."""
    if node.op == "Conv":
        group = int(node.attrs.get("group", 1))
        cout, cin_g = w.shape[0], w.shape[1]
        groups_of_out = np.arange(cout) // (cout // group)
        full = s[groups_of_out[:, None] * cin_g + np.arange(cin_g)[None, :]]
        return full.reshape(cout, cin_g, *([1] * (w.ndim - 2)))
    if node.op == "Gemm" and int(node.attrs.get("transB", 0)):
        return s.reshape(1, -1)
    return s.reshape(-1, 1)


def output_scale_tensor(node: gs.Node, w: np.ndarray, s: np.ndarray) -> np.ndarray:
    if node.op == "Conv":
        return s.reshape(-1, *([1] * (w.ndim - 1)))
    if node.op == "Gemm" and int(node.attrs.get("transB", 0)):
        return s.reshape(-1, 1)
    return s.reshape(1, -1)


def input_channel_absmax(node: gs.Node, w: np.ndarray) -> np.ndarray:
    """max |W| over every weight entry that reads input channel j (length: input channels)."""
    a = np.abs(w.astype(np.float64))
    if node.op == "Conv":
        group = int(node.attrs.get("group", 1))
        cout, cin_g = w.shape[0], w.shape[1]
        per = a.reshape(group, cout // group, cin_g, -1).max(axis=(1, 3))  # [group, cin_g]
        return per.reshape(-1)
    if node.op == "Gemm" and int(node.attrs.get("transB", 0)):
        return a.max(axis=0)
    return a.max(axis=1)


def output_channel_absmax(node: gs.Node, w: np.ndarray) -> np.ndarray:
    a = np.abs(w.astype(np.float64))
    if node.op == "Conv":
        return a.reshape(a.shape[0], -1).max(axis=1)
    if node.op == "Gemm" and int(node.attrs.get("transB", 0)):
        return a.max(axis=1)
    return a.max(axis=0)


def set_const(node: gs.Node, idx: int, value: np.ndarray, graph: gs.Graph, suffix: str) -> None:
    """Replace input ``idx`` with a fresh constant (never mutate one that other nodes may share)."""
    base = node.inputs[idx].name or f"{node.name}/input{idx}"
    node.inputs[idx] = gs.Constant(unique_name(graph, f"{base}/{suffix}"), np.ascontiguousarray(value))


def scale_inputs(node: gs.Node, s: np.ndarray, graph: gs.Graph, suffix: str) -> None:
    w = weight_of(node)
    new = w.astype(np.float64) * input_scale_tensor(node, w, s.astype(np.float64))
    set_const(node, 1, new.astype(w.dtype), graph, suffix)


def scale_outputs(node: gs.Node, s: np.ndarray, graph: gs.Graph, suffix: str) -> bool:
    """Multiply output channels (weight and bias) by ``s``; False (and nothing changed) if the bias isn't constant."""
    w = weight_of(node)
    bias_idx = 2 if len(node.inputs) > 2 and node.op in ("Conv", "Gemm") else None
    b = const_value(node.inputs[bias_idx]) if bias_idx is not None else None
    if bias_idx is not None and b is None:
        return False
    s64 = s.astype(np.float64)
    if b is not None:
        if b.size not in (1, s.size):
            return False
        set_const(node, bias_idx, (np.broadcast_to(b.reshape(-1), s.shape) * s64).astype(b.dtype).reshape(
            b.shape if b.size == s.size else s.shape), graph, suffix)
    set_const(node, 1, (w.astype(np.float64) * output_scale_tensor(node, w, s64)).astype(w.dtype), graph, suffix)
    return True


def channel_vector(c: np.ndarray, rank: int | None, axis: int, channels: int) -> np.ndarray | None:
    """``c`` as a length-``channels`` vector if it broadcasts against a rank-``rank`` tensor only along ``axis``."""
    c = np.asarray(c)
    if c.size == 1 and (rank is None or c.ndim <= rank):
        return np.full(channels, float(c.reshape(-1)[0]))
    if rank is None:
        if axis != -1 or c.ndim > 1:
            return None
        rank = 1
    if c.ndim > rank:
        return None
    shape = (1,) * (rank - c.ndim) + tuple(c.shape)
    ax = axis % rank
    if any(d != 1 for i, d in enumerate(shape) if i != ax) or shape[ax] not in (1, channels):
        return None
    return np.broadcast_to(c.reshape(-1).astype(np.float64), (channels,)).copy()


def tensor_rank(t: gs.Tensor) -> int | None:
    return len(t.shape) if getattr(t, "shape", None) is not None else None


class FoldChannelScalePass(GraphPass):
    name = "fold_channel_scale"

    @dataclass(frozen=True, kw_only=True)
    class Options:
        into_producer: bool = True
        into_consumers: bool = True

    def run(self, graph: gs.Graph, ctx: PassContext) -> PassResult:
        result = PassResult()
        for node in [n for n in graph.nodes if n.op in ("Mul", "Div")]:
            label = f"{node.op} {node.name}"
            split = self._split(node)
            if split is None:
                continue  # not a multiply by a constant: not a candidate
            x, c = split
            if node.op == "Div":
                if np.any(c == 0):
                    self.skip(result, label, "divides by a constant containing zero")
                    continue
                c = 1.0 / c.astype(np.float64)
            reason = self._fold(graph, node, x, c)
            if reason:
                self.skip(result, label, reason)
            else:
                result.rewrites += 1
        result.changed = result.rewrites > 0
        return result

    @staticmethod
    def _split(node: gs.Node) -> tuple[gs.Tensor, np.ndarray] | None:
        a, b = node.inputs[0], node.inputs[1]
        cb = const_value(b)
        if cb is not None and not has_const_value(a) and cb.dtype.kind == "f":
            return a, cb
        ca = const_value(a)
        if node.op == "Mul" and ca is not None and cb is None and ca.dtype.kind == "f":
            return b, ca
        return None

    def _fold(self, graph: gs.Graph, node: gs.Node, x: gs.Tensor, c: np.ndarray) -> str | None:
        y = node.outputs[0]
        reasons = []
        prod = x.inputs[0] if x.inputs else None
        if self.options.into_producer and prod is not None and prod.op in LINEAR_OPS and weight_of(prod) is not None:
            w = weight_of(prod)
            axis = 1 if prod.op == "Conv" else -1
            vec = channel_vector(c, w.ndim if prod.op == "Conv" else tensor_rank(x), axis, out_channels(prod, w))
            if len(x.outputs) != 1 or x in graph.outputs:
                reasons.append(f"output of {prod.op} {prod.name} is also used elsewhere")
            elif vec is None:
                reasons.append(f"factor of shape {list(c.shape)} is not per output channel of {prod.op} {prod.name}")
            elif (y.dtype is not None and x.dtype is not None and y.dtype != x.dtype) or \
                    (tensor_rank(y) is not None and tensor_rank(x) is not None and tensor_rank(y) != tensor_rank(x)):
                reasons.append("the multiply broadcasts to another shape or dtype")
            elif scale_outputs(prod, vec, graph, "channel_scaled"):
                node.inputs.clear()
                node.outputs.clear()
                prod.outputs[0] = y
                return None
            else:
                reasons.append(f"bias of {prod.op} {prod.name} is not constant")
        if self.options.into_consumers:
            reason = self._into_consumers(graph, node, x, y, c)
            if reason is None:
                return None
            reasons.append(reason)
        return "; ".join(reasons) or "no adjacent Conv/MatMul/Gemm to fold into"

    def _into_consumers(self, graph, node, x, y, c) -> str | None:
        users = list(y.outputs)
        if not users or y in graph.outputs:
            return "result is a graph output or unused"
        vecs = []
        for u in users:
            w = weight_of(u)
            if w is None or u.inputs[0] is not y or any(t is y for t in u.inputs[1:]):
                return f"consumer {u.op} {u.name} is not a Conv/MatMul/Gemm with a constant weight"
            rank = w.ndim if u.op == "Conv" else tensor_rank(y)
            vec = channel_vector(c, rank, 1 if u.op == "Conv" else -1, in_channels(u, w))
            if vec is None:
                return f"factor of shape {list(c.shape)} is not per input channel of {u.op} {u.name}"
            if tensor_rank(x) is not None and tensor_rank(y) is not None and tensor_rank(x) != tensor_rank(y):
                return "the multiply broadcasts to another shape"
            vecs.append(vec)
        for u, vec in zip(users, vecs):
            scale_inputs(u, vec, graph, "channel_scaled")
            u.inputs[0] = x
        node.inputs.clear()
        node.outputs.clear()
        return None
