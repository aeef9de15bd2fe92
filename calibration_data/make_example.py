"""Build the bundled example used by ``edgeq demo``: a small CNN on scikit-learn's 8x8 digits.

Run from the repository root (dev-time only; needs torch, scikit-learn and pillow, none of which edgeq needs
at runtime)::

    python calibration_data/make_example.py

Everything is seeded and training runs on one CPU thread, so a rerun on the same library versions rewrites
the same files. Outputs, next to this script:

- ``digits_cnn.onnx``          FP32 model, input ``image`` [N,1,8,8] float32, output ``logits`` [N,10].
                               BatchNormalization nodes are kept (not folded into the convs) so that the
                               BN-folding pass has something to do.
- ``digits_calib.npz``         key ``image``: 64 normalised samples from the training split.
- ``digits_eval.npz``          key ``image``: the whole held-out test split, normalised.
- ``digits_eval_labels.npy``   int64 labels for ``digits_eval.npz``.
- ``digits_png/NNNN.png``      the first 16 calibration samples as 8-bit greyscale PNGs
                               (``NNNN.png`` is row ``NNNN - 1`` of ``digits_calib.npz``).
- ``digits_png.yaml``          the preprocessing that turns those PNGs into exactly the npz rows.

The script ends by checking its own outputs: the PNG + YAML route reproduces the npz rows, ONNX Runtime
matches PyTorch, the ONNX file passes the full checker, and the held-out accuracy is high enough.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import torch
import yaml
from PIL import Image
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split
from torch import nn
from torch.nn import functional as F

SEED = 20240601
TEST_FRACTION = 0.25
NUM_CALIB = 64
NUM_PNG = 16
OPSET = 13
MIN_ACCURACY = 0.95
MAX_ONNX_BYTES = 200 * 1024

# Digits pixels are 0..16; x16 (255 for the top value) gives a true 8-bit image, so that writing PNGs and
# reading them back is lossless and the PNG route reproduces the npz tensors exactly.
SCALE = 1.0 / 255.0
# Normalisation statistics are rounded before use so that the YAML, not float noise, defines the tensors.
STAT_DECIMALS = 4

HERE = Path(__file__).resolve().parent


class DigitsCNN(nn.Module):
    """Conv-BN-ReLU stem, a residual Conv-BN block, max-pool, Conv-BN-ReLU, global average pool, 2-layer MLP.

    Chosen to exercise quantization rather than to be minimal: BatchNorm to fold, convs with per-channel
    weights, a residual Add whose two inputs need matching Q/DQ, and Gemm layers at the end.
    """

    def __init__(self, width: int = 16, num_classes: int = 10) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(1, width, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.conv2 = nn.Conv2d(width, width, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(width)
        self.pool = nn.MaxPool2d(2)
        self.conv3 = nn.Conv2d(width, 2 * width, 3, padding=1, bias=False)
        self.bn3 = nn.BatchNorm2d(2 * width)
        self.fc1 = nn.Linear(2 * width, 32)
        self.fc2 = nn.Linear(32, num_classes)

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.bn1(self.conv1(image)))
        x = F.relu(self.bn2(self.conv2(x)) + x)
        x = self.pool(x)
        x = F.relu(self.bn3(self.conv3(x)))
        x = torch.flatten(F.adaptive_avg_pool2d(x, 1), 1)
        return self.fc2(F.relu(self.fc1(x)))


def load_uint8_digits() -> tuple[np.ndarray, np.ndarray]:
    """Return the digits as uint8 images [N,8,8] (0..255) and int64 labels [N]."""
    digits = load_digits()
    images = np.clip(digits.images * 16, 0, 255).astype(np.uint8)
    return images, digits.target.astype(np.int64)


def normalise(images_u8: np.ndarray, mean: float, std: float) -> np.ndarray:
    """uint8 [N,8,8] -> float32 [N,1,8,8], in the order the YAML describes: scale, subtract mean, divide std."""
    x = images_u8.astype(np.float32) * np.float32(SCALE)
    x = (x - np.float32(mean)) / np.float32(std)
    return x[:, None, :, :].astype(np.float32)


def train(model: DigitsCNN, x: np.ndarray, y: np.ndarray, *, epochs: int, batch_size: int) -> None:
    xt, yt = torch.from_numpy(x), torch.from_numpy(y)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=1e-4)
    steps_per_epoch = (len(x) + batch_size - 1) // batch_size
    schedule = torch.optim.lr_scheduler.OneCycleLR(
        optimizer, max_lr=1e-2, total_steps=epochs * steps_per_epoch
    )
    model.train()
    for epoch in range(epochs):
        order = torch.randperm(len(x))
        total_loss = 0.0
        for start in range(0, len(x), batch_size):
            idx = order[start : start + batch_size]
            # One-pixel random shifts: cheap augmentation that helps a model this small generalise.
            dy, dx = (int(v) for v in torch.randint(-1, 2, (2,)))
            batch = torch.roll(xt[idx], shifts=(dy, dx), dims=(2, 3))
            loss = F.cross_entropy(model(batch), yt[idx])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            schedule.step()
            total_loss += loss.item() * len(idx)
        if (epoch + 1) % 10 == 0 or epoch == 0:
            print(f"epoch {epoch + 1:3d}/{epochs}  train loss {total_loss / len(x):.4f}")
    model.eval()


def export_onnx(model: DigitsCNN, path: Path) -> None:
    """Export in eval mode with BatchNormalization kept as separate nodes (no Conv-BN fusion, no folding)."""
    model.eval()
    torch.onnx.export(
        model,
        (torch.zeros(1, 1, 8, 8),),
        str(path),
        dynamo=False,  # the TorchScript exporter keeps BN unfused under PRESERVE
        export_params=True,
        opset_version=OPSET,
        do_constant_folding=False,
        training=torch.onnx.TrainingMode.PRESERVE,
        input_names=["image"],
        output_names=["logits"],
        dynamic_axes={"image": {0: "N"}, "logits": {0: "N"}},
    )
    # Re-save so the file is guaranteed to be one self-contained protobuf.
    proto = onnx.load(str(path))
    onnx.save_model(proto, str(path), save_as_external_data=False)


def write_png_calibration(images_u8: np.ndarray, mean: float, std: float) -> None:
    png_dir = HERE / "digits_png"
    png_dir.mkdir(exist_ok=True)
    for old in png_dir.glob("*.png"):
        old.unlink()
    for i, img in enumerate(images_u8, start=1):
        Image.fromarray(img).save(png_dir / f"{i:04d}.png")
    spec = (
        "# Preprocessing that turns digits_png/*.png into the rows of digits_calib.npz (file NNNN.png is row\n"
        "# NNNN-1). Applied in this order: load as greyscale, resize, cast to dtype, multiply by scale,\n"
        "# subtract mean and divide by std per channel, lay out as NCHW. Written by make_example.py.\n"
        f"input: image\n"
        f"size: [8, 8]          # [height, width]; the PNGs are already this size\n"
        f"grayscale: true\n"
        f"scale: {SCALE!r}  # 1/255\n"
        f"mean: [{mean}]\n"
        f"std: [{std}]\n"
        f"layout: NCHW\n"
        f"dtype: float32\n"
    )
    (HERE / "digits_png.yaml").write_text(spec)


def load_pngs_with_spec(png_dir: Path, spec_path: Path) -> np.ndarray:
    """Independent re-implementation of the YAML preprocessing, driven only by the YAML file."""
    spec = yaml.safe_load(spec_path.read_text())
    height, width = spec["size"]
    rows = []
    for path in sorted(png_dir.glob("*.png")):
        img = Image.open(path)
        img = img.convert("L") if spec["grayscale"] else img.convert("RGB")
        if img.size != (width, height):
            img = img.resize((width, height), Image.BILINEAR)
        arr = np.asarray(img, dtype=spec["dtype"])
        arr = arr[None] if arr.ndim == 2 else arr.transpose(2, 0, 1)  # -> CHW
        mean = np.asarray(spec["mean"], dtype=spec["dtype"])[:, None, None]
        std = np.asarray(spec["std"], dtype=spec["dtype"])[:, None, None]
        rows.append((arr * np.asarray(spec["scale"], dtype=spec["dtype"]) - mean) / std)
    assert spec["layout"] == "NCHW"
    return np.stack(rows).astype(spec["dtype"])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=120)
    args = parser.parse_args()

    torch.manual_seed(SEED)
    torch.set_num_threads(1)
    torch.use_deterministic_algorithms(True)
    rng = np.random.default_rng(SEED)

    images_u8, labels = load_uint8_digits()
    train_u8, test_u8, train_y, test_y = train_test_split(
        images_u8, labels, test_size=TEST_FRACTION, random_state=SEED, stratify=labels
    )
    scaled_train = train_u8.astype(np.float64) * SCALE
    mean = round(float(scaled_train.mean()), STAT_DECIMALS)
    std = round(float(scaled_train.std()), STAT_DECIMALS)
    print(f"train {len(train_u8)}  test {len(test_u8)}  mean {mean}  std {std}")

    x_train, x_test = normalise(train_u8, mean, std), normalise(test_u8, mean, std)

    model = DigitsCNN()
    started = time.perf_counter()
    train(model, x_train, train_y, epochs=args.epochs, batch_size=32)
    print(f"trained in {time.perf_counter() - started:.1f}s")
    with torch.no_grad():
        torch_logits = model(torch.from_numpy(x_test)).numpy()
    print(f"PyTorch test accuracy {(torch_logits.argmax(1) == test_y).mean():.4f}")

    calib_rows = np.sort(rng.choice(len(train_u8), size=NUM_CALIB, replace=False))
    onnx_path = HERE / "digits_cnn.onnx"
    export_onnx(model, onnx_path)
    np.savez(HERE / "digits_calib.npz", image=x_train[calib_rows])
    np.savez(HERE / "digits_eval.npz", image=x_test)
    np.save(HERE / "digits_eval_labels.npy", test_y)
    write_png_calibration(train_u8[calib_rows[:NUM_PNG]], mean, std)

    verify(onnx_path, torch_logits)


def verify(onnx_path: Path, torch_logits: np.ndarray) -> None:
    proto = onnx.load(str(onnx_path))
    onnx.checker.check_model(proto, full_check=True)
    ops = [node.op_type for node in proto.graph.node]
    assert "BatchNormalization" in ops, f"BatchNormalization was folded away: {ops}"
    assert not any(
        init.data_location == onnx.TensorProto.EXTERNAL for init in proto.graph.initializer
    ), "model references external data"
    size = onnx_path.stat().st_size
    assert size < MAX_ONNX_BYTES, f"{onnx_path.name} is {size} bytes"
    print(f"{onnx_path.name}: {size} bytes, opset {proto.opset_import[0].version}, ops {ops}")

    calib = np.load(HERE / "digits_calib.npz")["image"]
    from_pngs = load_pngs_with_spec(HERE / "digits_png", HERE / "digits_png.yaml")
    png_diff = float(np.abs(from_pngs - calib[: len(from_pngs)]).max())
    assert png_diff < 1e-5, f"PNG + YAML preprocessing differs from the npz by {png_diff}"
    print(f"PNG route vs npz: {len(from_pngs)} images, max abs diff {png_diff:.2e}")

    session = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    eval_x = np.load(HERE / "digits_eval.npz")["image"]
    eval_y = np.load(HERE / "digits_eval_labels.npy")
    logits = session.run(["logits"], {"image": eval_x})[0]
    ort_diff = float(np.abs(logits - torch_logits).max())
    assert ort_diff < 1e-4, f"ONNX Runtime differs from PyTorch by {ort_diff}"
    accuracy = float((logits.argmax(1) == eval_y).mean())
    print(f"ONNX Runtime FP32 eval accuracy {accuracy:.4f} on {len(eval_y)} samples "
          f"(max |ORT - torch| {ort_diff:.2e})")
    assert accuracy >= MIN_ACCURACY, f"accuracy {accuracy:.4f} is below {MIN_ACCURACY}"


if __name__ == "__main__":
    main()
