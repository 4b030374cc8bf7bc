"""The category-shift statistic against the paper's reported numbers and a naive simulation."""

import math

import numpy as np
import pytest

from diffing.stats import category_shift

# "Beyond the Leaderboard": SimPO-specific (N=89) vs it-specific (N=112) latents per category,
# the count pairs that fit the paper's reported percentages.
PAPER = {
    "safety": (19, 18, 32.8),
    "multilingual": (8, 7, 43.8),
    "instruction following": (2, 1, 151.7),
    "factual verification": (3, 2, 88.8),
    "hallucination": (1, 4, -68.5),
    "self-reference": (4, 9, -44.1),
    "query classification": (1, 2, -37.1),
    "structured output": (1, 2, -37.1),
    "code generation": (4, 7, -28.1),
    "technical": (21, 32, -17.4),
}


def test_reproduces_the_papers_ten_percentages():
    rows = category_shift(
        {c: v[0] for c, v in PAPER.items()}, {c: v[1] for c, v in PAPER.items()}, N_s=89, N_i=112
    )
    got = {r.category: r for r in rows}
    for c, (n_s, n_i, pct) in PAPER.items():
        assert round(100 * got[c].delta, 1) == pct, c
        assert got[c].n_s == n_s and got[c].n_i == n_i and got[c].N_s == 89 and got[c].N_i == 112
        assert got[c].ci_low < got[c].delta < got[c].ci_high
    # tiny categories are flagged, not hidden
    assert got["instruction following"].small_count and not got["technical"].small_count
    assert [r.category for r in rows][0] == "instruction following"  # sorted by Δ


def test_katz_interval_covers_at_nominal_rate():
    """Coverage of the 95% interval on simulated draws with a known ratio (naive reference)."""
    rng = np.random.default_rng(0)
    p_s, p_i, N_s, N_i = 0.3, 0.2, 200, 250
    true = p_s / p_i - 1
    hits = 0
    for _ in range(2000):
        n_s, n_i = rng.binomial(N_s, p_s), rng.binomial(N_i, p_i)
        r = category_shift({"c": n_s}, {"c": n_i}, N_s=N_s, N_i=N_i)[0]
        hits += r.ci_low <= true <= r.ci_high
    assert 0.93 <= hits / 2000 <= 0.97


def test_bootstrap_agrees_with_katz_on_large_counts():
    k = category_shift({"c": 120}, {"c": 80}, N_s=400, N_i=400)[0]
    b = category_shift({"c": 120}, {"c": 80}, N_s=400, N_i=400, method="bootstrap")[0]
    assert abs(k.ci_low - b.ci_low) < 0.06 and abs(k.ci_high - b.ci_high) < 0.08


def test_bootstrap_interval_covers_at_nominal_rate():
    """The bootstrap's 95% interval, by the same naive simulation as Katz's (a 90% interval
    labelled 95% would sit inside the Katz comparison's tolerance, not inside this one)."""
    rng = np.random.default_rng(1)
    p_s, p_i, N_s, N_i = 0.3, 0.2, 200, 250
    true = p_s / p_i - 1
    hits, sims = 0, 1000
    for j in range(sims):
        n_s, n_i = rng.binomial(N_s, p_s), rng.binomial(N_i, p_i)
        r = category_shift(
            {"c": n_s}, {"c": n_i}, N_s=N_s, N_i=N_i, method="bootstrap", bootstrap_reps=2000, seed=j
        )[0]
        hits += r.ci_low <= true <= r.ci_high
    assert 0.925 <= hits / sims <= 0.975


def test_small_count_flags_the_smaller_side():
    """A category with few latents on either side is flagged (its Δ rests on them); the flag
    starts below min_count."""
    r = category_shift({"c": 1, "x": 29}, {"c": 30, "x": 0}, N_s=30, N_i=30)
    assert {x.category: x.small_count for x in r} == {"c": True, "x": True}
    r = category_shift({"c": 5}, {"c": 5}, N_s=30, N_i=30, min_count=5)[0]
    assert not r.small_count


def test_bootstrap_at_small_and_zero_counts():
    """Replicates with none in I are Δ = +∞ (kept, not dropped: the upper bound is then ∞); a zero
    count, where a bootstrap from p = 0 cannot move, falls back to Katz with Haldane's correction."""
    from diffing.stats import _bootstrap, _katz

    assert _bootstrap(2, 35, 1, 35, 0.05, 10_000, 0)[1] == math.inf
    assert _bootstrap(0, 10, 3, 10, 0.05, 10_000, 0) == pytest.approx(_katz(0, 10, 3, 10, 1.959963984540054))
    lo, hi = _bootstrap(3, 10, 0, 10, 0.05, 10_000, 0)
    assert -1 < lo < 0 and hi == math.inf


def test_absent_categories_and_errors():
    rows = {r.category: r for r in category_shift({"a": 3, "b": 2}, {"a": 5}, N_s=10, N_i=10)}
    # absent from I: Δ undefined, only a lower bound (Haldane-corrected Katz) says something
    assert math.isnan(rows["b"].delta) and rows["b"].small_count and rows["b"].ci_high == math.inf
    assert -1 < rows["b"].ci_low < 0.5
    # absent from S: Δ = −1 lies in its own interval
    a0 = category_shift({"a": 0, "b": 10}, {"a": 5, "b": 5})[1]
    assert a0.category == "a" and a0.delta == -1 and a0.ci_low == -1 and 0 < a0.ci_high < 1
    # every latent in one category on both sides: an interval of some width, around 0
    one = category_shift({"a": 10}, {"a": 10})[0]
    assert one.delta == 0 and one.ci_low < 0 < one.ci_high
    with pytest.raises(ValueError, match="at least one latent"):
        category_shift({}, {"a": 1})
    with pytest.raises(ValueError, match="N_s = 3 is smaller than the 5 latents"):
        category_shift({"a": 5}, {"a": 1}, N_s=3, N_i=3)
    # each count fits but together they exceed N (the size of another set?): shares would sum to 2
    with pytest.raises(ValueError, match="N_s = 1 is smaller than the 2 latents its counts list"):
        category_shift({"x": 1, "y": 1}, {"x": 1, "y": 1}, N_s=1, N_i=2)
    with pytest.raises(ValueError, match="N_i = 4 is smaller than the 5 latents"):
        category_shift({"x": 1}, {"x": 2, "y": 3}, N_s=1, N_i=4)
    assert category_shift({"x": 1}, {"x": 2, "y": 3}, N_s=1, N_i=5)[0].share_i == pytest.approx(0.4)


# Miettinen–Nurminen score bounds of the share ratio (θ = Δ + 1), from statsmodels 0.15's
# confint_proportions_2indep(method="score", compare="ratio", correction=True), computed offline
SCORE_REFERENCE = {
    (5, 35, 3, 35): (0.47022423719, 6.02376791442),
    (0, 10, 3, 10): (0.0, 1.13539976449),
    (3, 10, 0, 10): (0.88074705604, math.inf),
    (19, 89, 18, 112): (0.74587176721, 2.36086529986),
    (2, 5, 10, 300): (3.15721402871, 31.8440179252),
    (7, 40, 1, 500): (14.2390901538, 536.243071208),
}


def test_score_interval_matches_an_independent_implementation():
    for (n_s, N_s, n_i, N_i), (lo, hi) in SCORE_REFERENCE.items():
        r = category_shift({"c": n_s, "o": N_s - n_s}, {"c": n_i, "o": N_i - n_i}, method="score")
        r = {x.category: x for x in r}["c"]
        assert r.ci_low + 1 == pytest.approx(lo, rel=1e-6, abs=1e-9)
        assert r.ci_high + 1 == pytest.approx(hi, rel=1e-6) if math.isfinite(hi) else r.ci_high == math.inf
    # all of both sets in one category: an interval around Δ = 0 (the ratio 1 is not its edge)
    one = category_shift({"a": 10}, {"a": 10}, method="score")[0]
    assert one.ci_low < 0 < one.ci_high


def test_score_interval_keeps_both_tails_near_nominal_when_sets_differ_in_size():
    """Under equal shares, with a small S and a larger I, Katz's interval lies wholly above the
    truth far more often than the 2.5% per side it promises; the score interval does not."""
    rng = np.random.default_rng(1)
    N_s, N_i, p, reps = 6, 40, 0.25, 1500
    above = {"katz": 0, "score": 0}
    for _ in range(reps):
        n_s, n_i = int(rng.binomial(N_s, p)), int(rng.binomial(N_i, p))
        for m in above:
            r = category_shift({"c": n_s, "o": N_s - n_s}, {"c": n_i, "o": N_i - n_i}, method=m)
            above[m] += {x.category: x for x in r}["c"].ci_low > 0
    assert above["katz"] / reps > 0.045  # measured 0.05-0.06
    assert above["score"] / reps < 0.04


def test_bonferroni_widens_every_interval_to_a_family_level():
    counts_s, counts_i = {"a": 12, "b": 8, "c": 5, "d": 10}, {"a": 6, "b": 9, "c": 7, "d": 13}
    plain = {r.category: r for r in category_shift(counts_s, counts_i)}
    adj = {r.category: r for r in category_shift(counts_s, counts_i, adjust="bonferroni")}
    for c in counts_s:
        assert adj[c].delta == plain[c].delta
        assert adj[c].ci_low < plain[c].ci_low and adj[c].ci_high > plain[c].ci_high
        assert plain[c].ci_level == pytest.approx(0.95) and adj[c].ci_level == pytest.approx(1 - 0.05 / 4)
    # the same as asking each interval for that level directly
    direct = {r.category: r for r in category_shift(counts_s, counts_i, alpha=0.05 / 4)}
    assert adj["a"].ci_low == pytest.approx(direct["a"].ci_low)
    with pytest.raises(ValueError, match="adjust"):
        category_shift(counts_s, counts_i, adjust="holm")


def test_bootstrap_from_a_whole_set_falls_back_to_katz():
    from diffing.stats import _bootstrap, _katz

    z = 1.959963984540054
    assert _bootstrap(5, 5, 3, 3, 0.05, 2000, 0) == pytest.approx(_katz(5, 5, 3, 3, z))
    lo, hi = _bootstrap(6, 6, 10, 35, 0.05, 2000, 0)
    assert hi - lo > 0 and (lo, hi) == pytest.approx(_katz(6, 6, 10, 35, z))


def test_counts_must_be_whole_latent_counts():
    """Shares or weights would be truncated to ints against an N summed from the floats."""
    with pytest.raises(ValueError, match=r"counts_s\['a'\] = 0.6: counts must be whole numbers"):
        category_shift({"a": 0.6, "b": 0.4}, {"a": 0.5, "b": 0.5})
    with pytest.raises(ValueError, match=r"counts_i\['a'\] = -1"):
        category_shift({"a": 1, "b": 5}, {"a": -1, "b": 4})
    with pytest.raises(ValueError, match="N_s = 7.5"):
        category_shift({"a": 2}, {"a": 1}, N_s=7.5, N_i=4)
    with pytest.raises(ValueError, match="bootstrap_reps must be >= 1"):
        category_shift({"a": 2, "b": 3}, {"a": 1, "b": 4}, method="bootstrap", bootstrap_reps=0)
    floats = category_shift({"a": 2.0, "b": 3.0}, {"a": 1.0, "b": 4.0})  # whole floats (pandas) are fine
    ints = category_shift({"a": 2, "b": 3}, {"a": 1, "b": 4})
    assert [r.as_dict() for r in floats] == [r.as_dict() for r in ints]


def test_rows_say_which_side_alone_has_a_category():
    rows = {r.category: r.as_dict() for r in category_shift({"a": 3, "b": 2}, {"b": 4, "c": 1})}
    assert rows["a"]["only_in"] == "S" and rows["a"]["ci_high_unbounded"] and math.isnan(rows["a"]["delta"])
    assert rows["c"]["only_in"] == "I" and rows["c"]["delta"] == -1.0 and not rows["c"]["ci_high_unbounded"]
    assert rows["b"]["only_in"] is None


def test_every_interval_holds_its_own_estimate_where_a_whole_set_is_one_category():
    """Katz's Haldane correction (a zero cell: here N_s - n_s) shrinks the share of a set that is all
    one category, so a narrow interval of the corrected table missed Δ itself (found by fuzzing)."""
    for method in ("katz", "score"):
        for alpha in (0.5, 0.2, 0.05):
            for n_s, N_s, n_i, N_i in ((1, 1, 1, 8), (6, 6, 2, 40), (1, 9, 4, 4)):
                r = category_shift(
                    {"c": n_s, "o": N_s - n_s}, {"c": n_i, "o": N_i - n_i}, alpha=alpha, method=method
                )
                r = next(x for x in r if x.category == "c")
                assert r.ci_low <= r.delta <= r.ci_high, (method, alpha, r)
