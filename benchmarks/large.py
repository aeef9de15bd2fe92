"""A >2 GB transformer (random weights) through edgeq and onnxruntime.quantization: wall time and peak RSS.

    python -m benchmarks.large [--layers 11 --dim 2048] [--out benchmarks/results] [--work DIR]

The model is written layer by layer straight into its external-data file (it is never one protobuf in memory).
Both tools quantize it in a child process on the same calibration samples (edgeq end to end: with ``--eval``, so
its validation against FP32 is included; INT8 and float16); the table gives wall time, the child's own peak RSS
(``os.wait4``) next to the model size, and the fidelity of each result against FP32 (ONNX Runtime CPU,
file-backed sessions, measured afterwards in this process).
"""

from __future__ import annotations

import argparse
import json

import shutil
import tempfile
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper

from benchmarks.measure import REPO, python_module, run_measured


class _Weights:
    """Appends page-aligned raw tensors to ``<model>.data`` and returns external references to them."""

    def __init__(self, data_path: Path, rng: np.random.Generator):
        self.fh = open(data_path, "wb")
        self.location = data_path.name
        self.rng = rng
        self.inits: list[TensorProto] = []

    def add(self, name: str, shape: tuple, std: float) -> str:
        arr = (self.rng.standard_normal(shape, dtype=np.float32) * np.float32(std))
        self.fh.write(b"\0" * ((-self.fh.tell()) % 4096))
        offset = self.fh.tell()
        self.fh.write(arr.tobytes())
        tp = TensorProto(name=name, data_type=TensorProto.FLOAT, dims=list(shape),
                         data_location=TensorProto.EXTERNAL)
        for k, v in (("location", self.location), ("offset", str(offset)), ("length", str(arr.nbytes))):
            e = tp.external_data.add()
            e.key, e.value = k, v
        self.inits.append(tp)
        return name

    def small(self, name: str, values: np.ndarray) -> str:
        self.inits.append(onnx.numpy_helper.from_array(np.asarray(values), name))
        return name


def build_model(path: Path, *, layers: int, dim: int, heads: int = 16, seed: int = 0) -> int:
    """Write a pre-LayerNorm transformer encoder of ``layers`` blocks; returns the weight bytes."""
    w = _Weights(path.with_name(path.name + ".data"), np.random.default_rng(seed))
    nodes, x = [], "x"
    hd = dim // heads
    shape_heads = w.small("shape_heads", np.array([1, -1, heads, hd], np.int64))
    shape_back = w.small("shape_back", np.array([1, -1, dim], np.int64))
    scale = w.small("attn_scale", np.array(hd ** -0.5, np.float32))
    sqrt2, one, half = (w.small(n, np.array(v, np.float32)) for n, v in (("sqrt2", 2 ** 0.5), ("one", 1.0),
                                                                         ("half", 0.5)))
    for i in range(layers):
        p = f"l{i}"
        g1, b1 = w.small(f"{p}.ln1.g", np.ones(dim, np.float32)), w.small(f"{p}.ln1.b", np.zeros(dim, np.float32))
        nodes.append(helper.make_node("LayerNormalization", [x, g1, b1], [f"{p}.h"], name=f"{p}/ln1", axis=-1))
        qkv = []
        for k in ("q", "k", "v"):
            nodes.append(helper.make_node("MatMul", [f"{p}.h", w.add(f"{p}.w{k}", (dim, dim), dim ** -0.5)],
                                          [f"{p}.{k}0"], name=f"{p}/{k}_proj"))
            nodes.append(helper.make_node("Reshape", [f"{p}.{k}0", shape_heads], [f"{p}.{k}1"], name=f"{p}/{k}_split"))
            perm = [0, 2, 3, 1] if k == "k" else [0, 2, 1, 3]
            nodes.append(helper.make_node("Transpose", [f"{p}.{k}1"], [f"{p}.{k}"], name=f"{p}/{k}_t", perm=perm))
            qkv.append(f"{p}.{k}")
        nodes += [helper.make_node("MatMul", qkv[:2], [f"{p}.s0"], name=f"{p}/scores"),
                  helper.make_node("Mul", [f"{p}.s0", scale], [f"{p}.s"], name=f"{p}/scale"),
                  helper.make_node("Softmax", [f"{p}.s"], [f"{p}.a"], name=f"{p}/softmax", axis=-1),
                  helper.make_node("MatMul", [f"{p}.a", qkv[2]], [f"{p}.c0"], name=f"{p}/context"),
                  helper.make_node("Transpose", [f"{p}.c0"], [f"{p}.c1"], name=f"{p}/c_t", perm=[0, 2, 1, 3]),
                  helper.make_node("Reshape", [f"{p}.c1", shape_back], [f"{p}.c"], name=f"{p}/c_merge"),
                  helper.make_node("MatMul", [f"{p}.c", w.add(f"{p}.wo", (dim, dim), dim ** -0.5)], [f"{p}.o"],
                                   name=f"{p}/o_proj"),
                  helper.make_node("Add", [x, f"{p}.o"], [f"{p}.r1"], name=f"{p}/residual1")]
        g2, b2 = w.small(f"{p}.ln2.g", np.ones(dim, np.float32)), w.small(f"{p}.ln2.b", np.zeros(dim, np.float32))
        nodes += [helper.make_node("LayerNormalization", [f"{p}.r1", g2, b2], [f"{p}.h2"], name=f"{p}/ln2", axis=-1),
                  helper.make_node("MatMul", [f"{p}.h2", w.add(f"{p}.w1", (dim, 4 * dim), dim ** -0.5)],
                                   [f"{p}.f1"], name=f"{p}/fc1"),
                  helper.make_node("Div", [f"{p}.f1", sqrt2], [f"{p}.g0"], name=f"{p}/gelu_div"),
                  helper.make_node("Erf", [f"{p}.g0"], [f"{p}.g1"], name=f"{p}/gelu_erf"),
                  helper.make_node("Add", [f"{p}.g1", one], [f"{p}.g2"], name=f"{p}/gelu_add"),
                  helper.make_node("Mul", [f"{p}.f1", f"{p}.g2"], [f"{p}.g3"], name=f"{p}/gelu_mul"),
                  helper.make_node("Mul", [f"{p}.g3", half], [f"{p}.g"], name=f"{p}/gelu_half"),
                  helper.make_node("MatMul", [f"{p}.g", w.add(f"{p}.w2", (4 * dim, dim), (4 * dim) ** -0.5)],
                                   [f"{p}.f2"], name=f"{p}/fc2"),
                  helper.make_node("Add", [f"{p}.r1", f"{p}.f2"], [f"{p}.y"], name=f"{p}/residual2")]
        x = f"{p}.y"
    nodes.append(helper.make_node("Identity", [x], ["y"], name="output"))
    graph = helper.make_graph(nodes, "large_transformer",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, "seq", dim])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, "seq", dim])], w.inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    size = w.fh.tell()
    w.fh.close()
    path.write_bytes(model.SerializeToString())
    return size


def _fidelity(reference: Path, candidate: Path, samples: Path) -> dict:
    from edgeq.calibration.calibrate import make_session

    ref, cand = make_session(reference), make_session(candidate)
    x = np.load(samples)["x"]
    cos = []
    for i in range(min(2, len(x))):
        a = ref.run(None, {"x": x[i:i + 1]})[0].ravel().astype(np.float64)
        b = cand.run(None, {"x": x[i:i + 1]})[0].ravel().astype(np.float64)
        cos.append(float(a @ b / np.linalg.norm(a) / np.linalg.norm(b)))
    return {"cosine": float(np.mean(cos))}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--layers", type=int, default=11)
    ap.add_argument("--dim", type=int, default=2048)
    ap.add_argument("--seq", type=int, default=32)
    ap.add_argument("--samples", type=int, default=4)
    ap.add_argument("--target", default="tensorrt")
    ap.add_argument("--fp16-target", default="tensorrt-fp16")
    ap.add_argument("--skip-ort", action="store_true")
    ap.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results")
    ap.add_argument("--work", type=Path, default=None, help="scratch folder (default: a temp dir, removed after)")
    args = ap.parse_args(argv)
    work = args.work or Path(tempfile.mkdtemp(prefix="edgeq-large-"))
    work.mkdir(parents=True, exist_ok=True)
    try:
        model = work / "large.onnx"
        size = build_model(model, layers=args.layers, dim=args.dim)
        calib = work / "calib.npz"
        rng = np.random.default_rng(1)
        np.savez(calib, x=rng.standard_normal((args.samples, args.seq, args.dim), dtype=np.float32))
        rows = {"model_bytes": size, "layers": args.layers, "dim": args.dim, "seq": args.seq,
                "calib_samples": args.samples}
        for tool, target in (("edgeq", args.target), ("edgeq " + args.fp16_target, args.fp16_target)):
            out_e = work / f"{target}.onnx"
            # end to end, as a user runs it: load, calibrate, Q/DQ, save and validate against FP32 (--eval)
            m = run_measured(python_module("edgeq", "quantize", model, "-t", target, "--calib", calib, "--eval",
                                           calib, "-o", out_e), timeout=3600)
            rows[tool] = {"ok": m.ok, "wall_seconds": m.wall_seconds, "peak_rss_mb": m.peak_rss_mb, "target": target,
                          **({"error": m.output[-1500:]} if not m.ok else {})}
            if m.ok:
                rows[tool].update(_fidelity(model, out_e, calib))
                rows[tool]["output_bytes"] = out_e.stat().st_size + (work / f"{target}.onnx.data").stat().st_size
            out_e.unlink(missing_ok=True)
            (work / f"{target}.onnx.data").unlink(missing_ok=True)
        for tool, mode in (() if args.skip_ort else (("onnxruntime", "static"),
                                                      ("onnxruntime+external", "static_external_data"))):
            out_o = work / f"{mode}.onnx"
            m = run_measured(python_module("benchmarks.ort_baseline", "--model", model, "--calib", calib, "--out",
                                           out_o, "--mode", mode), timeout=3600)
            rows[tool] = {"ok": m.ok, "wall_seconds": m.wall_seconds, "peak_rss_mb": m.peak_rss_mb,
                          **({"error": m.output.strip().splitlines()[-1][:300]} if not m.ok else {})}
            if m.ok:
                rows[tool].update(_fidelity(model, out_o, calib))
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "large.json").write_text(json.dumps(rows, indent=2))
        gb = size / 2**30
        print(f"model: {args.layers} layers x {args.dim}, {gb:.2f} GiB of weights")
        print("| tool | ok | wall (s) | peak RSS (GiB) | RSS / model size | cosine vs FP32 |")
        print("|---|---|---|---|---|---|")
        for tool in ("edgeq", "edgeq " + args.fp16_target, "onnxruntime", "onnxruntime+external"):
            r = rows.get(tool)
            if r:
                print(f"| {tool} | {r['ok'] or r['error']} | {r['wall_seconds']:.0f} | {r['peak_rss_mb'] / 1024:.2f} | "
                      f"{r['peak_rss_mb'] / 1024 / gb:.2f} | {r.get('cosine', float('nan')):.4f} |")
        return 0
    finally:
        if args.work is None:
            shutil.rmtree(work, ignore_errors=True)



if __name__ == "__main__":
    raise SystemExit(main())
