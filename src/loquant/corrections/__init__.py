"""Corrections W - Q(W) ≈ B·A, computed after quantization (no gradients through Q)."""

from loquant.corrections.methods import DEFAULT_ITERS, METHODS, NEEDS_STATS, Corrected, correct

__all__ = ["DEFAULT_ITERS", "METHODS", "NEEDS_STATS", "Corrected", "correct"]
