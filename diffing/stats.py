"""The category-shift statistic of "Beyond the Leaderboard", with counts and confidence intervals.

For two latent sets S and I (e.g. SimPO-specific vs it-specific latents) labelled into
categories, the shift of category c is the ratio of its shares minus one:

    Δ_c = (n_c^S / N^S) / (n_c^I / N^I) − 1

A share ratio of two binomial proportions: its 95% CI comes from the Katz log method
(log RR ± z·sqrt(1/n^S − 1/N^S + 1/n^I − 1/N^I), with Haldane's correction, 0.5 added to every
cell, when a cell of the 2x2 table is 0; a category absent from S has the lower bound −1, one absent
from I (Δ undefined) the upper bound +∞) or from a seeded bootstrap. Small counts make these intervals wide; categories with fewer than
`min_count` latents on either side are flagged, never dropped.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from statistics import NormalDist

import numpy as np


@dataclass(frozen=True)
class CategoryShift:
    category: str
    n_s: int
    n_i: int
    N_s: int
    N_i: int
    share_s: float
    share_i: float
    delta: float  # Δ_c (nan when the category is absent from I)
    ci_low: float
    ci_high: float
    small_count: bool

    def as_dict(self) -> dict:
        return asdict(self)


def _katz(n_s: int, N_s: int, n_i: int, N_i: int, z: float) -> tuple[float, float]:
    raw = (n_s, n_i)
    if 0 in (n_s, n_i, N_s - n_s, N_i - n_i):  # Haldane: 0.5 added to every cell of the 2x2 table
        n_s, n_i, N_s, N_i = n_s + 0.5, n_i + 0.5, N_s + 1, N_i + 1
    log_rr = math.log((n_s / N_s) / (n_i / N_i))
    se = math.sqrt(max(1 / n_s - 1 / N_s + 1 / n_i - 1 / N_i, 0.0))
    lo, hi = math.exp(log_rr - z * se) - 1, math.exp(log_rr + z * se) - 1
    if raw[0] == 0:
        lo = -1.0  # absent from S: Δ = −1 is the estimate, and the interval holds it
    if raw[1] == 0:
        hi = math.inf  # absent from I: Δ is unbounded above (only the lower bound says something)
    return lo, hi


def _bootstrap(
    n_s: int, N_s: int, n_i: int, N_i: int, alpha: float, reps: int, seed: int
) -> tuple[float, float]:
    if 0 in (n_s, n_i):  # a parametric bootstrap from p = 0 never moves: Katz with Haldane's 0.5
        return _katz(n_s, N_s, n_i, N_i, NormalDist().inv_cdf(1 - alpha / 2))
    rng = np.random.default_rng(seed)
    s = rng.binomial(N_s, n_s / N_s, reps) / N_s
    i = rng.binomial(N_i, n_i / N_i, reps) / N_i
    with np.errstate(divide="ignore"):  # a replicate with none in I is Δ = +∞: kept, not dropped
        r = np.where(i > 0, s / np.where(i > 0, i, 1.0) - 1, np.inf)
    q = np.quantile(r, [alpha / 2, 1 - alpha / 2], method="inverted_cdf")  # no interpolation with +∞
    return float(q[0]), float(q[1])


def category_shift(
    counts_s: Mapping[str, int],
    counts_i: Mapping[str, int],
    *,
    N_s: int | None = None,
    N_i: int | None = None,
    alpha: float = 0.05,
    method: str = "katz",
    min_count: int = 5,
    bootstrap_reps: int = 10_000,
    seed: int = 0,
) -> list[CategoryShift]:
    """Δ_c per category (union of both sides), sorted by Δ_c descending. N defaults to the sum of
    counts; pass it when the sets hold latents outside the listed categories."""
    N_s = sum(counts_s.values()) if N_s is None else N_s
    N_i = sum(counts_i.values()) if N_i is None else N_i
    if N_s <= 0 or N_i <= 0:
        raise ValueError(f"both latent sets need at least one latent (N_s={N_s}, N_i={N_i})")
    if method not in ("katz", "bootstrap"):
        raise ValueError(f"method must be 'katz' or 'bootstrap', got {method!r}")
    z = NormalDist().inv_cdf(1 - alpha / 2)
    out = []
    for c in sorted(set(counts_s) | set(counts_i)):
        n_s, n_i = int(counts_s.get(c, 0)), int(counts_i.get(c, 0))
        if n_s > N_s or n_i > N_i:
            raise ValueError(f"category {c!r}: count exceeds its set size")
        share_s, share_i = n_s / N_s, n_i / N_i
        delta = share_s / share_i - 1 if n_i else math.nan
        if method == "katz":
            lo, hi = _katz(n_s, N_s, n_i, N_i, z)
        else:
            lo, hi = _bootstrap(n_s, N_s, n_i, N_i, alpha, bootstrap_reps, seed)
        out.append(
            CategoryShift(c, n_s, n_i, N_s, N_i, share_s, share_i, delta, lo, hi, min(n_s, n_i) < min_count)
        )
    return sorted(out, key=lambda r: (-(r.delta if not math.isnan(r.delta) else math.inf), r.category))
