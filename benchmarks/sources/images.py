"""Natural photographs bundled with scikit-image and scikit-learn, cut into random crops.

Calibration and evaluation crops come from disjoint source images, so no evaluation pixel was seen during
calibration.
"""

from __future__ import annotations

import numpy as np

CALIBRATION_IMAGES = ("astronaut", "coffee", "immunohistochemistry", "camera", "clock", "coins", "brick",
                      "sklearn_china", "moon", "stereo_left", "grass")
EVALUATION_IMAGES = ("chelsea", "rocket", "hubble_deep_field", "retina", "colorwheel", "sklearn_flower", "gravel",
                     "cell", "stereo_right", "page", "text")


def load_image(name: str) -> np.ndarray:
    """An RGB uint8 image [H, W, 3] by name (skimage.data names, plus sklearn_* and stereo_* aliases)."""
    if name.startswith("sklearn_"):
        from sklearn.datasets import load_sample_images

        images = load_sample_images().images
        image = images[0] if name == "sklearn_china" else images[1]
    else:
        import skimage.data

        if name in ("stereo_left", "stereo_right"):
            image = skimage.data.stereo_motorcycle()[0 if name == "stereo_left" else 1]
        else:
            image = getattr(skimage.data, name)()
    image = np.asarray(image)
    if image.ndim == 2:
        image = np.repeat(image[..., None], 3, axis=-1)
    return np.ascontiguousarray(image[..., :3]).astype(np.uint8)


def random_crops(names: tuple[str, ...], count: int, size: int, seed: int, min_area: float = 0.3) -> list[np.ndarray]:
    """``count`` crops of ``size``×``size`` (area fraction ``min_area``..1, random h-flip), cycling over images."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    images = [load_image(n) for n in names]
    crops = []
    for i in range(count):
        image = images[i % len(images)]
        height, width = image.shape[:2]
        side = np.sqrt(rng.uniform(min_area, 1.0))
        ch, cw = int(height * side), int(width * side)
        top, left = rng.integers(0, height - ch + 1), rng.integers(0, width - cw + 1)
        crop = image[top:top + ch, left:left + cw]
        if rng.random() < 0.5:
            crop = crop[:, ::-1]
        resized = Image.fromarray(np.ascontiguousarray(crop)).resize((size, size), Image.BILINEAR)
        crops.append(np.asarray(resized))
    return crops
