"""Numeric comparisons shared by the evaluator and the backends' export checks (a leaf
module: it imports only torch, so backends can use it without the program layer)."""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import asdict, dataclass

import torch

# The default tolerance (atol, rtol) of each export's check, |output - reference| <= atol + rtol
# |reference| (compare): from the errors measured on the tiny models and SmolLM2, with a margin
# (docs/export.md). Here, not in the backends, so the CLI's help can say them without importing one.
EXPORT_TOLERANCES = {"onnx": (1e-3, 1e-4), "nir": (1e-5, 1e-5)}


def max_relative_error(output: torch.Tensor, reference: torch.Tensor) -> float:
    """max |output - reference| / max |reference|: one number for how far another runtime's
    result is from the reference, relative to the reference's range."""
    return float((output - reference).abs().max() / reference.abs().max().clamp(min=1e-30))


@dataclass(frozen=True)
class Comparison:
    """How far another runtime's output is from the reference, judged as optimum-cli judges an
    export: it fails where |output - reference| > atol + rtol |reference| anywhere (a value
    that is NaN or infinite on one side only fails too)."""

    max_abs_error: float  # max |output - reference|
    max_relative_error: float  # max |output - reference| / max |reference| (max_relative_error above)
    atol: float
    rtol: float
    mismatched: int  # values outside the tolerance
    values: int

    @property
    def passed(self) -> bool:
        return self.mismatched == 0

    def summary(self) -> str:
        """One line: the errors and whether they are within the tolerance."""
        where = "within" if self.passed else f"{self.mismatched} of {self.values} values beyond"
        return (f"max abs error {self.max_abs_error:.2e}, max relative error {self.max_relative_error:.2e}; "
                f"{where} atol {self.atol:g} + rtol {self.rtol:g} |reference|")

    def to_dict(self) -> dict:
        """As JSON holds it: an error that is NaN or infinite as null."""
        fields = {k: None if isinstance(v, float) and not math.isfinite(v) else v for k, v in asdict(self).items()}
        return {**fields, "passed": self.passed}


def compare(output: torch.Tensor, reference: torch.Tensor, atol: float, rtol: float) -> Comparison:
    """`output` against `reference` within atol + rtol |reference| (Comparison), in float64."""
    output, reference = output.double(), reference.double()
    equal = output == reference  # equal infinities too, whose difference is NaN
    difference = torch.where(equal, 0.0, (output - reference).abs())
    if not difference.numel():
        return Comparison(0.0, 0.0, atol, rtol, 0, 0)
    mismatched = int((~(equal | (difference <= atol + rtol * reference.abs()))).sum())  # NaN is never within
    return Comparison(float(difference.max()), max_relative_error(output, reference), atol, rtol, mismatched,
                      difference.numel())


def worst(comparisons: Iterable[Comparison]) -> Comparison:
    """Several comparisons (one per output) as one: the largest errors, the mismatches summed."""
    comparisons = list(comparisons)

    def largest(values: list[float]) -> float:
        return math.nan if any(math.isnan(v) for v in values) else max(values)

    return Comparison(largest([c.max_abs_error for c in comparisons]),
                      largest([c.max_relative_error for c in comparisons]), comparisons[0].atol, comparisons[0].rtol,
                      sum(c.mismatched for c in comparisons), sum(c.values for c in comparisons))
