"""Evaluation: metrics, calibration, statistics, conformal sets and Grad-CAM explanations."""
