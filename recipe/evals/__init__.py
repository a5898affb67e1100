"""Evaluations the training recipe runs on the live model (any parallel layout)."""
