"""Calibration: reading representative data, observing activation ranges, and saving the statistics."""
