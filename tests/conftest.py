"""Shared fixtures: small models built in code, and helpers to run them in ONNX Runtime."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # tests run against the checkout (edgeq maps passes/ targets/ into the package)
    sys.path.insert(0, str(ROOT))


def run_ort(model: onnx.ModelProto | str | Path, feeds: dict) -> list[np.ndarray]:
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.log_severity_level = 3
    so.add_session_config_entry("session.qdq_matmulnbits_accuracy_level", "1")
    src = model.SerializeToString() if isinstance(model, onnx.ModelProto) else str(model)
    return ort.InferenceSession(src, so, providers=["CPUExecutionProvider"]).run(None, feeds)


def init(name: str, arr) -> onnx.TensorProto:
    return numpy_helper.from_array(np.asarray(arr), name)


def make_cnn(*, batch: int | str = 1, opset: int = 13, seed: int = 0, with_bn: bool = True) -> onnx.ModelProto:
    """Conv-BN-Relu -> Conv-BN (+ residual Add) -> Relu -> GlobalAveragePool -> Flatten -> Gemm."""
    rng = np.random.default_rng(seed)
    c = 8
    nodes = [helper.make_node("Conv", ["x", "w1", "b1"], ["c1"], name="conv1", pads=[1, 1, 1, 1])]
    inits = [init("w1", rng.normal(0, 0.3, (c, 3, 3, 3)).astype(np.float32)),
             init("b1", rng.normal(0, 0.1, c).astype(np.float32)),
             init("w2", rng.normal(0, 0.2, (c, c, 3, 3)).astype(np.float32)),
             init("fc_w", rng.normal(0, 0.3, (c, 10)).astype(np.float32)),
             init("fc_b", rng.normal(0, 0.1, 10).astype(np.float32))]
    last = "c1"
    if with_bn:
        for i, name in enumerate(("bn1", "bn2")):
            inits += [init(f"{name}_s", rng.uniform(0.5, 1.5, c).astype(np.float32)),
                      init(f"{name}_b", rng.normal(0, 0.1, c).astype(np.float32)),
                      init(f"{name}_m", rng.normal(0, 0.1, c).astype(np.float32)),
                      init(f"{name}_v", rng.uniform(0.5, 1.5, c).astype(np.float32))]
        nodes.append(helper.make_node("BatchNormalization", ["c1", "bn1_s", "bn1_b", "bn1_m", "bn1_v"], ["n1"],
                                      name="bn1"))
        last = "n1"
    nodes.append(helper.make_node("Relu", [last], ["r1"], name="relu1"))
    nodes.append(helper.make_node("Conv", ["r1", "w2"], ["c2"], name="conv2", pads=[1, 1, 1, 1]))
    last = "c2"
    if with_bn:
        nodes.append(helper.make_node("BatchNormalization", ["c2", "bn2_s", "bn2_b", "bn2_m", "bn2_v"], ["n2"],
                                      name="bn2"))
        last = "n2"
    nodes += [helper.make_node("Add", [last, "r1"], ["a"], name="add"),
              helper.make_node("Relu", ["a"], ["r2"], name="relu2"),
              helper.make_node("GlobalAveragePool", ["r2"], ["p"], name="gap"),
              helper.make_node("Flatten", ["p"], ["f"], name="flatten"),
              helper.make_node("Gemm", ["f", "fc_w", "fc_b"], ["logits"], name="fc")]
    graph = helper.make_graph(nodes, "cnn", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [batch, 3, 8, 8])],
                              [helper.make_tensor_value_info("logits", TensorProto.FLOAT, [batch, 10])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    return model


def make_transformer_block(*, seq: int | str = 16, dim: int = 32, opset: int = 17, seed: int = 0,
                           mask: bool = False) -> onnx.ModelProto:
    """LayerNorm -> Q/K/V MatMul -> scaled scores (+ optional additive mask) -> Softmax -> MatMul -> out proj -> Add."""
    rng = np.random.default_rng(seed)
    d = dim
    inits = [init("ln_g", rng.uniform(0.5, 1.5, d).astype(np.float32)), init("ln_b", rng.normal(0, .1, d).astype(np.float32))]
    for n in ("wq", "wk", "wv", "wo"):
        inits.append(init(n, rng.normal(0, d ** -0.5, (d, d)).astype(np.float32)))
    inits += [init("bq", rng.normal(0, .1, d).astype(np.float32)), init("scale", np.array(d ** -0.5, np.float32)),
              init("w1", rng.normal(0, d ** -0.5, (d, 2 * d)).astype(np.float32)),
              init("w2", rng.normal(0, (2 * d) ** -0.5, (2 * d, d)).astype(np.float32))]
    nodes = [helper.make_node("LayerNormalization", ["x", "ln_g", "ln_b"], ["h"], name="ln", axis=-1),
             helper.make_node("MatMul", ["h", "wq"], ["q0"], name="q_proj"),
             helper.make_node("Add", ["q0", "bq"], ["q"], name="q_bias"),
             helper.make_node("MatMul", ["h", "wk"], ["k"], name="k_proj"),
             helper.make_node("MatMul", ["h", "wv"], ["v"], name="v_proj"),
             helper.make_node("Transpose", ["k"], ["kt"], name="k_t", perm=[0, 2, 1]),
             helper.make_node("MatMul", ["q", "kt"], ["s0"], name="scores"),
             helper.make_node("Mul", ["s0", "scale"], ["s"], name="scale_scores")]
    inputs = [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, seq, d])]
    last = "s"
    if mask:
        inputs.append(helper.make_tensor_value_info("mask", TensorProto.INT64, [1, seq]))
        inits += [init("one", np.array(1.0, np.float32)), init("neg", np.array(np.finfo(np.float32).min, np.float32)),
                  init("ax", np.array([1], np.int64))]
        nodes += [helper.make_node("Cast", ["mask"], ["mf"], name="mask_cast", to=TensorProto.FLOAT),
                  helper.make_node("Sub", ["one", "mf"], ["inv"], name="mask_inv"),
                  helper.make_node("Mul", ["inv", "neg"], ["madd"], name="mask_scale"),
                  helper.make_node("Unsqueeze", ["madd", "ax"], ["madd3"], name="mask_unsq"),
                  helper.make_node("Add", ["s", "madd3"], ["sm"], name="mask_add")]
        last = "sm"
    nodes += [helper.make_node("Softmax", [last], ["p"], name="softmax", axis=-1),
              helper.make_node("MatMul", ["p", "v"], ["ctx"], name="attn_v"),
              helper.make_node("MatMul", ["ctx", "wo"], ["o"], name="o_proj"),
              helper.make_node("Add", ["o", "x"], ["res"], name="residual"),
              helper.make_node("MatMul", ["res", "w1"], ["f1"], name="fc1"),
              helper.make_node("Relu", ["f1"], ["f1r"], name="act"),
              helper.make_node("MatMul", ["f1r", "w2"], ["f2"], name="fc2"),
              helper.make_node("Add", ["f2", "res"], ["y"], name="residual2")]
    graph = helper.make_graph(nodes, "block", inputs, [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, seq, d])],
                              inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    return model


@pytest.fixture
def cnn_model(tmp_path) -> Path:
    p = tmp_path / "cnn.onnx"
    onnx.save(make_cnn(), str(p))
    return p


@pytest.fixture
def cnn_data(tmp_path) -> tuple[Path, Path]:
    rng = np.random.default_rng(1)
    calib, ev = tmp_path / "calib.npz", tmp_path / "eval.npz"
    np.savez(calib, x=rng.normal(0, 1, (16, 3, 8, 8)).astype(np.float32))
    np.savez(ev, x=rng.normal(0, 1, (16, 3, 8, 8)).astype(np.float32))
    return calib, ev


@pytest.fixture
def digits():
    d = ROOT / "calibration_data"
    return {"model": d / "digits_cnn.onnx", "calib": d / "digits_calib.npz", "eval": d / "digits_eval.npz",
            "labels": d / "digits_eval_labels.npy"}


# ------------------------------------------------------------------------------------------------ running the CLI
_CLI_SERVER = r'''
import json, os, runpy, signal, sys, time, traceback
import importlib, pkgutil
import edgeq.cli, edgeq.api  # imports are paid once here; every command runs in a fresh fork
passes = importlib.import_module("edgeq.passes")
for mod in ["edgeq.lint", "edgeq.inspect", "edgeq.validation", "edgeq.compile", "edgeq.calibration.images"] + [
        "edgeq.passes." + m.name for m in pkgutil.iter_modules(passes.__path__)]:
    try:
        importlib.import_module(mod)
    except Exception:
        pass
edgeq.profiles.list_targets()  # warm the caches (YAML, type hints, onnx schemas) once
edgeq.model_io.load_model(os.path.join("calibration_data", "digits_cnn.onnx"))
import gc
gc.freeze()  # forked children then do not touch (copy) the parent's heap when they collect garbage
for line in sys.stdin:
    req = json.loads(line)
    pid = os.fork()
    if pid == 0:
        code = 1
        try:
            signal.signal(signal.SIGINT, signal.default_int_handler)
            os.chdir(req["cwd"])
            for fd, path in ((0, os.devnull), (1, req["stdout"]), (2, req["stderr"])):
                os.dup2(os.open(path, os.O_RDWR | os.O_CREAT | os.O_TRUNC if fd else os.O_RDONLY), fd)
            sys.argv = ["edgeq", *req["args"]]
            runpy.run_module("edgeq", run_name="__main__", alter_sys=True)
            code = 0
        except SystemExit as exc:
            code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
            if not isinstance(exc.code, (int, type(None))):
                print(exc.code, file=sys.stderr)
        except BaseException:
            traceback.print_exc()
        finally:
            sys.stdout.flush(); sys.stderr.flush()
            os._exit(code)
    deadline = time.monotonic() + req["timeout"]
    while True:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            rc = os.waitstatus_to_exitcode(status)
            break
        if time.monotonic() > deadline:
            os.kill(pid, signal.SIGKILL); os.waitpid(pid, 0); rc = "timeout"
            break
        time.sleep(0.005)
    print(json.dumps({"rc": rc}), flush=True)
'''


class CliResult:
    def __init__(self, returncode, stdout: str, stderr: str):
        self.returncode, self.stdout, self.stderr = returncode, stdout, stderr

    @property
    def output(self) -> str:
        return self.stdout + self.stderr

    def __repr__(self) -> str:
        return f"CliResult(rc={self.returncode!r}, stdout={self.stdout[-500:]!r}, stderr={self.stderr[-1500:]!r})"


class CliRunner:
    """Runs ``python -m edgeq ARGS`` in a child process forked from a warm interpreter (imports paid once).

    Each command gets its own process, exit status, stdout and stderr exactly as from a shell; a command that runs
    past ``timeout`` is killed and reported as ``returncode == "timeout"`` (a hang).
    """

    def __init__(self, workdir: Path):
        import subprocess

        self.workdir = workdir
        env = dict(__import__("os").environ, OMP_NUM_THREADS="1", OPENBLAS_NUM_THREADS="1",
                   PYTHONPATH=str(ROOT))
        self.proc = subprocess.Popen([sys.executable, "-c", _CLI_SERVER], cwd=ROOT, env=env, text=True,
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE)
        self.count = 0

    def __call__(self, *args, cwd: Path = ROOT, timeout: float = 120) -> CliResult:
        import json

        self.count += 1
        out, err = self.workdir / f"{self.count}.out", self.workdir / f"{self.count}.err"
        self.proc.stdin.write(json.dumps({"args": [str(a) for a in args], "cwd": str(cwd), "timeout": timeout,
                                          "stdout": str(out), "stderr": str(err)}) + "\n")
        self.proc.stdin.flush()
        reply = self.proc.stdout.readline()
        if not reply:
            raise RuntimeError("the CLI runner process died")
        return CliResult(json.loads(reply)["rc"], out.read_text(errors="replace"), err.read_text(errors="replace"))

    def close(self) -> None:
        self.proc.stdin.close()
        self.proc.wait(timeout=30)


@pytest.fixture(scope="session")
def edgeq_cli(tmp_path_factory):
    """``edgeq_cli("quantize", model, "-t", "qnn", ...)`` -> CliResult(returncode, stdout, stderr)."""
    runner = CliRunner(tmp_path_factory.mktemp("cli-runs"))
    yield runner
    runner.close()
