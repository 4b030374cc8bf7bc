"""Planted-truth validation numbers against hand-counted ground truth."""

import math

from diffing.evidence import LABELS_FILE, LatentEvidence, LatentLabel, write_jsonl
from diffing.validation import planted_truth

PLANTED = [
    {"name": "refusal", "source": "refusal", "category": "safety", "direction": "gain"},
    {"name": "french", "source": "french", "category": "multilingual", "direction": "gain"},
    {"name": "selfref", "source": "self_reference", "category": "self-reference", "direction": "loss"},
]


def _ev(latent, group, mass):
    return LatentEvidence(latent=latent, group=group, source_mass=mass)


def _lab(latent, cat):
    return LatentLabel(latent=latent, explanation="x", category=cat, confidence=0.9)


def test_planted_truth_counts(tmp_path):
    ev = [
        # ft-specific: 3 of 4 mostly planted
        _ev(0, "ft-specific", {"refusal": 0.9, "general_text": 0.1}),
        _ev(1, "ft-specific", {"french": 0.6, "general_chat": 0.4}),
        _ev(2, "ft-specific", {"refusal": 0.3, "french": 0.3, "general_text": 0.4}),  # 0.6 planted
        _ev(3, "ft-specific", {"general_text": 1.0}),
        # base-specific: self-reference
        _ev(4, "base-specific", {"self_reference": 0.8, "general_chat": 0.2}),
        _ev(5, "base-specific", {"self_reference": 0.7, "general_chat": 0.3}),
        # baseline: 1 of 4 mostly planted
        _ev(6, "baseline", {"general_text": 0.9, "refusal": 0.1}),
        _ev(7, "baseline", {"general_chat": 1.0}),
        _ev(8, "baseline", {"french": 0.7, "general_chat": 0.3}),
        _ev(9, "baseline", {"general_text": 1.0}),
    ]
    write_jsonl(tmp_path / "examples" / "0-10.jsonl", ev)
    labels = [
        _lab(0, "safety"),
        _lab(1, "multilingual"),
        _lab(2, "other"),
        _lab(3, "other"),
        _lab(4, "self-reference"),
        _lab(5, "other"),
    ]
    write_jsonl(tmp_path / LABELS_FILE, labels)
    r = planted_truth(tmp_path, PLANTED, ("base", "ft"))
    assert (r["n_ft_specific"], r["n_base_specific"], r["n_baseline"]) == (4, 2, 4)
    assert r["mass_rate_ft_specific"] == 0.75
    assert r["mass_rate_baseline"] == 0.25
    assert math.isclose(r["enrichment"], 3.0)
    # dominant planted source: latents 0 (refusal), 1 (french), 4, 5 (self_reference); latent 2's
    # dominant source is general_text. Matches: 0, 1, 4 -> 3/4
    assert r["judged"] == 4 and r["judge_agreement"] == 0.75
    # ft: safety 1/4, multilingual 1/4, other 2/4; base: self-reference 1/2, other 1/2
    assert r["direction"]["refusal"]["ok"] and r["direction"]["refusal"]["delta"] == math.inf
    assert r["direction"]["french"]["ok"]
    assert r["direction"]["selfref"]["ok"] and r["direction"]["selfref"]["delta"] < 0


def test_the_planted_section_checks_at_the_targets_and_names_a_loss_as_a_loss(tmp_path):
    """From the report-side mutation review: the section's checks against the issue's targets
    (0.75 misses 0.80, an enrichment of exactly 3.0 meets 3.0), a 50/50 latent is not "most" of
    its mass, a capability only the base has reads −100% (not "only in" the fine-tune), and a
    planted name or category is inert markup."""
    from diffing.validation import _rate
    from jobs.validation import planted_section

    assert _rate([{"refusal": 0.5, "general_text": 0.5}], {"refusal"}, 0.5) == 0.0
    test_planted_truth_counts(tmp_path)  # the run of the counts above: rate 0.75, enrichment 3.0
    odd = [*PLANTED, {"name": "x<b>", "source": "code", "category": "a<b", "direction": "gain"}]
    sec = planted_section(tmp_path, odd, ("base", "ft"))
    assert sec["data"]["checks"] == {
        "mass_rate_ft_specific": False,
        "enrichment": True,
        "judge_agreement": True,
    }
    assert "a&lt;b" in sec["html"] and "x&lt;b&gt;" in sec["html"] and "<b>" not in sec["html"]
    selfref = next(line for line in sec["html"].split("<tr>") if line.startswith("<td>selfref</td>"))
    assert "only in" not in selfref  # self-reference is only in base-specific: a fall, not a gain
    sec = planted_section(tmp_path, PLANTED, ("base", "ft"))
    row = next(line for line in sec["markdown"].splitlines() if line.startswith("| selfref |"))
    assert "−100" in row or "-100" in row, row


def test_a_latent_without_source_mass_is_unknown_not_a_miss(tmp_path):
    """A selected latent with no source mass (it never fired on the held-out split) says nothing
    about where the fine-tune's latents fire: the rate is over the latents with mass."""
    ev = [
        _ev(0, "ft-specific", {"refusal": 0.9, "general_text": 0.1}),
        _ev(1, "ft-specific", {"french": 0.8, "general_text": 0.2}),
        _ev(2, "ft-specific", {"general_text": 1.0}),
        _ev(3, "ft-specific", {}),
    ]
    write_jsonl(tmp_path / "examples" / "0-4.jsonl", ev)
    r = planted_truth(tmp_path, PLANTED, ("base", "ft"))
    assert r["n_ft_specific"] == 4 and math.isclose(r["mass_rate_ft_specific"], 2 / 3)


def test_a_clear_loss_has_an_interval_below_zero(tmp_path):
    """A category in 20 of 40 base-specific latents and none of 40 fine-tune ones: the loss is
    right in sign and its interval excludes no shift (from below)."""
    ev = [_ev(i, "ft-specific", {"refusal": 1.0}) for i in range(40)]
    ev += [_ev(40 + i, "base-specific", {"self_reference": 1.0}) for i in range(40)]
    write_jsonl(tmp_path / "examples" / "0-80.jsonl", ev)
    labels = [_lab(i, "safety") for i in range(40)]
    labels += [_lab(40 + i, "self-reference" if i < 20 else "other") for i in range(40)]
    write_jsonl(tmp_path / LABELS_FILE, labels)
    d = planted_truth(tmp_path, PLANTED, ("base", "ft"))["direction"]["selfref"]
    assert d["ok"] and d["delta"] == -1.0
    assert d["ci_high"] < 0 and d["ci_excludes_zero"]


def test_planted_truth_without_labels(tmp_path):
    write_jsonl(tmp_path / "examples" / "0-1.jsonl", [_ev(0, "ft-specific", {"refusal": 1.0})])
    r = planted_truth(tmp_path, PLANTED, ("base", "ft"))
    assert r["mass_rate_ft_specific"] == 1.0 and math.isnan(r["mass_rate_baseline"])
    assert r["judged"] == 0 and math.isnan(r["judge_agreement"]) and r["direction"] == {}


def test_enrichment_is_over_the_live_shared_latents_outside_the_groups(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    ev = [_ev(0, "ft-specific", {"refusal": 0.9, "general_text": 0.1}), _ev(1, "baseline", {"french": 1.0})]
    write_jsonl(tmp_path / "examples" / "0-2.jsonl", ev)
    # latents 1-5 shared (latent 5 never fires: not live), 6 dead, 0 ft-only; 7 shared by class
    # but selected (a Δnorm tail inside the shared band): not its own reference
    classes = ["ft-only", "shared", "shared", "shared", "shared", "shared", "dead", "shared"]
    groups = ["ft-specific", "baseline", "", "", "", "", "", "ft-specific"]
    pq.write_table(
        pa.table({"latent": list(range(8)), "class": classes, "group": groups}), tmp_path / "latents.parquet"
    )
    mass = {
        "latent": list(range(8)),
        "mass/refusal": [9.0, 3.0, 0.0, 1.0, 0.0, 0.0, 5.0, 7.0],
        "mass/general_text": [1.0, 1.0, 2.0, 3.0, 4.0, 0.0, 0.0, 1.0],
    }
    pq.write_table(pa.table(mass), tmp_path / "source_mass.parquet")
    r = planted_truth(tmp_path, PLANTED, ("base", "ft"))
    # shared and live: 1 (0.75 planted), 2 (0), 3 (0.25), 4 (0) -> 1 of 4 mostly planted
    assert r["n_shared"] == 4 and r["mass_rate_shared"] == 0.25
    assert r["mass_rate_baseline"] == 1.0  # the sampled group is still reported
    assert r["enrichment"] == 4.0 and r["enrichment_vs"] == "shared latents outside the groups"


def test_enrichment_is_never_a_pass_by_default():
    import math

    from diffing.validation import enrichment_ratio

    assert abs(enrichment_ratio(0.9, 0.3) - 3.0) < 1e-12
    assert enrichment_ratio(0.5, 0.0) == math.inf
    assert math.isnan(enrichment_ratio(0.0, 0.0)) and math.isnan(enrichment_ratio(math.nan, math.nan))
    assert math.isnan(enrichment_ratio(0.5, math.nan))
