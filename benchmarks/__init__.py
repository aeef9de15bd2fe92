"""Benchmarks: prepare the shared real models and data, score candidates, run the onnxruntime baseline.

- :mod:`benchmarks.prepare` exports the FP32 models and builds calibration/evaluation sets into a cache.
- :mod:`benchmarks.tasks` scores a candidate model against FP32 with a task metric per model.
- :mod:`benchmarks.ort_baseline` quantizes a model with ``onnxruntime.quantization`` (the number to beat).
"""

MODEL_NAMES = ("effnet", "minilm", "whisper", "silero")
