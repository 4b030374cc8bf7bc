"""`crossdiff report --run RUN`: one self-contained HTML page, report.json and a Markdown summary.

Reads what the earlier stages left in RUN (all optional except latents.parquet): metrics.json
(fit), latents.parquet (analyze), examples/*.jsonl (evidence), labels.jsonl (label), splice.json.
Before labelling the cards carry no labels and there is no category shift; after labelling the
shift Δ_c of S = "<B>-specific" against I = "<A>-specific" comes with counts and confidence
intervals (diffing.stats.category_shift, as `ReportConfig` chooses: 95% Katz by default), beside the
category counts of the random shared baseline.

Other stages add sections through `write_report(run, extra_sections=[...])`: each item is a
`ReportSection`, a dict with the same keys, or a callable taking the run directory and
returning one of those (e.g. the planted-truth validation of the demo).
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from jobs.jsonsafe import json_safe
from jobs.provenance import environment, report_inputs
from jobs.report import plots, render, sections
from jobs.report.config import ReportConfig
from jobs.report.provenance import run_provenance
from jobs.report.selection import group_selection

REPORT_HTML, REPORT_JSON, REPORT_MD = "report.html", "report.json", "report.md"

# the Markdown summary and the cell formats the other sections' Markdown shares
from jobs.report.md import _delta, _md, _metrics_rows, _pct, markdown  # noqa: E402, F401


@dataclass
class ReportSection:
    """An extra report section: HTML body (self-contained), Markdown body, JSON-able data."""

    title: str
    html: str = ""
    markdown: str = ""
    data: Any = None
    key: str = ""


SectionLike = ReportSection | dict | Callable[[Path], "ReportSection | dict"]


ReportOptions = ReportConfig  # the name before ReportConfig became a config


def _labelled_groups(run: Path) -> list[str] | None:
    """The groups the label stage labels (its saved `label.groups`); None: all, or no label stage yet."""
    from jobs.label_state import CONFIG_FILE

    try:
        groups = json.loads((run / CONFIG_FILE).read_text()).get("groups")
    except (OSError, ValueError, AttributeError):
        return None
    return list(groups) if isinstance(groups, list) else None


_clean = json_safe  # the name this module and its callers have used


def _section(s: SectionLike, run: Path) -> ReportSection:
    if callable(s) and not isinstance(s, ReportSection | dict):
        s = s(run)
    if isinstance(s, dict):
        s = ReportSection(**s)
    if not isinstance(s, ReportSection):
        raise TypeError(
            f"extra section must be a ReportSection, a dict or a callable, got {type(s).__name__}"
        )
    return s


def gather(run_dir: str | Path, opts: ReportConfig | None = None) -> dict:
    """Everything the report shows, as JSON-able data."""
    import pyarrow.parquet as pq

    from diffing.analysis import robustness
    from diffing.config import AnalysisConfig
    from diffing.evidence import iter_evidence, read_labels
    from diffing.stats import category_shift

    opts = opts or ReportConfig()
    run = Path(run_dir)
    lp = run / "latents.parquet"
    if not lp.exists():
        pairs = sorted(p.parent.name for p in (run / "compare").glob("*/latents.parquet"))
        if pairs:  # a pipeline run of several comparisons: one report per comparison
            raise FileNotFoundError(
                f"{run} holds {len(pairs)} comparisons ({', '.join(pairs)}): pass --run {run}/compare/<A-vs-B>, "
                "or rerun `crossdiff pipeline` (its report stage adds the anchored and planted sections)"
            )
        raise FileNotFoundError(f"{lp} is missing; run `crossdiff analyze --run {run} --store STORE` first")
    t = pq.read_table(lp)
    meta = {k.decode(): v.decode() for k, v in (t.schema.metadata or {}).items()}
    cols = t.to_pydict()
    pair = tuple(meta.get("pair", "A,B").split(","))
    acfg = json.loads(meta.get("config", "{}"))
    L = t.num_rows
    groups = np.asarray(cols.get("group", [""] * L), dtype=object)
    a, b = pair
    s_name, i_name = f"{b}-specific", f"{a}-specific"
    nu_eps, nu_r = np.asarray(cols["nu_eps"], float), np.asarray(cols["nu_r"], float)
    cuts = AnalysisConfig.model_fields  # an analysis file from before the cuts were saved: the defaults
    score = robustness(
        nu_eps,
        nu_r,
        acfg.get("nu_eps_max", cuts["nu_eps_max"].default),
        acfg.get("nu_r_max", cuts["nu_r_max"].default),
    )
    shown: dict[str, list[int]] = {}  # the latents that get a card: only their evidence is kept
    for g, cap in ((i_name, opts.max_cards), (s_name, opts.max_cards), ("baseline", opts.baseline_cards)):
        idx = np.flatnonzero(groups == g)
        shown[g] = (idx[np.lexsort((idx, score[idx]))][:cap] if g != "baseline" else idx[:cap]).tolist()
    wanted = {i for ids in shown.values() for i in ids}
    evidence, n_evidence = {}, 0  # at the Gemma shape all evidence is ~7,000 latents x 40 contexts
    for e in iter_evidence(run):
        n_evidence += 1
        if e.latent in wanted:
            evidence[e.latent] = e.model_dump()
    labels = {k: v.model_dump() for k, v in read_labels(run).items()}
    labelled = _labelled_groups(run)  # None: every group (or not labelled yet)
    out: dict[str, Any] = {
        "run": str(run),
        "pair": list(pair),
        "n_latents": L,
        "analysis_config": acfg,
        "metrics": json.loads((run / "metrics.json").read_text())
        if (run / "metrics.json").exists()
        else None,
        "splice": json.loads((run / "splice.json").read_text()) if (run / "splice.json").exists() else None,
        "classes": dict(Counter(cols["class"])),
        "robust": int(np.sum(cols["robust"])),
        "groups": {g: int(n) for g, n in Counter(groups.tolist()).items() if g},
        "n_evidence": n_evidence,
        "n_labels": len(set(labels) & set(cols["latent"])),  # labels of this run's latents only
        "report_config": opts.model_dump(mode="json"),
        "ci_label": opts.ci_label(),
        "labelled_groups": labelled,
        # what it was computed from (sha256 prefixes) and with which software: a report sent on
        # can be matched to its run's files, and a stale one told from a current one
        "provenance": {"inputs": report_inputs(run), "environment": environment()},
    }
    out["provenance"]["run"] = run_provenance(run, out["metrics"], labels, out["provenance"]["environment"])
    out["group_selection"] = group_selection(cols, pair)
    cards = {}
    for g, ids in shown.items():
        lst = []
        for i in ids:
            ev = evidence.get(i, {})
            stats = dict(ev.get("stats") or {})
            source = _stats_source(stats, acfg, meta.get("n_tokens"))
            for k in ("delta_norm", "nu_eps", "nu_r", "freq", "mean_act", "max_act"):
                stats.setdefault(k, cols[k][i])
            lst.append(
                {
                    "latent": i,
                    "group": g,
                    "stats": stats,
                    "stats_source": source,
                    "label": labels.get(i),
                    "label_note": None
                    if labelled is None or g in labelled
                    else "not labelled (label.groups leaves this group out)",
                    "source_mass": ev.get("source_mass", {}),
                    "top": ev.get("top", [])[: opts.contexts_per_card],
                }
            )
        cards[g] = lst
    out["cards"] = cards
    # category counts per group and the shift S vs I
    cats: dict[str, Counter] = {}
    for g in (s_name, i_name, "baseline"):
        members = np.flatnonzero(groups == g).tolist()
        cats[g] = Counter(labels[i]["category"] for i in members if i in labels)
    out["category_counts"] = {g: dict(c) for g, c in cats.items()}
    out["shift"] = None
    out["shift_note"] = "no labels yet: run `crossdiff label`" if not labels else ""
    if labels:
        N_s, N_i = sum(cats[s_name].values()), sum(cats[i_name].values())
        if N_s and N_i:
            rows = category_shift(cats[s_name], cats[i_name], **opts.shift_kwargs())
            out["shift"] = [r.as_dict() for r in rows]
            out["ci_caption"] = opts.ci_caption(len(rows))
            out["shift_note"] = f"S = {s_name} ({N_s} labelled), I = {i_name} ({N_i} labelled)"
        else:
            out["shift_note"] = f"a group has no labelled latents ({s_name}: {N_s}, {i_name}: {N_i})"
    out["_arrays"] = {
        "cosine": cols.get("cosine"),  # None in a table without it: no figure
        "delta_norm": cols["delta_norm"],
        "freq": cols["freq"],
        "nu_eps": nu_eps,
        "nu_r": nu_r,
        "groups": groups,
    }
    return out


def _stats_source(ev_stats: dict, acfg: dict, n_tokens: str | None) -> str:
    """Where a card's freq / mean act / max come from: the evidence pass over held-out rows (not
    the rows the latents were selected on) when it recorded them, else the analysis pass."""
    if ev_stats.get("freq") is not None:
        n = ev_stats.get("heldout_tokens")
        tokens = f", {int(n):,} tokens" if n is not None else ""
        return f"held-out{tokens}" if acfg.get("heldout") != "all" else f"evidence pass over all rows{tokens}"
    tokens = f", {int(n_tokens):,} tokens" if n_tokens and n_tokens.isdigit() else ""
    return f"latents.parquet{tokens}"


def write_report(
    run_dir: str | Path,
    *,
    extra_sections: Sequence[SectionLike] = (),
    opts: ReportConfig | None = None,
    title: str | None = None,
) -> dict:
    """Write RUN/report.html, RUN/report.json, RUN/report.md; returns their paths and a summary."""
    from diffing.logs import get_logger

    run = Path(run_dir)
    opts = opts or ReportConfig()
    d = gather(run, opts)
    arr = d.pop("_arrays")
    extras = [_section(s, run) for s in extra_sections]
    pair = tuple(d["pair"])
    a, b = pair
    s_name, i_name = f"{b}-specific", f"{a}-specific"
    dn, freq = np.asarray(arr["delta_norm"], float), np.asarray(arr["freq"], float)
    live = freq > 0
    H = render
    sec: list[tuple[str, str]] = [("Overview", sections.overview(d, int(live.sum())))]
    if prov := sections.provenance_html(d):
        sec.append(("Provenance", prov))
    mrows = _metrics_rows(d["metrics"])
    sec.append(
        (
            "Training",
            H.table_html(mrows, ["metric", "value"]) if mrows else '<p class="muted">no metrics.json</p>',
        )
    )
    if d["splice"]:
        sec.append(("Splice evaluation", sections.splice(d["splice"])))
    imgs = [
        ("Δnorm histogram", plots.delta_norm_hist(dn, live, arr["groups"], d["analysis_config"], pair)),
        ("Latent Scaling ν scatter", plots.nu_scatter(arr["nu_eps"], arr["nu_r"], arr["groups"], d["analysis_config"], pair)),
        ("class counts", plots.count_bars(d["classes"], "classes (absolute Δnorm thresholds)", "latents")),
    ]  # fmt: skip
    if arr["cosine"] is not None:  # an analysis table without the column: no figure
        cos = np.asarray([np.nan if v is None else v for v in arr["cosine"]], float)
        fig = plots.cosine_hist(cos, dn, live, arr["groups"], d["analysis_config"], pair)
        imgs.insert(1, ("decoder cosine histogram", fig))
    grid = "".join(f'<img alt="{alt}" src="{u}">' for alt, u in imgs)
    sec.append(("Latents", f'<div class="grid">{grid}</div>'))
    sec.append(("Category shift", sections.category_shift(d, s_name, i_name, opts)))
    # the other stages' sections are results (planted truth, the anchored shift): beside the
    # shift, before the cards that make up most of the page
    sec += [(e.title, e.html) for e in extras]
    sec += [sections.group(d, g, opts) for g in (i_name, s_name)]
    base = "".join(H.card_html(c, pair, opts.contexts_per_card) for c in d["cards"].get("baseline", []))
    sec.append(
        (
            "Random shared baseline",
            f"<details><summary>{len(d['cards'].get('baseline', []))} cards</summary>{base}</details>",
        )
    )
    page = H.page(title or f"crossdiff report: {a} vs {b}", sec)
    d["sections"] = [{"title": e.title, "key": e.key, "data": e.data} for e in extras]
    paths = {"html": run / REPORT_HTML, "json": run / REPORT_JSON, "markdown": run / REPORT_MD}
    _atomic(paths["html"], page)
    _atomic(paths["json"], json.dumps(_clean(d), indent=1))
    _atomic(paths["markdown"], markdown(d, extras))
    get_logger("report", run=str(run)).info("report.done", html=str(paths["html"]))
    return {
        "html": str(paths["html"]),
        "json": str(paths["json"]),
        "markdown": str(paths["markdown"]),
        "groups": d["groups"],
        "labelled": d["n_labels"],
        "shift": d["shift"] is not None,
    }


def _atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    tmp.replace(path)
