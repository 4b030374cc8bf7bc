"""report.md: the report's Markdown summary, and the cell formatting the other Markdown sections
(planted-truth validation, anchored shift) share."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from jobs.report import plots, render

if TYPE_CHECKING:
    from jobs.report import ReportSection


def _md(text: Any) -> str:
    """Text for one Markdown table cell or bullet: no raw HTML, no column breaks, one line."""
    t = " ".join(str(text).split())
    return t.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;").replace("|", "\\|")


def _metrics_rows(m: dict | None) -> list[list[Any]]:
    rows = []
    for k, v in (m or {}).items():
        if isinstance(v, dict):
            rows += [[f"{k}/{kk}", vv] for kk, vv in v.items()]
        else:
            rows.append([k, v])
    return rows


def _pct(x) -> str:
    if x is not None and math.isinf(x):
        return "+∞" if x > 0 else "−∞"
    return "–" if x is None or not math.isfinite(x) else f"{x * 100:+.1f}%"


def _delta(r: dict) -> str:
    return "only in S" if plots.only_in_s(r) else _pct(r["delta"])


def markdown(d: dict, extras: Sequence[ReportSection] = ()) -> str:
    a, b = d["pair"]
    fmt = render.fmt
    out = [
        f"# crossdiff report: {a} vs {b}",
        "",
        f"Run `{d['run']}`: {d['n_latents']} latents, "
        f"{d['robust']} robust model-only; groups "
        + ", ".join(f"{g} {n}" for g, n in sorted(d["groups"].items()))
        + f"; {d['n_evidence']} with evidence, {d['n_labels']} labelled.",
        "",
    ]
    if d["metrics"]:
        out += ["## Training", ""] + [f"- {k}: {fmt(v)}" for k, v in _metrics_rows(d["metrics"])] + [""]
    if d["splice"]:
        out += ["## Splice", ""]
        for name, r in (d["splice"].get("models") or {}).items():
            full = r.get("full") or {}
            out.append(
                f"- {_md(name)}: ΔCE {fmt(full.get('delta_ce'))}, KL {fmt(full.get('kl'))}, "
                f"CE recovered {fmt(full.get('ce_recovered'))}"
            )
        out.append("")
    out += ["## Classes", ""] + [f"- {k}: {v}" for k, v in sorted(d["classes"].items())] + [""]
    out += ["## Category shift", "", d["shift_note"], ""]
    if d["shift"]:
        out += [f"| category | n_S/N_S | n_I/N_I | Δ_c | {d['ci_label']} | |", "|---|---|---|---|---|---|"]
        for r in d["shift"]:
            out.append(
                f"| {_md(r['category'])} | {r['n_s']}/{r['N_s']} | {r['n_i']}/{r['N_i']} | {_delta(r)} | "
                f"[{_pct(r['ci_low'])}, {_pct(r['ci_high'])}] | {'small count' if r['small_count'] else ''} |"
            )
        out.append("")
    for g in (f"{a}-specific", f"{b}-specific"):
        out += [f"## {g} (top {min(10, len(d['cards'].get(g, [])))})", ""]
        for c in d["cards"].get(g, [])[:10]:
            lab = c["label"]
            desc = f"{_md(lab['category'])}: {_md(lab['explanation'])}" if lab else "(not labelled)"
            out.append(f"- latent {c['latent']} (Δnorm {fmt(c['stats'].get('delta_norm'))}): {desc}")
        out.append("")
    for e in extras:
        out += [f"## {e.title}", "", e.markdown, ""]
    return "\n".join(out)
