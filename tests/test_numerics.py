"""compare: optimum-cli's check |output - reference| <= atol + rtol |reference|, value by value."""

from __future__ import annotations

import math

import torch

from snncc.numerics import compare, worst


def test_the_tolerance_is_atol_plus_rtol_times_the_reference():
    reference = torch.tensor([0.0, 10.0, -100.0], dtype=torch.float64)
    inside = compare(reference + torch.tensor([9e-4, 1.9e-3, -1.05e-2], dtype=torch.float64), reference, atol=1e-3,
                     rtol=1e-4)
    assert inside.passed and math.isclose(inside.max_abs_error, 1.05e-2, rel_tol=1e-6)
    outside = compare(reference + torch.tensor([1.1e-3, 0.0, 0.0], dtype=torch.float64), reference, atol=1e-3,
                      rtol=1e-4)
    assert not outside.passed and (outside.mismatched, outside.values) == (1, 3)
    assert "1 of 3 values beyond atol 0.001 + rtol 0.0001" in outside.summary()


def test_nan_fails_and_equal_infinities_pass():
    reference = torch.tensor([1.0, math.inf])
    assert compare(reference.clone(), reference, atol=0.0, rtol=0.0).passed
    broken = compare(torch.tensor([math.nan, math.inf]), reference, atol=1.0, rtol=1.0)
    assert broken.mismatched == 1 and broken.to_dict()["max_abs_error"] is None  # JSON's null, not NaN
    assert worst([broken, compare(reference, reference, 1.0, 1.0)]).mismatched == 1
