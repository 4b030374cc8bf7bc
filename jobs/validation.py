"""The planted-truth section of the demo report (numbers from diffing.validation)."""

from __future__ import annotations

import html
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from diffing.validation import planted_truth

# Targets of the embedded demo (issue "The main job"); docs/validation.md reports the measured values.
TARGETS = {"mass_rate_ft_specific": 0.80, "enrichment": 3.0, "judge_agreement": 0.70}


def _delta_pct(d: dict, s_name: str = "S") -> str:
    """A planted capability's Δ_c as the shift table writes it (percent; "only in <S group>")."""
    from jobs.report import _pct

    return f"only in {s_name}" if d.get("only_in") == "S" else _pct(d["delta"])


def _ci(d: dict) -> str:
    """The capability's interval as the shift table writes it; "–" where the category is in neither."""
    from jobs.report import _pct

    if d.get("ci_low") is None and d.get("ci_high") is None:
        return "–"
    return f"[{_pct(d.get('ci_low'))}, {_pct(d.get('ci_high'))}]"


def _ok(d: dict, yes: str) -> str:
    """The sign check (the validation target), qualified when the interval still holds 0: the sign
    is right, but the data do not rule out no shift."""
    if not d["ok"]:
        return "no" if yes == "yes" else "✗"
    return yes if d.get("ci_excludes_zero") else f"{yes} (sign only: CI includes 0)"


def _fmt(x) -> str:
    if x is None:
        return "—"
    if isinstance(x, float):
        if math.isnan(x):
            return "n/a"
        if math.isinf(x):
            return "∞"
        return f"{x:.2f}"
    return str(x)


def planted_section(
    run: str | Path, planted: Sequence[Mapping[str, str]], pair: tuple[str, str], opts: Any = None
) -> dict:
    """A report section (title, html, markdown, data) checking the run against planted truth;
    `opts` (a ReportConfig): the direction check's intervals, as the main shift table's."""
    from jobs.report.config import ReportConfig

    opts = opts or ReportConfig()
    r = planted_truth(run, planted, pair, shift_kwargs=opts.shift_kwargs())
    a, b = pair
    s_name, ci_label = html.escape(f"{b}-specific"), opts.ci_label()
    rows = [
        (
            f"{b}-specific latents with most activation mass on planted prompts",
            r["mass_rate_ft_specific"],
            f"≥ {TARGETS['mass_rate_ft_specific']:.2f}",
        ),
        (
            f"same, the {r['n_shared']} live shared latents outside the model-specific groups",
            r["mass_rate_shared"],
            "",
        ),
        (f"same, the {r['n_baseline']} sampled baseline latents", r["mass_rate_baseline"], ""),
        (f"enrichment over {r['enrichment_vs']}", r["enrichment"], f"≥ {TARGETS['enrichment']:.1f}×"),
        (f"{a}-specific latents with most mass on planted prompts", r["mass_rate_base_specific"], ""),
        (
            f"judge category = planted category ({r['judged']} latents with a planted dominant source)",
            r["judge_agreement"],
            f"≥ {TARGETS['judge_agreement']:.2f}",
        ),
    ]
    checks = {k: (not math.isnan(r[k])) and r[k] >= t for k, t in TARGETS.items() if isinstance(r[k], float)}
    direction = r["direction"]
    trs = "".join(
        f"<tr><td>{html.escape(n)}</td><td>{_fmt(v)}</td><td>{html.escape(t)}</td></tr>" for n, v, t in rows
    )
    drows = "".join(
        f"<tr><td>{html.escape(name)}</td><td>{html.escape(d['category'])}</td><td>{html.escape(d['expected'])}</td>"
        f"<td>{_delta_pct(d, s_name)}</td><td>{_ci(d)}</td><td>{_ok(d, '✓')}</td></tr>"
        for name, d in direction.items()
    )
    body = (
        "<p>The embedded fine-tune planted these capabilities; this section checks that the latents "
        f"the pipeline selects as {html.escape(b)}-specific fire on the planted prompts (corpus source "
        "tags, never shown to the judge) and that the judge names them.</p>"
        f"<table><tr><th>measure</th><th>value</th><th>target</th></tr>{trs}</table>"
    )
    if drows:
        body += (
            "<h3>Direction of the category shift</h3><table><tr><th>capability</th><th>category</th>"
            f"<th>planted as</th><th>Δ_c</th><th>{html.escape(ci_label)}</th><th>ok (sign)</th></tr>"
            f"{drows}</table>"
        )
    else:
        body += '<p class="muted">No labels yet: the shift direction is checked after labelling.</p>'
    from jobs.report import _md
    from jobs.report.md import _md_plain

    md = "\n".join(
        ["| measure | value | target |", "|---|---|---|"]
        + [f"| {_md_plain(n)} | {_fmt(v)} | {t} |" for n, v, t in rows]
    )
    if direction:
        md += (
            f"\n\n| capability | category | planted as | Δ_c | {ci_label} | ok (sign) |\n|---|---|---|---|---|---|\n"
            + "\n".join(
                f"| {_md(n)} | {_md(d['category'])} | {_md(d['expected'])} | {_delta_pct(d, _md(f'{b}-specific'))} | "
                f"{_ci(d)} | {_ok(d, 'yes')} |"
                for n, d in direction.items()
            )
        )
    data = {k: v for k, v in r.items() if k != "latents"} | {"checks": checks, "targets": TARGETS}
    return {"title": "Planted-truth validation", "html": body, "markdown": md, "data": data, "key": "planted"}
