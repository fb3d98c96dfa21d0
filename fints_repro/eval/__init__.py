"""Evaluation: ROUGE (LaMP convention), METEOR, post-processing, one entry point."""

from .metrics import compute_metrics

__all__ = ["compute_metrics"]
