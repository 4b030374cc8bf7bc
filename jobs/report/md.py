"""report.md: the report's Markdown summary, and the cell formatting the other Markdown sections
(planted-truth validation, anchored shift) share."""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from jobs.report import plots, provenance, render, selection

if TYPE_CHECKING:
    from jobs.report import ReportSection

# Markdown's inline syntax (links, images, emphasis, code, table cells, headings, strikethrough):
# backslash-escaped in untrusted text, so a judge's explanation cannot become a remote image
_MD_ACTIVE = re.compile(r"([\\`*_\[\]()!|#~])")
_ENTITY = re.compile(r"&(?=#?\w+;)")  # "&" that would start a character reference; a bare "&" stays


def _md(text: Any) -> str:
    """Untrusted text (tokens, explanations, categories, names) for one Markdown table cell or
    bullet: one line, Markdown's active characters backslash-escaped, no raw HTML (< > as
    entities, which every viewer shows as the characters), and "a & b" left as written."""
    t = " ".join(str(text).split())
    t = _ENTITY.sub("&amp;", _MD_ACTIVE.sub(r"\\\1", t))
    return t.replace("<", "&lt;").replace(">", "&gt;")


def _metrics_rows(m: dict | None) -> list[list[Any]]:
    rows = []
    for k, v in (m or {}).items():
        if isinstance(v, dict):
            rows += [[f"{k}/{kk}", vv] for kk, vv in v.items()]
        else:
            rows.append([k, v])
    return rows


def _pct(x) -> str:
    """A share ratio − 1 as a signed percent: one decimal, none from ±1000% on ("+1410%")."""
    if x is not None and math.isinf(x):
        return "+∞" if x > 0 else "−∞"
    if x is None or not math.isfinite(x):
        return "–"
    v = x * 100
    return f"{v:+.0f}%" if abs(v) >= 1000 else f"{v:+.1f}%"


def _delta(r: dict, s_name: str = "S", i_name: str = "I") -> str:
    """The Δ_c cell: a percent, or which side alone has the category (Δ undefined or −100%)."""
    if plots.only_in_s(r):
        return f"only in {s_name}"
    if r.get("only_in") == "I" or (r["n_s"] == 0 and r["n_i"] > 0):
        return f"only in {i_name} ({_pct(r['delta'])})"
    return _pct(r["delta"])


def _groups_md(d: dict) -> list[str]:
    """One bullet per model-specific group: how it was selected, what it holds, the tail caveat."""
    out = []
    for g, s in (d.get("group_selection") or {}).items():
        out.append(
            f"- **{_md(g)}** ({s['n']}): {_md_plain(selection.how_selected(s, d['analysis_config']))}; "
            f"holds {_md_plain(selection.holds(s))}."
        )
        if note := selection.tail_note(s):
            out.append(f"  - **Note:** {_md_plain(note)}")
    return out + [""] if out else []


def _md_plain(text: str) -> str:
    """Our own prose with names in it: only what would break a line or form markup is escaped."""
    return _md(text).replace("\\(", "(").replace("\\)", ")")


def _provenance_md(d: dict) -> list[str]:
    rows = provenance.rows((d.get("provenance") or {}).get("run") or {})
    return ["## Provenance", "", *(f"- {_md_plain(k)}: {_md_plain(v)}" for k, v in rows), ""] if rows else []


def _shift_md(d: dict, s_name: str, i_name: str) -> list[str]:
    out = ["## Category shift", "", d["shift_note"], ""]
    if not d["shift"]:
        return out
    out += [f"| category | n_S/N_S | n_I/N_I | Δ_c | {d['ci_label']} | |", "|---|---|---|---|---|---|"]
    for r in d["shift"]:
        out.append(
            f"| {_md(r['category'])} | {r['n_s']}/{r['N_s']} | {r['n_i']}/{r['N_i']} | "
            f"{_delta(r, _md(s_name), _md(i_name))} | [{_pct(r['ci_low'])}, {_pct(r['ci_high'])}] | "
            f"{'small count' if r['small_count'] else ''} |"
        )
    return [*out, "", f"_{d['ci_caption']}_" if d.get("ci_caption") else "", ""]


def markdown(d: dict, extras: Sequence[ReportSection] = ()) -> str:
    a, b = d["pair"]
    fmt = render.fmt
    out = [
        f"# crossdiff report: {_md(a)} vs {_md(b)}",
        "",
        f"Run `{d['run']}`: {d['n_latents']} latents, "
        f"{d['robust']} robust model-only; groups "
        + ", ".join(f"{_md(g)} {n}" for g, n in sorted(d["groups"].items()))
        + f"; {d['n_evidence']} with evidence, {d['n_labels']} labelled.",
        "",
        *_groups_md(d),
        *_provenance_md(d),
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
    out += _shift_md(d, f"{b}-specific", f"{a}-specific")
    for e in extras:  # results beside the shift, before the latent lists
        out += [f"## {e.title}", "", e.markdown, ""]
    for g in (f"{a}-specific", f"{b}-specific"):
        cards = d["cards"].get(g, [])[:10]
        s = (d.get("group_selection") or {}).get(g)
        out += [f"## {_md_plain(selection.heading(g, s, len(cards)))}", ""]
        if s and s["n"]:
            out += [f"Holds {_md_plain(selection.holds(s))}.", ""]
            if note := selection.tail_note(s):
                out += [f"**Note:** {_md_plain(note)}", ""]
        for c in cards:
            lab = c["label"]
            desc = f"{_md(lab['category'])}: {_md(lab['explanation'])}" if lab else "(not labelled)"
            out.append(f"- latent {c['latent']} (Δnorm {fmt(c['stats'].get('delta_norm'))}): {desc}")
        out.append("")
    return "\n".join(out)
