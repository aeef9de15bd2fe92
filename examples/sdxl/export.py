"""Build a small SDXL-layout text-to-image model with random weights and export its four parts to ONNX.

    python examples/sdxl/export.py [--out examples/sdxl/models]

The parts use the real model classes (transformers' CLIP text models, diffusers' UNet2DConditionModel and
AutoencoderKL) at small sizes, wired as SDXL wires them:

* ``text_encoder.onnx``   input_ids [1, 16] -> hidden_1 [1, 16, 32]: CLIPTextModel, penultimate hidden states;
* ``text_encoder_2.onnx`` input_ids [1, 16] -> hidden_2 [1, 16, 64], text_embeds [1, 64]:
  CLIPTextModelWithProjection, penultimate hidden states and the pooled projection;
* ``unet.onnx`` sample [1, 4, 16, 16], timestep [1], hidden_1, hidden_2, text_embeds, time_ids [1, 6] ->
  noise_pred: the two encoders' states are concatenated on the channel axis (cross-attention dim 96) and the
  pooled embedding plus the size/crop ``time_ids`` condition the time embedding (``addition_embed_type:
  text_time``); GroupNorm, self/cross attention, GEGLU feed-forward, strided-conv down- and Resize+conv upsampling;
* ``vae_decoder.onnx`` latents [1, 4, 16, 16] -> image [1, 3, 128, 128] (AutoencoderKL decoder, scaling factor
  applied inside, mid-block attention, three Resize+conv upsamplers).

Random weights are enough to measure what quantization does to the computation; a text tokenizer is not part of
the recipe (prompts are random token ids, see ``data.py``). Export takes about half a minute on 2 cores.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
SEQ, LATENT, OPSET = 16, 16, 17
TOKENS = dict(bos_token_id=998, eos_token_id=999, pad_token_id=0)  # recipe.py builds prompts with these
TE1 = dict(**TOKENS, vocab_size=1000, hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4,
           max_position_embeddings=SEQ, projection_dim=32)
TE2 = dict(**TOKENS, vocab_size=1000, hidden_size=64, intermediate_size=128, num_hidden_layers=3, num_attention_heads=4,
           max_position_embeddings=SEQ, projection_dim=64)
TIME_IDS_DIM = 8  # addition_time_embed_dim: each of the 6 time ids gets an 8-dim sinusoidal embedding


def build(seed: int = 0):
    import torch
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    torch.manual_seed(seed)
    te1 = CLIPTextModel(CLIPTextConfig(**TE1)).eval()
    te2 = CLIPTextModelWithProjection(CLIPTextConfig(**TE2)).eval()
    unet = UNet2DConditionModel(
        sample_size=LATENT, in_channels=4, out_channels=4, layers_per_block=1,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        block_out_channels=(32, 64), transformer_layers_per_block=(1, 1), attention_head_dim=(2, 4),
        cross_attention_dim=TE1["hidden_size"] + TE2["hidden_size"], norm_num_groups=16, use_linear_projection=True,
        addition_embed_type="text_time", addition_time_embed_dim=TIME_IDS_DIM,
        projection_class_embeddings_input_dim=TE2["projection_dim"] + 6 * TIME_IDS_DIM).eval()
    vae = AutoencoderKL(in_channels=3, out_channels=3, latent_channels=4, layers_per_block=1, norm_num_groups=16,
                        down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
                        block_out_channels=(32, 32, 64, 64), sample_size=8 * LATENT,
                        scaling_factor=0.13025).eval()
    return te1, te2, unet, vae


def _wrappers(te1, te2, unet, vae):
    import torch
    from torch import nn

    class TextEncoder(nn.Module):
        def __init__(self, model, pooled: bool):
            super().__init__()
            self.model, self.pooled = model, pooled

        def forward(self, input_ids):
            out = self.model(input_ids, output_hidden_states=True)
            hidden = out.hidden_states[-2]  # SDXL reads the penultimate layer
            return (hidden, out.text_embeds) if self.pooled else hidden

    class Unet(nn.Module):
        def __init__(self):
            super().__init__()
            self.unet = unet

        def forward(self, sample, timestep, hidden_1, hidden_2, text_embeds, time_ids):
            context = torch.cat([hidden_1, hidden_2], dim=-1)
            cond = {"text_embeds": text_embeds, "time_ids": time_ids}
            return self.unet(sample, timestep, encoder_hidden_states=context, added_cond_kwargs=cond).sample

    class VaeDecoder(nn.Module):
        def __init__(self):
            super().__init__()
            self.vae = vae

        def forward(self, latents):
            return self.vae.decode(latents / self.vae.config.scaling_factor).sample

    return TextEncoder(te1, False), TextEncoder(te2, True), Unet(), VaeDecoder()


def export(out: Path, seed: int = 0) -> dict:
    import torch

    out.mkdir(parents=True, exist_ok=True)
    enc1, enc2, unet, vae = _wrappers(*build(seed))
    ids = torch.randint(1, TE1["vocab_size"] - 2, (1, SEQ))
    ids[0, 0], ids[0, -1] = TOKENS["bos_token_id"], TOKENS["eos_token_id"]
    h1, h2 = enc1(ids), enc2(ids)[0]
    pooled = enc2(ids)[1]
    sample, t = torch.randn(1, 4, LATENT, LATENT), torch.tensor([999.0])
    time_ids = torch.tensor([[8.0 * LATENT, 8.0 * LATENT, 0.0, 0.0, 8.0 * LATENT, 8.0 * LATENT]])
    jobs = [
        ("text_encoder", enc1, (ids,), ["input_ids"], ["hidden_1"]),
        ("text_encoder_2", enc2, (ids,), ["input_ids"], ["hidden_2", "text_embeds"]),
        ("unet", unet, (sample, t, h1, h2, pooled, time_ids),
         ["sample", "timestep", "hidden_1", "hidden_2", "text_embeds", "time_ids"], ["noise_pred"]),
        ("vae_decoder", vae, (sample,), ["latents"], ["image"]),
    ]
    sizes = {}
    with torch.no_grad():
        for name, module, args, inputs, outputs in jobs:
            path = out / f"{name}.onnx"
            torch.onnx.export(module, args, str(path), opset_version=OPSET, input_names=inputs,
                              output_names=outputs, dynamo=False)
            sizes[name] = path.stat().st_size
    info = {"seed": seed, "seq": SEQ, "latent": LATENT, "sizes_bytes": sizes,
            "text_encoders": [TE1, TE2], "time_ids": time_ids.tolist()}
    (out / "export.json").write_text(json.dumps(info, indent=1))
    return info


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=HERE / "models")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    info = export(args.out, args.seed)
    total = sum(info["sizes_bytes"].values())
    print(f"wrote {', '.join(info['sizes_bytes'])} to {args.out} ({total / 1e6:.2f} MB)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
