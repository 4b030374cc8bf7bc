"""Report figures: matplotlib (Agg) rendered to PNG data URIs, so the page needs no other file."""

from __future__ import annotations

import base64
import io
import math
from dataclasses import dataclass, field

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


def cosine_hist(
    cos: np.ndarray, dn: np.ndarray, live: np.ndarray, groups: np.ndarray, cfg: dict, pair: tuple[str, str]
) -> str:
    """Cosine similarity of each latent's two decoder vectors (A's and B's), for the live latents
    of the shared Δnorm band and for the selected groups: shared latents that write the same
    direction in both models sit near 1 (Lindsey et al. 2024's check of a crosscoder's sharing)."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(7.5, 3.0))
    bins = np.linspace(-1, 1, 81)
    lo = cfg.get("shared_low", 0.4)
    fin = live & np.isfinite(cos)
    shared = fin & (dn >= lo) & (dn <= 1 - lo)
    if shared.any():
        ax.hist(cos[shared], bins=bins, color="#adb5bd", label=_no_math(f"shared band ({int(shared.sum())})"))
    a, b = pair
    for g, c in ((f"{a}-specific", COLORS["A"]), (f"{b}-specific", COLORS["B"])):
        sel = fin & (groups == g)
        if sel.any():
            ax.hist(cos[sel], bins=bins, color=c, alpha=0.85, label=_no_math(f"{g} ({int(sel.sum())})"))
    if not fin.any():
        ax.text(0.0, 0.5, "no latents with two non-zero decoders", ha="center", transform=ax.transData)
    ax.set_yscale("log")
    ax.set_xlim(-1, 1)
    ax.set_xlabel(_no_math(f"decoder cosine similarity ({a} vs {b})"))
    ax.set_ylabel("latents")
    if shared.any() or fin[np.isin(groups, [f"{a}-specific", f"{b}-specific"])].any():
        ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0), frameon=False)
    return to_data_uri(fig)


def count_bars(counts: dict[str, int], title: str, xlabel: str = "latents") -> str:
    plt = _plt()
    items = sorted(counts.items(), key=lambda kv: -kv[1])
    fig, ax = plt.subplots(figsize=(5.0, 0.35 * max(len(items), 2) + 0.8))
    ax.barh([_no_math(k) for k, _ in items][::-1], [v for _, v in items][::-1], color="#495057")
    for i, (_, v) in enumerate(items[::-1]):
        ax.text(v, i, f" {v}", va="center", fontsize=8)
    ax.set_xlim(0, max((v for _, v in items), default=1) * 1.15)
    ax.set_title(_no_math(title), fontsize=9)
    ax.set_xlabel(_no_math(xlabel))
    return to_data_uri(fig)


def only_in_s(r: dict) -> bool:
    """A shift row whose category no I latent has: Δ is undefined, the category is S's alone."""
    return r["n_i"] == 0 and r["n_s"] > 0 and (r["delta"] is None or not math.isfinite(r["delta"]))


def _no_math(text: str) -> str:
    """Names as written: matplotlib reads text between two $ as math (and fails on bad TeX)."""
    return text.replace("$", r"\$")


def shift_bars(
    rows: list[dict], s_name: str, i_name: str, ci_label: str = "95% CI", min_count: int | None = None
) -> str:
    """Δ_c per category with its CI (percent), as a PNG data URI (see shift_figure)."""
    return shift_figure(rows, s_name, i_name, ci_label, min_count).uri


@dataclass
class ShiftFigure:
    """The chart and the notes written on it (clipped ends with their true values, "only in" rows),
    so that what the picture says can be checked without reading pixels."""

    uri: str
    notes: list[str] = field(default_factory=list)
    legend: list[str] = field(default_factory=list)
    bars: dict[str, float | None] = field(default_factory=dict)  # drawn length (%); None: no bar


CAP = 400.0  # percent: the axis ends here; longer bars and CI ends get an arrow and their value


def _end(v: float | None) -> str:
    return "+∞" if v is None or math.isinf(v) else f"{v:+.0f}%"


def shift_figure(
    rows: list[dict], s_name: str, i_name: str, ci_label: str = "95% CI", min_count: int | None = None
) -> ShiftFigure:
    """Δ_c per category with its CI (percent). A category only S has (Δ undefined, upper bound +∞)
    is drawn as a marker at its CI's lower end with an arrow to the edge, not as a bar; bars and CI
    ends past CAP end in an arrow with their true value written beside the row; small-count
    categories are hatched; a legend says so."""
    plt = _plt()
    rows = [r for r in rows if (r["delta"] is not None and math.isfinite(r["delta"])) or only_in_s(r)]
    fig, ax = plt.subplots(figsize=(7.5, 0.42 * max(len(rows), 2) + 1.4))
    if not rows:
        ax.text(0.5, 0.5, "no category present in both sets", ha="center")
        ax.axis("off")
        return ShiftFigure(to_data_uri(fig))
    rows = rows[::-1]
    notes: list[str] = []
    bars: dict[str, float | None] = {}
    clipped = hatched = False
    his = []
    for y, r in enumerate(rows):
        lo = -100.0 if r["ci_low"] is None else r["ci_low"] * 100
        hi = math.inf if r["ci_high"] is None else r["ci_high"] * 100
        his.append(hi)
        note = []
        if only_in_s(r):
            x0 = min(lo, CAP)
            ax.plot([x0], [y], marker="|", ms=10, mew=1.5, color=COLORS["B"])
            ax.annotate(
                "",
                xy=(CAP, y),
                xytext=(x0, y),
                arrowprops={"arrowstyle": "->", "color": COLORS["B"], "lw": 1.5},
            )
            note.append(f"only in {s_name} (n={r['n_s']}): Δ ≥ {_end(lo)}")
            clipped |= lo > CAP
            bars[r["category"]] = None
        else:
            d = r["delta"] * 100
            bar = ax.barh(y, min(d, CAP), color=COLORS["B"] if d > 0 else COLORS["A"], alpha=0.85)
            bars[r["category"]] = min(d, CAP)
            if r.get("small_count"):
                bar[0].set_hatch("//")
                hatched = True
            if r.get("only_in") == "I" or (r["n_s"] == 0 and r["n_i"] > 0):
                note.append(f"only in {i_name} (n={r['n_i']})")
            x_lo = min(lo, CAP)
            ax.plot([x_lo, min(hi, CAP)], [y, y], color="#212529", lw=1)
            ax.plot([x_lo], [y], marker="|", ms=7, color="#212529")
            if d > CAP:
                note.append(f"Δ {_end(d)}")
                clipped = True
            if hi > CAP:
                ax.plot([CAP], [y], marker=">", ms=6, color="#212529", clip_on=False, zorder=5)
                note.append(f"CI to {_end(hi)}")
                clipped = True
            else:
                ax.plot([hi], [y], marker="|", ms=7, color="#212529")
        if note:
            text = _no_math("; ".join(note))
            ax.annotate(
                text,
                xy=(1.0, y),
                xycoords=("axes fraction", "data"),
                xytext=(4, 0),
                textcoords="offset points",
                va="center",
                fontsize=7,
                annotation_clip=False,
            )
            notes.append(f"{r['category']}: {'; '.join(note)}")
    y = np.arange(len(rows))
    ax.set_yticks(y, [_no_math(f"{r['category']}  ({r['n_s']}:{r['n_i']})") for r in rows], fontsize=8)
    ax.axvline(0, color="#212529", lw=0.8)
    finite = [min(h, CAP) for h in his] + [min(r["delta"] * 100, CAP) for r in rows if not only_in_s(r)]
    right = CAP if clipped or any(only_in_s(r) for r in rows) else min(max(finite) + 15, CAP)
    ax.set_xlim(-105, right)
    ax.set_ylim(-0.6, len(rows) - 0.4)
    ax.set_xlabel(
        _no_math(f"Δ_c (%) of {s_name} vs {i_name} latents, {ci_label}; labels: category (n_S:n_I)")
    )
    legend = _shift_legend(ax, s_name, i_name, hatched, clipped, any(only_in_s(r) for r in rows), min_count)
    return ShiftFigure(to_data_uri(fig), notes, legend, bars)


def _shift_legend(ax, s_name, i_name, hatched, clipped, only, min_count) -> list[str]:
    """Colours, hatching and arrows explained above the chart; returns the entries' texts."""
    from matplotlib.lines import Line2D
    from matplotlib.patches import Patch

    items = [
        (Patch(color=COLORS["B"], alpha=0.85), f"more common in {s_name}"),
        (Patch(color=COLORS["A"], alpha=0.85), f"more common in {i_name}"),
    ]
    if hatched:
        below = f"< {min_count}" if min_count is not None else "few"
        items.append(
            (Patch(facecolor="white", edgecolor="#495057", hatch="//"), f"small count ({below} on a side)")
        )
    if only:
        items.append(
            (
                Line2D([], [], color=COLORS["B"], marker="|", ms=8, lw=1.5),
                f"only in {s_name}: CI lower end →, Δ unbounded",
            )
        )
    if clipped:
        items.append(
            (
                Line2D([], [], color="#212529", marker=">", ls="none", ms=6),
                f"beyond {CAP:.0f}%: value written at right",
            )
        )
    labels = [_no_math(t) for _, t in items]
    ax.legend(
        [h for h, _ in items],
        labels,
        loc="lower left",
        bbox_to_anchor=(0.0, 1.01),
        ncol=2,
        fontsize=7,
        frameon=False,
    )
    return [t for _, t in items]
