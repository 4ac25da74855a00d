"""Outputs -> numbers and summaries: detection metrics, threshold calibration, evaluation tables.

Imports numpy/scikit-learn (and the Scorer where a function scores); never ray.
"""
