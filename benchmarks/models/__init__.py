"""Per-model preparation: export the FP32 ONNX model(s) and build calibration/evaluation data.

Each module exposes ``RECIPE`` (bumped when its output changes) and ``prepare(out_dir) -> dict`` returning the
manifest info (file roles, sample counts, sanity checks). Torch and the model packages are imported here only.
"""
