"""The SDXL recipe's Python hooks: prompts and starting noise (data), the DDIM scheduler step between UNet
calls (``loop.update``) and the image metric (``evaluation.metric``)."""

from __future__ import annotations

import numpy as np

SEQ, LATENT, VOCAB = 16, 16, 1000
BOS, EOS, PAD = VOCAB - 2, VOCAB - 1, 0

# DDIM over SDXL's noise schedule (scaled-linear betas 0.00085..0.012, 1000 training steps), 4 steps.
_BETAS = np.linspace(0.00085 ** 0.5, 0.012 ** 0.5, 1000, dtype=np.float64) ** 2
ALPHAS_CUMPROD = np.cumprod(1.0 - _BETAS)
TIMESTEPS = (999, 749, 499, 249)  # must have loop.max_steps entries


def _samples(seed: int, count: int):
    rng = np.random.default_rng(seed)
    for _ in range(count):
        length = int(rng.integers(4, SEQ - 1))
        ids = np.full((1, SEQ), PAD, np.int64)
        ids[0, 0] = BOS
        ids[0, 1:length + 1] = rng.integers(1, VOCAB - 2, length)
        ids[0, length + 1] = EOS
        latents = rng.standard_normal((1, 4, LATENT, LATENT)).astype(np.float32)
        yield {"input_ids": ids, "latents": latents}


def calibration_samples():
    """16 random prompts with their starting noise."""
    return list(_samples(seed=1, count=16))


def evaluation_samples():
    """8 other prompts and noise (another seed)."""
    return list(_samples(seed=2, count=8))


def ddim_step(step: int, feeds: dict, outputs: dict) -> dict:
    """Deterministic DDIM (eta = 0): predicted x0 from the noise estimate, then re-noised to the next timestep."""
    t = TIMESTEPS[step]
    prev = TIMESTEPS[step + 1] if step + 1 < len(TIMESTEPS) else None
    a_t = ALPHAS_CUMPROD[t]
    a_prev = ALPHAS_CUMPROD[prev] if prev is not None else 1.0
    x, eps = feeds["sample"].astype(np.float64), outputs["noise_pred"].astype(np.float64)
    x0 = (x - np.sqrt(1.0 - a_t) * eps) / np.sqrt(a_t)
    following = np.sqrt(a_prev) * x0 + np.sqrt(1.0 - a_prev) * eps
    return {"sample": following.astype(np.float32),
            "timestep": np.array([prev if prev is not None else 0], np.float32)}


def image_metrics(reference: list[dict], candidate: list[dict]) -> dict[str, float]:
    """image_psnr_db: PSNR of the decoded images mapped from [-1, 1] to [0, 1] (mean over images, and the
    worst); latents_cosine: the final latents (after all denoising steps)."""
    psnr = []
    for r, c in zip(reference, candidate):
        a = np.clip((r["image"].astype(np.float64) + 1) / 2, 0, 1)
        b = np.clip((c["image"].astype(np.float64) + 1) / 2, 0, 1)
        mse = float(np.mean((a - b) ** 2))
        psnr.append(float("inf") if mse == 0 else 10 * np.log10(1.0 / mse))
    return {"image_psnr_db": float(np.mean(psnr)), "image_psnr_db_min": float(np.min(psnr))}
