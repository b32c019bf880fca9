"""Per-site, per-channel precision: the digits each synapse input keeps, chosen to spend the
fewest synaptic operations for a given output divergence (or the least divergence for given
operations), from a measured sensitivity (snncc.sensitivity).

The problem is separable: total operations and (to second order) total divergence are sums
over channels, and each channel picks k, the digits it drops. So a Lagrangian solves it
exactly for every multiplier lambda: each channel takes the k that minimises
sops(k) + lambda * distortion(k), and bisection on lambda meets the budget. `per_channel=False`
gives every channel of a site the same k (per-site precision), for comparison.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch

from snncc.sensitivity import Sensitivity

LAMBDA_RANGE = (1e-6, 1e30)
_BISECTIONS = 80


@dataclass
class Plan:
    """Digits dropped per channel of each site, and what the sensitivity predicts of it."""

    dropped: dict[str, torch.Tensor]  # site tensor -> k per channel (range layout, int64)
    sops: float  # predicted synaptic operations of the sites, on the sensitivity's tokens
    distortion: float  # predicted divergence, summed over the sensitivity's tokens
    tokens: int
    T: int

    def range_factors(self) -> dict[str, torch.Tensor]:
        """What each site's calibrated range is multiplied by: 2^k per channel."""
        return {name: torch.ldexp(torch.ones(k.shape), k.to(torch.int32)) for name, k in self.dropped.items()}

    @property
    def mean_digits(self) -> float:
        """Digits kept, averaged over channels (unweighted)."""
        total = sum(k.numel() for k in self.dropped.values())
        return self.T - sum(float(k.sum()) for k in self.dropped.values()) / max(total, 1)

    def summary(self) -> dict:
        return {"T": self.T, "sites": len(self.dropped), "mean_digits": round(self.mean_digits, 3),
                "predicted_sops_per_token": self.sops / self.tokens,
                "predicted_divergence_per_token": self.distortion / self.tokens}


def allocate(sensitivity: Sensitivity, lam: float, per_channel: bool = True) -> Plan:
    """The plan minimising sops + lam * distortion (module docstring)."""
    dropped, sops, distortion = {}, 0.0, 0.0
    for site in sensitivity.sites:
        cost = site.sops + lam * site.distortion  # (T, *range)
        if per_channel:
            k = cost.argmin(0)
        else:
            k = torch.full(cost.shape[1:], int(cost.reshape(cost.shape[0], -1).sum(1).argmin()), dtype=torch.int64)
        dropped[site.name] = k
        sops += float(site.sops.gather(0, k.unsqueeze(0)).sum())
        distortion += float(site.distortion.gather(0, k.unsqueeze(0)).sum())
    return Plan(dropped, sops, distortion, sensitivity.tokens, sensitivity.T)


def _bisect(feasible: Callable[[float], bool], feasible_above: bool) -> float:
    """The lambda at the boundary of the feasible plans, on their side: the smallest feasible
    one where plans are feasible above it (more fidelity), else the largest."""
    low, high = (math.log(v) for v in LAMBDA_RANGE)
    for _ in range(_BISECTIONS):
        mid = (low + high) / 2
        if feasible(math.exp(mid)) == feasible_above:
            high = mid
        else:
            low = mid
    return math.exp(high if feasible_above else low)


def within_distortion(sensitivity: Sensitivity, per_token: float, per_channel: bool = True) -> Plan:
    """The cheapest plan whose predicted divergence per token is at most `per_token` (the
    full-precision plan if none is)."""
    limit = per_token * sensitivity.tokens
    totals = _totals(sensitivity, per_channel)
    lam = _bisect(lambda lam: totals(lam)[1] <= limit, True)
    return allocate(sensitivity, lam, per_channel)


def within_sops(sensitivity: Sensitivity, sops: float, per_channel: bool = True) -> Plan:
    """The least divergent plan whose predicted operations (over the sensitivity's tokens)
    are at most `sops` (the cheapest plan if none is)."""
    totals = _totals(sensitivity, per_channel)
    lam = _bisect(lambda lam: totals(lam)[0] <= sops, False)
    return allocate(sensitivity, lam, per_channel)


def _totals(sensitivity: Sensitivity, per_channel: bool) -> Callable[[float], tuple[float, float]]:
    """lambda -> (sops, distortion) of allocate's plan, for the bisections: per channel, every
    site's channels side by side so one argmin serves them all (one per site is 200 small ones)."""
    sops = torch.cat([site.sops.flatten(1) for site in sensitivity.sites], 1)
    distortion = torch.cat([site.distortion.flatten(1) for site in sensitivity.sites], 1)

    def per_channel_totals(lam: float) -> tuple[float, float]:
        k = (sops + lam * distortion).argmin(0, keepdim=True)
        return float(sops.gather(0, k).sum()), float(distortion.gather(0, k).sum())

    def per_site_totals(lam: float) -> tuple[float, float]:
        plan = allocate(sensitivity, lam, per_channel=False)
        return plan.sops, plan.distortion

    return per_channel_totals if per_channel else per_site_totals


def uniform(sensitivity: Sensitivity, digits: int) -> Plan:
    """Every channel keeps `digits` digits: uniform precision, for comparison."""
    k = sensitivity.T - digits
    dropped = {site.name: torch.full(site.sops.shape[1:], k, dtype=torch.int64) for site in sensitivity.sites}
    sops = sum(float(site.sops[k].sum()) for site in sensitivity.sites)
    distortion = sum(float(site.distortion[k].sum()) for site in sensitivity.sites)
    return Plan(dropped, sops, distortion, sensitivity.tokens, sensitivity.T)
