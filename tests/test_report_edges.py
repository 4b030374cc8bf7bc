"""The report on runs the demo never makes: taxonomies whose names hold markup, `|` or `$`,
categories only one side has, shifts past the chart's edge, comparisons without evidence files,
stores without sources, and labels left over from an older analysis."""

import json
import math
import shutil

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from test_report import _groups, run  # noqa: F401 - the module's small run fixture

from diffing.evidence import LABELS_FILE, LatentLabel, write_jsonl
from diffing.validation import _rate
from jobs.analyze import clear_outputs
from jobs.compare import anchored_section, specific_counts
from jobs.report import write_report

ODD = ["a|b <script>alert(1)</script>", r"cost $\frac$ b", "plain"]


def _label_all(run_dir, cats_for):
    g = _groups(run_dir)
    labels = [
        LatentLabel(latent=lat, explanation=f"latent {lat}", category=cats_for(grp, j), confidence=0.5)
        for grp in ("chat-specific", "base-specific")
        for j, lat in enumerate(g[grp])
    ]
    write_jsonl(run_dir / LABELS_FILE, labels)
    return g


def test_odd_category_names_keep_tables_whole_and_markup_inert(run, tmp_path):  # noqa: F811
    r = tmp_path / "run"
    shutil.copytree(run, r)
    # chat-specific (S) has all three; base-specific (I) never has ODD[0]: only in S, with n_I = 0
    _label_all(r, lambda grp, j: ODD[j % 3] if grp == "chat-specific" else ODD[1 + j % 2])
    write_report(r)  # `$\frac$` is bad TeX for matplotlib: the chart must still be drawn
    md = (r / "report.md").read_text()
    assert "<script" not in md and "<script" not in (r / "report.html").read_text()
    table = [ln for ln in md.splitlines() if ln.startswith("| ") and "/" in ln and "category" not in ln]
    assert table and all(ln.replace("\\|", "").count("|") == 7 for ln in table), table
    only = next(ln for ln in table if "alert" in ln)
    assert "only in S" in only and "+∞" in only  # not "–", which reads as missing
    rep = json.loads((r / "report.json").read_text())
    assert {x["category"] for x in rep["shift"]} == set(ODD)
    # the anchored section (N-model runs) writes the same names into its own table
    sec = anchored_section({"chat": r, "base": r}, "chat", "base")
    rows = [ln for ln in sec["markdown"].splitlines() if ln.startswith("| ") and "category" not in ln]
    assert len(rows) == 3 and all(ln.replace("\\|", "").count("|") == 7 for ln in rows), rows
    assert "<script" not in sec["markdown"]
    # in the same units as the main table (percent), "only in S" where no I latent has the category
    by_cat = {x["category"]: x for x in sec["data"]["shift"]}
    plain = next(ln for ln in rows if ln.startswith("| plain "))
    assert f"{by_cat['plain']['delta'] * 100:+.1f}%" in plain
    assert "only in S" in next(ln for ln in rows if "alert" in ln)
    assert "only in S" in sec["html"] and "95% CI (Katz) %" in sec["html"]
    # and with the intervals the report config asks for
    from jobs.report.config import ReportConfig

    adj = anchored_section({"chat": r, "base": r}, "chat", "base", opts=ReportConfig(ci_adjust="bonferroni"))
    assert "CI (Katz, Bonferroni)" in adj["markdown"]
    lo = {x["category"]: x["ci_low"] for x in adj["data"]["shift"]}
    assert lo["plain"] < by_cat["plain"]["ci_low"]


def test_anchored_counts_come_from_the_latents_table(run, tmp_path):  # noqa: F811
    r = tmp_path / "run"
    shutil.copytree(run, r)
    g = _label_all(r, lambda grp, j: "plain")
    shutil.rmtree(r / "examples")  # evidence not (yet) collected: the groups are still known
    assert specific_counts(r, "chat") == {"plain": len(g["chat-specific"])}


def test_a_store_without_sources_gives_unknown_mass_rates_not_failures():
    assert math.isnan(_rate([{}, {}], {"refusal"}, 0.5))
    assert _rate([{}, {"refusal": 0.9}, {"web": 1.0}], {"refusal"}, 0.5) == 0.5


def test_an_analysis_redone_takes_its_labels_with_it(tmp_path):
    pq.write_table(pa.table({"latent": [0], "group": ["a-specific"]}), tmp_path / "latents.parquet")
    write_jsonl(
        tmp_path / LABELS_FILE, [LatentLabel(latent=0, explanation="old", category="x", confidence=1)]
    )
    clear_outputs(tmp_path)
    assert not (tmp_path / LABELS_FILE).exists() and not (tmp_path / "latents.parquet").exists()


def test_json_nulls_say_what_they_stand_for_and_unlabelled_groups_show_no_zeros(run, tmp_path):  # noqa: F811
    """report.json writes ±∞ as null: `only_in` and `ci_high_unbounded` say which null is unbounded.
    A group label.groups left out (the demo's baseline) gets no column of zeros and its cards say
    why they have no label."""
    r = tmp_path / "run"
    shutil.copytree(run, r)
    _label_all(r, lambda grp, j: "gain" if grp == "chat-specific" else "other")
    (r / "label_config.json").write_text(json.dumps({"groups": ["chat-specific", "base-specific"]}))
    write_report(r)
    rep = json.loads((r / "report.json").read_text(), parse_constant=lambda c: pytest.fail(c))
    rows = {x["category"]: x for x in rep["shift"]}
    assert (
        rows["gain"]["delta"] is None and rows["gain"]["only_in"] == "S" and rows["gain"]["ci_high_unbounded"]
    )
    assert rows["other"]["only_in"] == "I" and rows["other"]["delta"] == -1.0
    assert rep["labelled_groups"] == ["chat-specific", "base-specific"]
    html = (r / "report.html").read_text()
    assert "not labelled (label.groups): baseline" in html
    assert "not labelled (label.groups leaves this group out)" in html  # the baseline cards
    head = html[html.index("Category counts per group") :]
    assert "<th>baseline</th>" not in head[: head.index("</table>")]
