"""The HTML sections of report.html built from the gathered data (jobs.report.gather): overview,
provenance, splice, category shift and the model-specific groups. Kept apart from write_report so
each section's wording can be read, and tested, on its own."""

from __future__ import annotations

from typing import Any

from jobs.report import plots, provenance, selection
from jobs.report.config import ReportConfig
from jobs.report.render import card_html, esc, fmt, shift_table, table_html


def _group_lines(d: dict) -> str:
    """How each model-specific group was selected and what it holds, with the tail caveat."""
    out = []
    for g, s in (d.get("group_selection") or {}).items():
        out.append(
            f"<li><b>{esc(g)}</b> ({s['n']}): {esc(selection.how_selected(s, d['analysis_config']))}; "
            f"holds {esc(selection.holds(s))}.</li>"
        )
    notes = "".join(_note(s) for s in (d.get("group_selection") or {}).values())
    return (f'<ul class="muted">{"".join(out)}</ul>' if out else "") + notes


def _note(s: dict[str, Any]) -> str:
    note = selection.tail_note(s)
    return f'<p class="note"><b>Note:</b> {esc(note)}</p>' if note else ""


def overview(d: dict, n_live: int) -> str:
    a, b = d["pair"]
    kp = [("latents", d["n_latents"]), ("live", n_live), ("robust model-only", d["robust"])]
    kp += [(g, n) for g, n in sorted(d["groups"].items())]
    kp += [("with evidence", d["n_evidence"]), ("labelled", d["n_labels"])]
    kpis = "".join(
        f'<div class="kpi"><b>{esc(fmt(v))}</b><span class="muted">{esc(k)}</span></div>' for k, v in kp
    )
    return (
        f'<p class="muted">run {esc(d["run"])} · pair {esc(a)} vs {esc(b)}</p><div class="kpis">{kpis}</div>'
        + _group_lines(d)
    )


def provenance_html(d: dict) -> str | None:
    rows = provenance.rows((d.get("provenance") or {}).get("run") or {})
    return table_html([list(r) for r in rows], ["field", "value"]) if rows else None


def splice(sp: dict) -> str:
    rows = []
    for name, r in sp["models"].items():
        for v in ("full", "shared_only"):
            if v in r:
                rows.append(
                    [
                        f"{name} ({v})",
                        r["ce_clean"],
                        r[v]["ce"],
                        r[v]["delta_ce"],
                        r[v]["kl"],
                        r[v]["ce_recovered"],
                    ]
                )
    return (
        table_html(rows, ["model", "CE clean", "CE spliced", "ΔCE", "KL", "CE recovered"])
        + f'<p class="muted">{esc(sp.get("n_tokens"))} tokens, layer {esc(sp.get("layer"))}; '
        "shared_only zeroes the model-specific latents</p>"
    )


def category_shift(d: dict, s_name: str, i_name: str, opts: ReportConfig) -> str:
    """The shift chart and table with its interval caption, and the category counts per group."""
    cc = d["category_counts"]
    out = f'<p class="muted">{esc(d["shift_note"])}</p>'
    if d["shift"]:
        fig = plots.shift_figure(d["shift"], s_name, i_name, d["ci_label"], opts.min_count)
        out += f'<img alt="category shift" src="{fig.uri}">'
        out += shift_table(d["shift"], d["ci_label"], s_name, i_name)
        out += f'<p class="muted">{esc(d["ci_caption"])}</p>'
    if any(cc.values()):
        allc = sorted(set().union(*[set(c) for c in cc.values()]))
        # a group the label stage left out has no counts, not zero counts
        cols = [
            g
            for g in (s_name, i_name, "baseline")
            if d["labelled_groups"] is None or g in d["labelled_groups"]
        ]
        out += "<h3>Category counts per group</h3>" + table_html(
            [[c, *(cc[g].get(c, 0) for g in cols)] for c in allc], ["category", *cols]
        )
        if left := [g for g in (s_name, i_name, "baseline") if g not in cols]:
            out += f'<p class="muted">not labelled (label.groups): {esc(", ".join(left))}</p>'
    return out


def group(d: dict, g: str, opts: ReportConfig) -> tuple[str, str]:
    """(title, body) of one model-specific group: what it holds, the tail caveat, its cards."""
    cards = d["cards"].get(g, [])
    s = (d.get("group_selection") or {}).get(g)
    head = ""
    if s and s["n"]:
        head = f'<p class="muted">{esc(selection.how_selected(s, d["analysis_config"]))}; holds '
        head += f"{esc(selection.holds(s))}.</p>" + _note(s)
    pair = tuple(d["pair"])
    body = (
        "".join(card_html(c, pair, opts.contexts_per_card) for c in cards)
        or '<p class="muted">none selected</p>'
    )
    return selection.heading(g, s, len(cards)), head + body
