"""Planted-truth validation: does the pipeline find what the embedded fine-tune planted?

Given the planted capabilities (corpus source, capability category, gain or loss), a run's
selected latents (`group` in latents.parquet), their evidence (`source_mass`: share of each
latent's activation mass per corpus source) and, when labelled, the judge's categories:

- **mass rate**: share of the fine-tune-specific latents that carry most (> `majority`) of their
  activation mass on prompts of planted sources; the same rate for *all* shared latents (from
  RUN/source_mass.parquet, written by analyze) and for the sampled baseline group; the
  enrichment is the ft-specific rate over the all-shared rate (over the sampled baseline's when
  the run has no source_mass.parquet: a 35-latent sample moved it by 2x between runs).
- **judge agreement**: of the model-specific latents whose dominant source is a planted one, the
  share whose primary category is that capability's category.
- **direction**: the category-shift statistic between the fine-tune's and the base's specific
  latents must be positive for planted gains and negative for planted losses (the check is the
  sign; each capability also carries its interval and whether that excludes 0).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from diffing.evidence import iter_evidence, read_labels
from diffing.stats import category_shift


def enrichment_ratio(rate: float, ref: float) -> float:
    """rate / ref; NaN where either is unknown, and where both are 0 (nothing is enriched), +inf
    only for a positive rate against a reference of 0."""
    if math.isnan(rate) or math.isnan(ref):
        return math.nan
    if ref > 0:
        return rate / ref
    return math.inf if rate > 0 else math.nan


def _rate(masses: Sequence[Mapping[str, float]], planted: set[str], majority: float) -> float:
    masses = [m for m in masses if m]  # no source column (or a latent that never fired): unknown
    if not masses:
        return math.nan
    return float(np.mean([sum(v for k, v in m.items() if k in planted) > majority for m in masses]))


def planted_truth(
    run_dir: str | Path,
    planted: Sequence[Mapping[str, str]],
    pair: tuple[str, str],
    *,
    majority: float = 0.5,
    shift_kwargs: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """Validation numbers for a run whose B model (pair[1]) is the fine-tune of A (pair[0]).
    `shift_kwargs`: the intervals of the direction check (diffing.stats.category_shift's arguments,
    e.g. ReportConfig.shift_kwargs(); its defaults, 95% Katz, without)."""
    a, b = pair
    sources = {p["source"]: p for p in planted}
    evidence = {e.latent: e for e in iter_evidence(run_dir)}
    labels = read_labels(run_dir)
    by_group: dict[str, list] = {}
    for e in evidence.values():
        by_group.setdefault(e.group, []).append(e)
    ft = by_group.get(f"{b}-specific", [])
    base = by_group.get(f"{a}-specific", [])
    baseline = by_group.get("baseline", [])
    planted_set = set(sources)
    rate_ft = _rate([e.source_mass for e in ft], planted_set, majority)
    rate_base = _rate([e.source_mass for e in base], planted_set, majority)
    rate_baseline = _rate([e.source_mass for e in baseline], planted_set, majority)
    shared = _shared_masses(Path(run_dir))
    rate_shared = _rate(shared, planted_set, majority) if shared else math.nan
    ref = rate_shared if shared else rate_baseline
    enrichment = enrichment_ratio(rate_ft, ref)

    # judge agreement on latents whose dominant source is planted
    matched = judged = 0
    per_latent = []
    for e in ft + base:
        if not e.source_mass:
            continue
        dom = max(e.source_mass, key=e.source_mass.get)
        row = {"latent": e.latent, "group": e.group, "dominant_source": dom, "mass": e.source_mass[dom]}
        if dom in sources and e.latent in labels:
            judged += 1
            row["category"] = labels[e.latent].category
            row["expected"] = sources[dom]["category"]
            row["match"] = labels[e.latent].category == sources[dom]["category"]
            matched += int(row["match"])
        per_latent.append(row)

    direction: dict[str, Any] = {}
    lab_ft = [labels[e.latent].category for e in ft if e.latent in labels]
    lab_base = [labels[e.latent].category for e in base if e.latent in labels]
    if lab_ft and lab_base:
        shifts = {
            s.category: s for s in category_shift(_counts(lab_ft), _counts(lab_base), **(shift_kwargs or {}))
        }
        for p in planted:
            s = shifts.get(p["category"])
            want = 1 if p["direction"] == "gain" else -1
            got = None if s is None or math.isnan(s.delta) else s.delta
            if s is not None and s.n_i == 0 and s.n_s > 0:
                got = math.inf  # present only in the fine-tune's latents
            direction[p["name"]] = {
                "category": p["category"],
                "expected": p["direction"],
                "delta": got,  # +inf (null in JSON) when only the fine-tune's latents have the category
                "only_in": None if s is None else s.only_in,
                # the target is the sign; the interval says whether the data also rule out no shift
                "ok": got is not None and got * want > 0,
                "ci_low": None if s is None else s.ci_low,
                "ci_high": None if s is None else s.ci_high,
                "ci_level": None if s is None else s.ci_level,
                "ci_excludes_zero": s is not None and (s.ci_low > 0 or s.ci_high < 0),
            }
    return {
        "n_ft_specific": len(ft),
        "n_base_specific": len(base),
        "n_baseline": len(baseline),
        "mass_rate_ft_specific": rate_ft,
        "mass_rate_base_specific": rate_base,
        "mass_rate_baseline": rate_baseline,
        "n_shared": len(shared),
        "mass_rate_shared": rate_shared,
        "enrichment": enrichment,
        "enrichment_vs": "shared latents outside the groups" if shared else "sampled baseline",
        "judge_agreement": matched / judged if judged else math.nan,
        "judged": judged,
        "direction": direction,
        "latents": per_latent,
    }


def _counts(cats: Sequence[str]) -> dict[str, int]:
    out: dict[str, int] = {}
    for c in cats:
        out[c] = out.get(c, 0) + 1
    return out


def _shared_masses(run: Path) -> list[dict[str, float]]:
    """Source-mass shares of every live shared latent outside the model-specific groups (on small
    fine-tunes the Δnorm tails lie inside the shared band: counting them would put the selected
    latents into their own reference), or [] without RUN/source_mass.parquet."""
    import pyarrow.parquet as pq

    from diffing.collect import SOURCE_MASS_FILE

    path = run / SOURCE_MASS_FILE
    if not path.exists() or not (run / "latents.parquet").exists():
        return []
    t = pq.read_table(run / "latents.parquet")
    groups = t.column("group").to_pylist() if "group" in t.column_names else [""] * t.num_rows
    shared = {
        lat
        for lat, c, g in zip(
            t.column("latent").to_pylist(), t.column("class").to_pylist(), groups, strict=True
        )
        if c == "shared" and not (g or "").endswith("-specific")
    }
    t = pq.read_table(path).to_pydict()
    names = [k for k in t if k.startswith("mass/")]
    out = []
    for i, lat in enumerate(t["latent"]):
        total = sum(t[k][i] for k in names)
        if lat in shared and total > 0:
            out.append({k[5:]: t[k][i] / total for k in names})
    return out
