"""The category-shift statistic of "Beyond the Leaderboard", with counts and confidence intervals.

For two latent sets S and I (e.g. SimPO-specific vs it-specific latents) labelled into
categories, the shift of category c is the ratio of its shares minus one:

    Δ_c = (n_c^S / N^S) / (n_c^I / N^I) − 1

A share ratio of two binomial proportions. Its CI (95% by default) comes from
* `katz`: the log method, log RR ± z·sqrt(1/n^S − 1/N^S + 1/n^I − 1/N^I), with Haldane's
  correction (0.5 added to every cell) when a cell of the 2x2 table is 0. Conservative at small
  counts; with sets of very different sizes most of its error falls on one side;
* `score`: the Miettinen–Nurminen score interval, whose two tails stay near α/2 each also when the
  sets differ in size (closer to nominal, hence less conservative, at small equal counts);
* `bootstrap`: a seeded parametric bootstrap (Katz where a count is 0 or the whole set).
A category absent from S has the lower bound −1, one absent from I (Δ undefined) the upper bound +∞.
`adjust="bonferroni"` widens every interval to level 1 − α/K over the K categories, so that the
whole table holds at 1 − α (each row's `ci_level` says which level it has). Small counts make these
intervals wide; categories with fewer than `min_count` latents on either side are flagged, never
dropped.
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
    ci_level: float = 0.95  # the level of this interval (1 − α/K under a Bonferroni adjustment)

    @property
    def only_in(self) -> str | None:
        """'S' or 'I' when the category is in one set only (Δ_c is +∞ or −1, its interval open)."""
        if self.n_i == 0 and self.n_s > 0:
            return "S"
        return "I" if self.n_s == 0 and self.n_i > 0 else None

    def as_dict(self) -> dict:
        """The fields, plus `only_in` and `ci_high_unbounded`: JSON has no ±∞ or NaN, so a report
        writes those numbers as null, and these say which null means unbounded."""
        return asdict(self) | {"only_in": self.only_in, "ci_high_unbounded": math.isinf(self.ci_high)}


def _katz(n_s: int, N_s: int, n_i: int, N_i: int, z: float) -> tuple[float, float]:
    raw, N_s0, N_i0 = (n_s, n_i), N_s, N_i
    if 0 in (n_s, n_i, N_s - n_s, N_i - n_i):  # Haldane: 0.5 added to every cell of the 2x2 table
        n_s, n_i, N_s, N_i = n_s + 0.5, n_i + 0.5, N_s + 1, N_i + 1
    log_rr = math.log((n_s / N_s) / (n_i / N_i))
    se = math.sqrt(max(1 / n_s - 1 / N_s + 1 / n_i - 1 / N_i, 0.0))
    lo, hi = math.exp(log_rr - z * se) - 1, math.exp(log_rr + z * se) - 1
    if raw[0] == 0:
        lo = -1.0  # absent from S: Δ = −1 is the estimate, and the interval holds it
    if raw[1] == 0:
        hi = math.inf  # absent from I: Δ is unbounded above (only the lower bound says something)
    else:  # the corrected table's interval may miss the table's own estimate (a whole set in one
        delta = (raw[0] / N_s0) / (raw[1] / N_i0) - 1  # category, at a low ci_level): it holds it
        lo, hi = min(lo, delta), max(hi, delta)
    return lo, hi


def _mn_z(theta: float, n_s: int, N_s: int, n_i: int, N_i: int) -> float:
    """Miettinen–Nurminen score statistic of H0: p_S / p_I = theta (p under the constrained MLE)."""
    N = N_s + N_i
    a, b, c = theta * N, -(theta * N_s + n_s + N_i + theta * n_i), n_s + n_i
    p_i = (-b - math.sqrt(max(b * b - 4 * a * c, 0.0))) / (2 * a)
    p_s = theta * p_i
    num = n_s / N_s - theta * n_i / N_i
    var = (p_s * (1 - p_s) / N_s + theta**2 * p_i * (1 - p_i) / N_i) * N / (N - 1)
    if var <= 0:
        return math.copysign(math.inf, num) if num else 0.0
    return num / math.sqrt(var)


def _score(n_s: int, N_s: int, n_i: int, N_i: int, z: float) -> tuple[float, float]:
    """Miettinen–Nurminen score interval for the share ratio, as Δ = ratio − 1: the ratios the score
    test does not reject. Unlike Katz's log interval it keeps each tail near α/2 when the two sets
    differ in size. A category absent from S has the lower bound −1, one absent from I the upper +∞."""

    def root(target: float, lo: float, hi: float) -> float:  # Z decreases in log θ
        for _ in range(200):
            mid = (lo + hi) / 2
            if _mn_z(math.exp(mid), n_s, N_s, n_i, N_i) > target:
                lo = mid
            else:
                hi = mid
            if hi - lo < 1e-10:
                break
        return math.exp((lo + hi) / 2)

    lim = 40.0  # θ in [e^-40, e^40]
    if n_s == 0 or _mn_z(math.exp(-lim), n_s, N_s, n_i, N_i) <= z:
        low = 0.0
    else:
        low = root(z, -lim, lim)
    if n_i == 0 or _mn_z(math.exp(lim), n_s, N_s, n_i, N_i) >= -z:
        high = math.inf
    else:
        high = root(-z, -lim, lim)
    return low - 1, high - 1


def _bootstrap(
    n_s: int, N_s: int, n_i: int, N_i: int, alpha: float, reps: int, seed: int
) -> tuple[float, float]:
    if 0 in (n_s, n_i) or n_s == N_s or n_i == N_i:  # from p = 0 or 1 it never moves: Katz
        return _katz(n_s, N_s, n_i, N_i, NormalDist().inv_cdf(1 - alpha / 2))
    rng = np.random.default_rng(seed)
    s = rng.binomial(N_s, n_s / N_s, reps) / N_s
    i = rng.binomial(N_i, n_i / N_i, reps) / N_i
    with np.errstate(divide="ignore"):  # a replicate with none in I is Δ = +∞: kept, not dropped
        r = np.where(i > 0, s / np.where(i > 0, i, 1.0) - 1, np.inf)
    q = np.quantile(r, [alpha / 2, 1 - alpha / 2], method="inverted_cdf")  # no interpolation with +∞
    return float(q[0]), float(q[1])


def _whole(v) -> bool:
    try:
        f = float(v)
    except (TypeError, ValueError):
        return False
    return f >= 0 and f.is_integer()


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
    adjust: str = "none",
) -> list[CategoryShift]:
    """Δ_c per category (union of both sides), sorted by Δ_c descending. N defaults to the sum of
    counts; pass it when the sets hold latents outside the listed categories. `method`: katz,
    score or bootstrap; `adjust`: none or bonferroni (over the categories of the union)."""
    for side, counts in (("counts_s", counts_s), ("counts_i", counts_i)):
        for c, v in counts.items():  # shares or weights would be truncated below, silently
            if not _whole(v):
                raise ValueError(
                    f"{side}[{c!r}] = {v!r}: counts must be whole numbers >= 0 (latents per category), not shares"
                )
    for name, v in (("N_s", N_s), ("N_i", N_i)):
        if v is not None and not _whole(v):
            raise ValueError(f"{name} = {v!r} must be a whole number of latents")
    if method == "bootstrap" and bootstrap_reps < 1:
        raise ValueError(f"bootstrap_reps must be >= 1, got {bootstrap_reps}")
    N_s = int(sum(counts_s.values()) if N_s is None else N_s)
    N_i = int(sum(counts_i.values()) if N_i is None else N_i)
    if N_s <= 0 or N_i <= 0:
        raise ValueError(f"both latent sets need at least one latent (N_s={N_s}, N_i={N_i})")
    for name, N, counts in (("N_s", N_s, counts_s), ("N_i", N_i, counts_i)):
        if N < (listed := int(sum(counts.values()))):  # shares would sum past 1: N of another set?
            raise ValueError(
                f"{name} = {N} is smaller than the {listed} latents its counts list: N is the size of the "
                "whole set (the listed categories plus any latents outside them); leave it out to use the sum"
            )
    if method not in ("katz", "score", "bootstrap"):
        raise ValueError(f"method must be 'katz', 'score' or 'bootstrap', got {method!r}")
    if adjust not in ("none", "bonferroni"):
        raise ValueError(f"adjust must be 'none' or 'bonferroni', got {adjust!r}")
    if not 0 < alpha < 1:
        raise ValueError(f"alpha must be in (0, 1), got {alpha}")
    cats = sorted(set(counts_s) | set(counts_i))
    if adjust == "bonferroni":
        alpha = alpha / max(len(cats), 1)
    z = NormalDist().inv_cdf(1 - alpha / 2)
    out = []
    for c in cats:
        n_s, n_i = int(counts_s.get(c, 0)), int(counts_i.get(c, 0))
        share_s, share_i = n_s / N_s, n_i / N_i
        delta = share_s / share_i - 1 if n_i else math.nan
        if method == "katz":
            lo, hi = _katz(n_s, N_s, n_i, N_i, z)
        elif method == "score":
            lo, hi = _score(n_s, N_s, n_i, N_i, z)
        else:
            lo, hi = _bootstrap(n_s, N_s, n_i, N_i, alpha, bootstrap_reps, seed)
        small = min(n_s, n_i) < min_count
        out.append(CategoryShift(c, n_s, n_i, N_s, N_i, share_s, share_i, delta, lo, hi, small, 1 - alpha))
    return sorted(out, key=lambda r: (-(r.delta if not math.isnan(r.delta) else math.inf), r.category))
