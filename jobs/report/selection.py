"""What the report's "<model>-specific" groups are: how diffing.analysis.select_latents chose them
and what they hold, read from latents.parquet (`robust`, `tail`, `delta_norm`, ν columns).

On small fine-tunes no latent passes the absolute Δnorm cut and Latent Scaling (the robust
"<model>-only" class), and a group is then the rank-based Δnorm tail (analysis `tail_frac`): the
most model-leaning latents of a shared dictionary, not latents the other model lacks. A reader who
sees "0 robust model-only" beside "35 ft-specific" needs that said where the group is shown.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from jobs.report.render import fmt


def _median(x: np.ndarray) -> float | None:
    x = x[np.isfinite(x)]
    return float(np.median(x)) if len(x) else None


def group_selection(cols: dict[str, list], pair: tuple[str, str]) -> dict[str, dict[str, Any]]:
    """Per model-specific group: its size, how many members are robust <model>-only latents and how
    many come from the Δnorm tail alone, the Δnorm range and the median ν^ε and ν^r."""
    L = len(cols["latent"])
    groups = np.asarray(cols.get("group", [""] * L), dtype=object)
    robust = np.asarray(cols.get("robust", [False] * L), dtype=bool)
    tail = np.asarray(cols.get("tail", [""] * L), dtype=object)
    dn = np.asarray(cols["delta_norm"], dtype=float)
    nu_eps, nu_r = np.asarray(cols["nu_eps"], float), np.asarray(cols["nu_r"], float)
    out = {}
    # the pair's first model leans towards Δnorm 1 (its tail is "high"), the second towards 0
    for model, other, side in ((pair[0], pair[1], "high"), (pair[1], pair[0], "low")):
        m = groups == f"{model}-specific"
        fin = dn[m][np.isfinite(dn[m])]
        out[f"{model}-specific"] = {
            "model": model,
            "other": other,
            "tail_side": side,
            "n": int(m.sum()),
            "n_robust": int((m & robust).sum()),
            "n_tail_only": int((m & ~robust & (tail == side)).sum()),
            "delta_norm_min": float(fin.min()) if len(fin) else None,
            "delta_norm_max": float(fin.max()) if len(fin) else None,
            "nu_eps_median": _median(nu_eps[m]),
            "nu_r_median": _median(nu_r[m]),
        }
    return out


def how_selected(s: dict[str, Any], acfg: dict[str, Any]) -> str:
    """The selection rule of one group, in words, from the analysis config it was made with."""
    model, side = s["model"], s["tail_side"]
    cut = (
        f"Δnorm > {fmt(acfg.get('only_high'))}" if side == "high" else f"Δnorm < {fmt(acfg.get('only_low'))}"
    )
    by_class = (
        f"robust {model}-only latents ({cut}, |ν^ε| < {fmt(acfg.get('nu_eps_max'))}, "
        f"|ν^r| < {fmt(acfg.get('nu_r_max'))})"
    )
    frac = acfg.get("tail_frac")
    share = f"{100 * frac:g}%" if isinstance(frac, int | float) else "a share"
    by_tail = f"the {share} of live latents with the {'highest' if side == 'high' else 'lowest'} Δnorm"
    sel = acfg.get("selection", "both")
    rule = {"class": by_class, "tail": by_tail}.get(sel, f"{by_class} and {by_tail}")
    cap = acfg.get("max_per_group")
    return f"selected from {rule} (selection={sel}), ranked by Latent Scaling" + (
        f", at most {cap}" if cap else ""
    )


def holds(s: dict[str, Any]) -> str:
    """What the group holds: robust members vs tail-only ones, Δnorm range, median ν."""
    parts = [
        f"{s['n_robust']} robust {s['model']}-only, {s['n_tail_only']} from the Δnorm tail only",
    ]
    if s["delta_norm_min"] is not None:
        parts.append(f"Δnorm {fmt(s['delta_norm_min'])}–{fmt(s['delta_norm_max'])}")
    if s["nu_eps_median"] is not None or s["nu_r_median"] is not None:
        parts.append(f"median ν^ε {fmt(s['nu_eps_median'], 2)}, ν^r {fmt(s['nu_r_median'], 2)}")
    return "; ".join(parts)


def tail_note(s: dict[str, Any]) -> str | None:
    """The caveat of a group without any robust model-only latent; None when it has one (or is empty)."""
    if not s["n"] or s["n_robust"]:
        return None
    end = "high" if s["tail_side"] == "high" else "low"
    return (
        f"No {s['model']}-specific latent is robust {s['model']}-only: these are the most "
        f"{s['model']}-leaning latents of a shared dictionary (the {end} tail of the Δnorm distribution), "
        f"not latents absent from {s['other']}."
    )


def heading(group: str, s: dict[str, Any] | None, n_cards: int) -> str:
    """A group section's title: size, composition, and how many cards are shown when capped."""
    if not s or not s["n"]:
        return f"{group} latents (none selected)"
    n = s["n"]
    shown = f"all {n} shown" if n_cards >= n else f"first {n_cards} of {n} shown"
    kind = (
        "Δnorm tail"
        if not s["n_robust"]
        else ("robust" if not s["n_tail_only"] else f"{s['n_robust']} robust + {s['n_tail_only']} Δnorm tail")
    )
    return f"{group} latents ({n}, {kind}; {shown}, most robust first)"
