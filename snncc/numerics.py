"""Numeric comparisons shared by the evaluator and the backends' export checks (a leaf
module: it imports only torch, so backends can use it without the program layer)."""

from __future__ import annotations

import torch


def max_relative_error(output: torch.Tensor, reference: torch.Tensor) -> float:
    """max |output - reference| / max |reference|: one number for how far another runtime's
    result is from the reference, relative to the reference's range."""
    return float((output - reference).abs().max() / reference.abs().max().clamp(min=1e-30))
