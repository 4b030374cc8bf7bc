"""Several comparisons over one crosscoder, and the anchored category shift between them.

The paper compares two fine-tunes of one base through their own specific latents: SimPO-only
latents of the pt–SimPO crosscoder against it-only latents of the pt–it crosscoder. With one
N-model crosscoder over (pt, it, SimPO), crossdiff analyses each pair (pt, it) and (pt, SimPO)
in its own directory, RUN/compare/<A>-vs-<B>/ (which links the shared crosscoder and metrics),
and reports

    Δ_c = (n_c^S / N^S) / (n_c^I / N^I) − 1,   S = <S>-specific of (A, S),  I = <I>-specific of (A, I)
"""

from __future__ import annotations

import os
from collections import Counter
from pathlib import Path

from diffing.evidence import iter_evidence, read_labels
from diffing.stats import category_shift

SHARED = ("crosscoder", "metrics.json", "run_config.json")


def comparison_dir(run: Path, pair: tuple[str, str], n_pairs: int) -> Path:
    """Where a comparison's analysis lives: RUN itself for one pair, else RUN/compare/<A>-vs-<B>/."""
    return run if n_pairs == 1 else run / "compare" / f"{pair[0]}-vs-{pair[1]}"


def run_roots(d: Path) -> tuple[Path, ...]:
    """Where a comparison directory's pipeline run may keep its pipeline.json: `d` itself, and the
    run above RUN/compare/<A>-vs-<B>/."""
    return (d, d.parent.parent) if d.parent.name == "compare" else (d,)


def pair_dir(run: Path, pair: tuple[str, str], n_pairs: int) -> Path:
    """comparison_dir, made, with the shared crosscoder linked in."""
    d = comparison_dir(run, pair, n_pairs)
    if n_pairs == 1:
        return d
    d.mkdir(parents=True, exist_ok=True)
    for name in SHARED:  # the fitted crosscoder is shared by every comparison
        link, target = d / name, run / name
        if target.exists() and not link.exists():
            os.symlink(os.path.relpath(target, d), link)
    return d


def stale_dirs(run: Path, pairs: tuple[tuple[str, str], ...]) -> list[Path]:
    """Analyses the current comparisons do not use: RUN/compare/<A>-vs-<B>/ of a pair no longer
    compared, all of RUN/compare/ for a single pair, and RUN's own analysis for several pairs
    (their report would otherwise sit beside the new ones and read as this run's)."""
    compare = run / "compare"
    if len(pairs) == 1:
        return [compare] if compare.is_dir() else []
    keep = {f"{a}-vs-{b}" for a, b in pairs}
    out = (
        [d for d in sorted(compare.iterdir()) if d.is_dir() and d.name not in keep]
        if compare.is_dir()
        else []
    )
    return out + ([run] if (run / "latents.parquet").exists() else [])


def specific_ids(d: Path, model: str) -> set[int]:
    """The latents selected as <model>-specific in one comparison directory (the groups of its
    latents.parquet, as the report's main shift reads them; the evidence files where there is none)."""
    group = f"{model}-specific"
    lp = d / "latents.parquet"
    if lp.exists():
        import pyarrow.parquet as pq

        t = pq.read_table(lp, columns=["latent", "group"])
        return {i for i, g in zip(t["latent"].to_pylist(), t["group"].to_pylist(), strict=True) if g == group}
    return {e.latent for e in iter_evidence(d) if e.group == group}


def specific_counts(d: Path, model: str) -> Counter:
    """Judge categories of the latents selected as <model>-specific in one comparison directory."""
    labels = read_labels(d)
    return Counter(labels[i].category for i in specific_ids(d, model) if i in labels)


def anchored_section(dirs: dict[str, Path], s_model: str, i_model: str, opts=None) -> dict:
    """Report section: category shift of S's specific latents (its comparison) vs I's (its own),
    with the intervals `opts` (a ReportConfig) chooses; all comparisons share one crosscoder."""
    s, i = (dirs[s_model], s_model, dirs[s_model].name), (dirs[i_model], i_model, dirs[i_model].name)
    return anchored_between(s, i, opts=opts, shared_dictionary=True)


def anchored_between(
    s: tuple[Path, str, str], i: tuple[Path, str, str], *, opts=None, shared_dictionary: bool = True
) -> dict:
    """The anchored section from S = (directory, model, where) and I = (directory, model, where):
    the directories' <model>-specific latents. `shared_dictionary`: both read one crosscoder, so a
    latent id in both groups is one latent (counted as the overlap); two crosscoders share no ids."""
    from jobs.report import _delta, _pct, plots, render
    from jobs.report.config import ReportConfig

    opts = opts or ReportConfig()
    (s_dir, s_model, s_where), (i_dir, i_model, i_where) = s, i
    cs, ci = specific_counts(s_dir, s_model), specific_counts(i_dir, i_model)
    title = f"Anchored category shift: {s_model}-specific vs {i_model}-specific"
    if not cs or not ci:
        msg = f"not enough labels yet ({s_model}: {sum(cs.values())}, {i_model}: {sum(ci.values())})"
        html = f'<p class="muted">{render.esc(msg)}</p>'
        return {"title": title, "html": html, "markdown": msg, "key": "anchored"}
    rows = [r.as_dict() for r in category_shift(cs, ci, **opts.shift_kwargs())]
    s_name, i_name = f"{s_model}-specific ({s_where})", f"{i_model}-specific ({i_where})"
    # over one N-model crosscoder a latent both fine-tunes write can be in S and in I: the two
    # samples are then not independent (the CIs assume they are), and shared ones pull Δ to 0
    both = len(specific_ids(s_dir, s_model) & specific_ids(i_dir, i_model)) if shared_dictionary else 0
    overlap = f"; {both} latents are in both groups (the intervals assume none)" if both else ""
    html = (
        f'<p class="muted">S = {render.esc(s_name)} (N={sum(cs.values())}), '
        f"I = {render.esc(i_name)} (N={sum(ci.values())}){render.esc(overlap)}</p>"
        f'<img alt="anchored category shift" src="{plots.shift_bars(rows, s_name, i_name, opts.ci_label())}">'
        + render.shift_table(rows, opts.ci_label())
    )
    from jobs.report import _md

    md = (
        f"| category | n_S | n_I | Δ_c | {opts.ci_label()} | small |\n|---|---|---|---|---|---|\n"
        + "\n".join(
            f"| {_md(r['category'])} | {r['n_s']} | {r['n_i']} | {_delta(r)} | "
            f"[{_pct(r['ci_low'])}, {_pct(r['ci_high'])}] | {'yes' if r['small_count'] else ''} |"
            for r in rows
        )
    )
    md = f"S = {s_name} (N={sum(cs.values())}), I = {i_name} (N={sum(ci.values())})\n\n" + md
    data = {"S": s_name, "I": i_name, "shift": rows, "overlap": both}
    if both:
        md = f"S and I share {both} latents (the intervals assume independent groups).\n\n" + md
    return {"title": title, "html": html, "markdown": md, "data": data, "key": "anchored"}
