"""Offline data sources: natural images, English sentences, synthesized speech and VAD clips.

Everything here is built from files shipped in installed wheels or generated locally (espeak-ng), so the
benchmarks run without network access. Calibration and evaluation draws use disjoint source material.
"""
