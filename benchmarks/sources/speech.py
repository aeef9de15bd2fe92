"""Speech synthesized offline with espeak-ng (Debian package ``espeak-ng``), resampled to 16 kHz, and the
noisy clips used to exercise a voice-activity detector."""

from __future__ import annotations

import random
import shutil
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .sentences import speakable_sentences

SAMPLE_RATE = 16000
VOICES = ("en-us", "en", "en-us+f3", "en+m3", "en-us+f2", "en+f4")


@dataclass(frozen=True)
class Utterance:
    text: str
    audio: np.ndarray  # float32 mono at SAMPLE_RATE
    voice: str
    speed: int
    pitch: int


def synthesize(text: str, voice: str = "en-us", speed: int = 160, pitch: int = 50) -> np.ndarray:
    """Waveform of ``text`` spoken by espeak-ng, float32 mono at 16 kHz."""
    import soundfile
    from scipy.signal import resample_poly

    if shutil.which("espeak-ng") is None:
        raise RuntimeError("espeak-ng is not installed: run `apt-get install -y espeak-ng`")
    with tempfile.TemporaryDirectory(prefix="edgeq-tts-") as tmp:
        wav = Path(tmp) / "speech.wav"
        subprocess.run(["espeak-ng", "-v", voice, "-s", str(speed), "-p", str(pitch), "-w", str(wav), text],
                       check=True, capture_output=True)
        audio, rate = soundfile.read(wav, dtype="float32")
    if audio.ndim > 1:
        audio = audio.mean(axis=1)
    if rate != SAMPLE_RATE:
        g = np.gcd(SAMPLE_RATE, rate)
        audio = resample_poly(audio, SAMPLE_RATE // g, rate // g)
    return audio.astype(np.float32)


def utterances(count: int, seed: int, offset: int) -> list[Utterance]:
    """``count`` utterances from a fixed shuffle of the sentence pool starting at ``offset``; calibration and
    evaluation draws use non-overlapping offsets. Voice, speed and pitch vary with ``seed``."""
    pool = speakable_sentences()
    random.Random(1234).shuffle(pool)
    chosen = pool[offset:offset + count]
    if len(chosen) < count:
        raise ValueError(f"only {len(chosen)} sentences available at offset {offset}, wanted {count}")
    rng = random.Random(seed)
    out = []
    for text in chosen:
        voice, speed, pitch = rng.choice(VOICES), rng.randint(140, 185), rng.randint(35, 65)
        out.append(Utterance(text, synthesize(text, voice, speed, pitch), voice, speed, pitch))
    return out


def vad_clip(speech: np.ndarray | None, samples: int, rng: np.random.Generator) -> np.ndarray:
    """A clip of ``samples`` samples: speech at a random offset and gain (or none) plus white or pink noise;
    speech-free clips sometimes carry a tone or hum as a distractor."""
    clip = np.zeros(samples, np.float32)
    if speech is not None:
        speech = speech[:samples - SAMPLE_RATE] * rng.uniform(0.2, 1.0)
        start = rng.integers(0, samples - len(speech))
        clip[start:start + len(speech)] = speech
    kind = rng.integers(0, 3)  # 0: faint white noise, 1: pink-ish noise, 2: louder white noise
    noise = rng.normal(0.0, 1.0, samples).astype(np.float32)
    if kind == 1:
        noise = np.cumsum(noise)
        noise -= np.convolve(noise, np.ones(400) / 400, "same")
        noise /= noise.std() + 1e-9
    level = 10 ** rng.uniform(-3.5, -1.5) if kind else 10 ** rng.uniform(-4.5, -3.0)
    clip += level * noise
    if speech is None and rng.random() < 0.5:
        t = np.arange(samples) / SAMPLE_RATE
        clip += rng.uniform(0.01, 0.2) * np.sin(2 * np.pi * rng.uniform(50, 1000) * t)
    return clip.astype(np.float32)
