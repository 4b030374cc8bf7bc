"""Report figures: matplotlib (Agg) rendered to PNG data URIs, so the page needs no other file."""

from __future__ import annotations

import base64
import io
import math

import numpy as np

COLORS = {"A": "#d9480f", "B": "#1971c2", "baseline": "#868e96", "": "#ced4da"}


def _plt():
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    return plt


def to_data_uri(fig) -> str:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight", metadata={"Software": None})
    _plt().close(fig)
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def _group_names(pair: tuple[str, str]) -> tuple[str, str, str]:
    return (f"{pair[0]}-specific", f"{pair[1]}-specific", "baseline")


def group_colors(groups: np.ndarray, pair: tuple[str, str]) -> list[str]:
    a, b = pair
    m = {f"{a}-specific": COLORS["A"], f"{b}-specific": COLORS["B"], "baseline": COLORS["baseline"]}
    return [m.get(g, COLORS[""]) for g in groups]


def delta_norm_hist(
    dn: np.ndarray, live: np.ndarray, groups: np.ndarray, cfg: dict, pair: tuple[str, str]
) -> str:
    """Histogram of Δnorm over live latents with the class thresholds and the selected groups."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(7.5, 3.2))
    bins = np.linspace(0, 1, 51)
    ax.hist(dn[live], bins=bins, color="#adb5bd", label="live latents")
    a, b = pair
    for g, c in (
        (f"{a}-specific", COLORS["A"]),
        (f"{b}-specific", COLORS["B"]),
        ("baseline", COLORS["baseline"]),
    ):
        sel = live & (groups == g)
        if sel.any():
            ax.hist(dn[sel], bins=bins, color=c, alpha=0.85, label=_no_math(f"{g} ({int(sel.sum())})"))
    for x, lab in (
        (cfg.get("only_low"), f"{b}-only <"),
        (cfg.get("shared_low"), "shared"),
        (1 - cfg["shared_low"] if "shared_low" in cfg else None, None),
        (cfg.get("only_high"), f"> {a}-only"),
    ):
        if x is not None:
            ax.axvline(x, color="#212529", ls="--", lw=0.8)
            if lab:
                ax.text(x, ax.get_ylim()[1] * 0.95, _no_math(f" {lab}"), fontsize=7, va="top")
    ax.set_yscale("log")
    ax.set_xlabel(_no_math(f"Δnorm  (0 = {b}-only, 1 = {a}-only)"))
    ax.set_ylabel("latents")
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0), frameon=False)
    return to_data_uri(fig)


def nu_scatter(
    nu_eps: np.ndarray, nu_r: np.ndarray, groups: np.ndarray, cfg: dict, pair: tuple[str, str]
) -> str:
    """ν^ε vs ν^r of the selected latents and the baseline (robust: lower-left box)."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(4.6, 4.0))
    a, b = pair
    shown = 0
    for g, c in (
        (f"{a}-specific", COLORS["A"]),
        (f"{b}-specific", COLORS["B"]),
        ("baseline", COLORS["baseline"]),
    ):
        sel = (groups == g) & np.isfinite(nu_eps) & np.isfinite(nu_r)
        if sel.any():
            ax.scatter(nu_eps[sel], nu_r[sel], s=14, color=c, alpha=0.8, label=_no_math(g), edgecolors="none")
            shown += int(sel.sum())
    ex, rx = cfg.get("nu_eps_max", 0.2), cfg.get("nu_r_max", 0.5)
    # robust: |ν^ε| < nu_eps_max and |ν^r| < nu_r_max (diffing.analysis)
    ax.add_patch(_plt().Rectangle((-ex, -rx), 2 * ex, 2 * rx, fill=False, ls="--", lw=0.8, color="#212529"))
    fin = [v[np.isin(groups, list(_group_names(pair))) & np.isfinite(v)] for v in (nu_eps, nu_r)]
    lo = [max(-1.0, min(-0.1, float(f.min()) - 0.05)) if len(f) else -0.1 for f in fin]
    ax.set_xlim(lo[0], 1.5)
    ax.set_ylim(lo[1], 1.5)
    both = np.isfinite(nu_eps) & np.isfinite(nu_r)
    e_, r_ = nu_eps[both], nu_r[both]
    outside = int(((e_ < lo[0]) | (e_ > 1.5) | (r_ < lo[1]) | (r_ > 1.5)).sum())
    if outside:
        ax.text(0.99, 0.01, f"{outside} outside the axes", transform=ax.transAxes, ha="right", fontsize=7)
    ax.set_xlabel("ν^ε (error target)")
    ax.set_ylabel("ν^r (reconstruction target)")
    ax.set_title("Latent Scaling: small ν = specific", fontsize=9)
    if shown:
        ax.legend(fontsize=7)
    else:
        ax.text(0.6, 0.6, "no latents with finite ν", ha="center")
    return to_data_uri(fig)


def count_bars(counts: dict[str, int], title: str) -> str:
    plt = _plt()
    items = sorted(counts.items(), key=lambda kv: -kv[1])
    fig, ax = plt.subplots(figsize=(5.0, 0.35 * max(len(items), 2) + 0.8))
    ax.barh([_no_math(k) for k, _ in items][::-1], [v for _, v in items][::-1], color="#495057")
    for i, (_, v) in enumerate(items[::-1]):
        ax.text(v, i, f" {v}", va="center", fontsize=8)
    ax.set_xlim(0, max((v for _, v in items), default=1) * 1.15)
    ax.set_title(_no_math(title), fontsize=9)
    return to_data_uri(fig)


def only_in_s(r: dict) -> bool:
    """A shift row whose category no I latent has: Δ is undefined, the category is S's alone."""
    return r["n_i"] == 0 and r["n_s"] > 0 and (r["delta"] is None or not math.isfinite(r["delta"]))


def _no_math(text: str) -> str:
    """Names as written: matplotlib reads text between two $ as math (and fails on bad TeX)."""
    return text.replace("$", r"\$")


def shift_bars(rows: list[dict], s_name: str, i_name: str, ci_label: str = "95% CI") -> str:
    """Δ_c per category with its CI (percent); small-count categories hatched."""
    plt = _plt()
    cap = 400.0  # percent: longer bars end here, with their value written at the end
    rows = [r for r in rows if (r["delta"] is not None and math.isfinite(r["delta"])) or only_in_s(r)]
    fig, ax = plt.subplots(figsize=(7.5, 0.42 * max(len(rows), 2) + 1.0))
    if not rows:
        ax.text(0.5, 0.5, "no category present in both sets", ha="center")
        ax.axis("off")
        return to_data_uri(fig)
    rows = rows[::-1]
    y = np.arange(len(rows))
    only = np.array([only_in_s(r) for r in rows])
    d = np.array([cap if o else r["delta"] * 100 for r, o in zip(rows, only, strict=True)])
    lo = np.array([d[i] if only[i] or r["ci_low"] is None else r["ci_low"] * 100 for i, r in enumerate(rows)])
    hi = np.array(
        [d[i] if only[i] or r["ci_high"] is None else r["ci_high"] * 100 for i, r in enumerate(rows)]
    )
    hi = np.minimum(hi, cap)  # +inf bounds (Haldane) and CIs past the cap end at the edge
    shown = np.minimum(d, cap)
    colors = [COLORS["B"] if v > 0 else COLORS["A"] for v in d]
    bars = ax.barh(y, shown, color=colors, alpha=0.85)
    for bar, r, o in zip(bars, rows, only, strict=True):
        if r.get("small_count") or o:
            bar.set_hatch("//")
    for i, r in enumerate(rows):
        if only[i]:
            ax.text(cap, i, f" only in S (n={r['n_s']})", va="center", fontsize=7)
        elif d[i] > cap:
            ax.text(cap, i, f" {d[i]:+.0f}%", va="center", fontsize=7)
    d = shown
    # a count of 0 gets a continuity-corrected CI that need not contain the raw estimate: clip
    ax.errorbar(
        d,
        y,
        xerr=[np.clip(d - lo, 0, None), np.clip(hi - d, 0, None)],
        fmt="none",
        ecolor="#212529",
        capsize=3,
        lw=1,
    )
    ax.set_yticks(y, [_no_math(f"{r['category']}  ({r['n_s']}:{r['n_i']})") for r in rows], fontsize=8)
    ax.axvline(0, color="#212529", lw=0.8)
    right = min(max(float(np.max(hi)), float(np.max(d))), cap)
    ax.set_xlim(-105, right + (60 if (only.any() or right >= cap) else 15))  # room for the end notes
    ax.set_xlabel(
        _no_math(f"Δ_c (%) of {s_name} vs {i_name} latents, {ci_label}; labels: category (n_S:n_I)")
    )
    return to_data_uri(fig)
