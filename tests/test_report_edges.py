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
    assert "only in chat-specific" in only and "+∞" in only  # not "–", which reads as missing
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
    assert "only in S" in sec["html"] and "<th>95% CI (Katz)</th>" in sec["html"]
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


def _rewrite_latents(run_dir, change):
    """latents.parquet with some columns changed by `change(dict of lists)`, metadata kept."""
    path = run_dir / "latents.parquet"
    t = pq.read_table(path)
    d = t.to_pydict()
    change(d)
    pq.write_table(pa.table(d).replace_schema_metadata(t.schema.metadata), path)


def test_tail_only_groups_are_said_to_be_tails_and_robust_ones_are_not(run, tmp_path):  # noqa: F811
    """A group without a robust <model>-only latent (the demo's) is the Δnorm tail of a shared
    dictionary: the overview and the group's heading say so, in both files; a run whose groups hold
    robust latents gets no such note."""
    r = tmp_path / "run"
    shutil.copytree(run, r)

    def tails_only(d):
        for i, g in enumerate(d["group"]):
            d["robust"][i] = False
            if g.endswith("-specific"):
                d["class"][i] = "shared"
                d["tail"][i] = "high" if g == "base-specific" else "low"

    _rewrite_latents(r, tails_only)
    write_report(r)
    html, md = (r / "report.html").read_text(), (r / "report.md").read_text()
    n_chat = len(_groups(r)["chat-specific"])
    for text in (html, md):
        assert "Δnorm tail" in text and "shared dictionary" in text
        assert "not latents absent from base" in text and "not latents absent from chat" in text
        assert f"holds 0 robust chat-only, {n_chat} from the Δnorm tail only" in text
        assert "median ν^ε" in text
    assert f"chat-specific latents ({n_chat}, Δnorm tail; all {n_chat} shown" in html
    sel = json.loads((r / "report.json").read_text())["group_selection"]["chat-specific"]
    assert sel["n_robust"] == 0 and sel["n_tail_only"] == n_chat and sel["delta_norm_max"] < 0.5

    write_report(run)  # the fixture's groups hold robust latents
    rep = json.loads((run / "report.json").read_text())["group_selection"]
    assert all(s["n_robust"] > 0 for s in rep.values())
    for text in ((run / "report.html").read_text(), (run / "report.md").read_text()):
        assert "shared dictionary" not in text and "Note:" not in text
        assert f"{rep['chat-specific']['n_robust']} robust chat-only" in text


def test_provenance_names_models_layer_judge_and_commit(run, tmp_path):  # noqa: F811
    r, store = tmp_path / "run", tmp_path / "store"
    shutil.copytree(run, r)
    store.mkdir()
    models = [
        {"name": "base", "path": "/models/base-7b", "revision": "rev0a1"},
        {"name": "chat", "path": "/m/chat"},
    ]
    cfg = {"models": models, "layer": 13, "site": "resid_post"}
    (store / "harvest_config.json").write_text(json.dumps({"hash": "x", "config": cfg}))
    acfg = json.loads((r / "analysis_config.json").read_text())
    (r / "analysis_config.json").write_text(json.dumps(acfg | {"store": str(store)}))
    (r / "run_config.json").write_text(json.dumps({"fit": {"train": {"seed": 7}}, "total_steps": 100}))
    commit = "0123456789abcdef0123456789abcdef01234567"
    env = {"git": {"commit": commit, "dirty": False}, "packages": {"crossdiff": "9.9.9", "torch": "3.0"}}
    (r / "stages").mkdir()
    (r / "stages" / "fit.json").write_text(json.dumps({"environment": env}))
    settings = {
        "prompt_version": "delphi-v9",
        "service.judge.model_id": "judge-llm-9b",
        "service.method.classify_mode": "channel",
        "service.taxonomy": "taxonomies/demo.yaml",
    }
    (r / "label_settings.json").write_text(json.dumps(settings))
    write_report(r)
    html, md = (r / "report.html").read_text(), (r / "report.md").read_text()
    for text in (html, md):
        assert "/models/base-7b @ rev0a1" in text and "/m/chat" in text and "layer 13" in text
        assert "judge-llm-9b" in text and "delphi-v9" in text and "channel" in text
        assert f"commit {commit}" in text and "crossdiff 9.9.9" in text and "seed 7" in text
        assert "k 4, n_latents 96, d_model 16, seed 7" in text.replace("\\_", "_")  # the fixture's
    prov = json.loads((r / "report.json").read_text())["provenance"]["run"]
    assert prov["judge"]["model_id"] == "judge-llm-9b" and prov["software"]["fit"]["commit"] == commit
    # labelled through an --endpoint: the labels name the judge that made them, not the job's own settings
    from jobs.report.provenance import _judge

    said = _judge(r, {0: {"judge_model": "endpoint-judge-70b", "prompt_version": "delphi-v9"}})
    assert said["model_id"] == "endpoint-judge-70b" and said["prompt_version"] == "delphi-v9"
    # ... and the endpoint's taxonomy, not the job's own file and method (unknown: not shown)
    about = {"settings_fingerprint": "fp9", "url": "https://judge.example", "taxonomy_version": "team-v3"}
    (r / "label_endpoint.json").write_text(json.dumps({**about, "remote": True}))
    said = _judge(r, {0: {"judge_model": "endpoint-judge-70b", "prompt_version": "delphi-v9"}})
    assert said["taxonomy"] == "team-v3" and said["endpoint"] == "https://judge.example"
    assert "classify_mode" not in said and "taxonomy_fingerprint" not in said
    write_report(r)
    md = (r / "report.md").read_text()
    assert (
        "team-v3" in md and "https://judge.example (settings fingerprint fp9)" in md and "channel" not in md
    )
    (r / "label_endpoint.json").write_text(json.dumps({**about, "remote": False}))  # the job's own service
    assert _judge(r, {})["classify_mode"] == "channel"
    (r / "label_endpoint.json").unlink()

    # a run without a label stage (and without stage markers or a harvest stamp) still renders
    bare = tmp_path / "bare"
    shutil.copytree(run, bare)
    (bare / "analysis_config.json").unlink()
    write_report(bare)
    html = (bare / "report.html").read_text()
    assert "Provenance" in html and "judge" not in html.split("Provenance")[1].split("</section>")[0]


def test_an_installed_crossdiff_says_where_it_came_from(monkeypatch):
    import importlib.metadata
    from pathlib import Path

    from jobs import provenance
    from jobs.report.provenance import _software, _sw

    site = Path(provenance.__file__).resolve().parents[1]  # as if this code were the installed copy

    class Dist:  # pip's PEP 610 record of `pip install git+https://...@<commit>`
        def read_text(self, name):
            assert name == "direct_url.json"
            return json.dumps(
                {"url": "https://git.example/crossdiff", "vcs_info": {"vcs": "git", "commit_id": "c0ffee"}}
            )

        def locate_file(self, name):
            return site / name

    monkeypatch.setattr(importlib.metadata, "distribution", lambda name: Dist())
    assert provenance._installed_from() == {"url": "https://git.example/crossdiff", "commit": "c0ffee"}
    env = {"git": None, "installed_from": provenance._installed_from(), "packages": {"crossdiff": "0.1.0"}}
    site = Path("/elsewhere/site-packages")  # this code is a job's uploaded checkout, not that install
    assert provenance._installed_from() is None
    assert _sw(_software(env)) == "commit c0ffee, crossdiff 0.1.0"
    wheel = {"url": "file:///w/crossdiff-0.1.0-py3-none-any.whl", "archive_hash": "sha256=ab"}
    assert (
        _sw(_software({"installed_from": wheel}))
        == "installed from file:///w/crossdiff-0.1.0-py3-none-any.whl"
    )
    assert _sw(_software({"git": {"commit": "abc", "dirty": True}, "installed_from": wheel})).startswith(
        "commit abc (uncommitted changes)"
    )


def test_planted_direction_gives_the_interval_and_says_when_it_holds_zero(tmp_path):
    from diffing.evidence import LatentEvidence
    from jobs.validation import planted_section

    planted = [
        {"name": "refusal", "source": "refusal", "category": "safety", "direction": "gain"},
        {"name": "french", "source": "french", "category": "multilingual", "direction": "gain"},
    ]
    ft = ["safety"] * 13 + ["multilingual"] * 15 + ["other"] * 7
    base = ["safety"] * 8 + ["multilingual"] * 1 + ["other"] * 26
    ev = [LatentEvidence(latent=i, group="ft-specific") for i in range(35)]
    ev += [LatentEvidence(latent=35 + i, group="base-specific") for i in range(35)]
    write_jsonl(tmp_path / "examples" / "0-70.jsonl", ev)
    cats = ft + base
    write_jsonl(
        tmp_path / LABELS_FILE,
        [LatentLabel(latent=i, explanation="x", category=c, confidence=0.9) for i, c in enumerate(cats)],
    )
    sec = planted_section(tmp_path, planted, ("base", "ft"))
    d = sec["data"]["direction"]
    assert d["refusal"]["ok"] and not d["refusal"]["ci_excludes_zero"]  # 13/35 vs 8/35
    assert d["french"]["ok"] and d["french"]["ci_excludes_zero"]  # 15/35 vs 1/35
    refusal = next(ln for ln in sec["markdown"].splitlines() if ln.startswith("| refusal"))
    french = next(ln for ln in sec["markdown"].splitlines() if ln.startswith("| french"))
    assert "[-22.9%, +242.6%]" in refusal and "yes (sign only: CI includes 0)" in refusal
    assert refusal.replace("\\|", "").count("|") == 7
    assert french.rstrip(" |").endswith("yes") and "sign only" not in french
    assert "95% CI (Katz)" in sec["markdown"] and "✓ (sign only: CI includes 0)" in sec["html"]
    assert "[-22.9%, +242.6%]" in sec["html"]


def test_shift_plot_marks_only_in_rows_and_clipped_ends():
    from diffing.stats import category_shift
    from jobs.report import plots

    # "a" only in S; "other" 2/35 vs 2/35 has a CI up to +571%, past the chart's 400% edge
    rows = [r.as_dict() for r in category_shift({"a": 1, "other": 2, "x": 32}, {"other": 2, "x": 33})]
    fig = plots.shift_figure(rows, "ft-specific", "base-specific", "95% CI (Katz)", 5)
    assert fig.uri.startswith("data:image/png;base64,")
    assert fig.bars["a"] is None  # a marker at the CI's lower end, not a full bar at the edge
    assert fig.bars["other"] == pytest.approx(0.0) and fig.bars["x"] < 10
    assert "other: CI to +571%" in fig.notes
    lo = next(r for r in rows if r["category"] == "a")["ci_low"] * 100
    assert f"a: only in ft-specific (n=1): Δ ≥ {lo:+.0f}%" in fig.notes
    assert {"small count (< 5 on a side)", "beyond 400%: value written at right"} <= set(fig.legend)
    assert any(t.startswith("only in ft-specific") for t in fig.legend)
    assert plots.shift_bars(rows, "S", "I").startswith("data:image/png;base64,")


def test_markdown_escapes_markup_but_reads_ampersands(run, tmp_path):  # noqa: F811
    r = tmp_path / "run"
    shutil.copytree(run, r)
    g = _groups(r)
    evil = "fires on ![t](https://evil.example/p.png) and [x](http://e.x) *bold* `code` _u_"
    labs = [
        LatentLabel(latent=lat, explanation=evil, category="safety & content moderation", confidence=0.5)
        for lat in g["chat-specific"] + g["base-specific"]
    ]
    write_jsonl(r / LABELS_FILE, labs)
    write_report(r)
    md = (r / "report.md").read_text()
    assert "](http" not in md and "![" not in md and "*bold*" not in md and "`code`" not in md
    assert "\\!\\[t\\]\\(https://evil.example/p.png\\)" in md
    assert "safety & content moderation" in md and "&amp;" not in md
    from jobs.report import _md

    assert _md("a &lt; b") == "a &amp;lt; b" and _md("x|y") == "x\\|y"


def test_shift_caption_says_what_the_interval_is(run, tmp_path):  # noqa: F811
    from jobs.report.config import ReportConfig

    r = tmp_path / "run"
    shutil.copytree(run, r)
    _label_all(r, lambda grp, j: ODD[2] if j % 2 else "other")
    write_report(r)
    for text in ((r / "report.html").read_text(), (r / "report.md").read_text()):
        assert "Katz log-ratio" in text and "95%" in text and "binomial sample" in text
        assert "judge error" in text and "crosscoder-seed variation" in text and "ci_adjust=none" in text
    write_report(r, opts=ReportConfig(ci_method="score", ci_adjust="bonferroni", ci_level=0.9))
    md = (r / "report.md").read_text()
    assert "Miettinen–Nurminen score" in md and "Bonferroni-adjusted over the 2 categories" in md


def test_card_statistics_say_where_they_come_from(run, tmp_path):  # noqa: F811
    from jobs.report import _stats_source

    write_report(run)  # the fixture's evidence pass reads every row (heldout="all")
    html = (run / "report.html").read_text()
    assert "(evidence pass over all rows, 4,000 tokens)" in html
    assert _stats_source({"freq": 0.1, "heldout_tokens": 22392.0}, {"heldout": "hash"}, "4000") == (
        "held-out, 22,392 tokens"
    )
    r = tmp_path / "run"
    shutil.copytree(run, r)
    shutil.rmtree(r / "examples")  # no evidence: the analysis pass's numbers
    write_report(r)
    assert "(latents.parquet, 4,000 tokens)" in (r / "report.html").read_text()


def test_group_selection_says_which_tail_and_skips_an_unmeasured_nu():
    """The high-Δnorm side is called "highest", a NaN ν leaves the median of the rest."""
    from jobs.report.selection import group_selection, how_selected

    cols = {"latent": [0, 1, 2, 3], "group": ["a-specific", "a-specific", "b-specific", ""],
            "delta_norm": [0.99, 0.97, 0.02, 0.5], "nu_eps": [0.1, float("nan"), 0.3, 1.0],
            "nu_r": [0.2, 0.4, float("nan"), 1.0], "robust": [True, False, False, False],
            "tail": ["high", "high", "low", ""]}  # fmt: skip
    sel = group_selection(cols, ("a", "b"))
    assert (
        sel["a-specific"]["nu_eps_median"] == pytest.approx(0.1) and sel["b-specific"]["nu_r_median"] is None
    )
    assert sel["a-specific"]["nu_r_median"] == pytest.approx(0.3)
    assert "highest Δnorm" in how_selected(sel["a-specific"], {"selection": "tail", "tail_frac": 0.06})
    assert "lowest Δnorm" in how_selected(sel["b-specific"], {"selection": "tail", "tail_frac": 0.06})


def test_shift_bars_take_the_side_they_favour_and_the_axis_names_it(monkeypatch):
    """A category more common in S is drawn in S's colour (blue, as the legend says), one more
    common in I in I's; the x axis names S first (from the report-side mutation review)."""
    from matplotlib.colors import to_hex

    from diffing.stats import category_shift
    from jobs.report import plots

    figs = []
    real = plots.to_data_uri
    monkeypatch.setattr(plots, "to_data_uri", lambda fig: figs.append(fig) or real(fig))
    rows = [
        r.as_dict() for r in category_shift({"up": 20, "down": 5, "x": 10}, {"up": 5, "down": 20, "x": 10})
    ]
    plots.shift_figure(rows, "ft-specific", "base-specific", "95% CI (Katz)", 5)
    (ax,) = figs[0].axes
    assert ax.get_xlabel().startswith("Δ_c (%) of ft-specific vs base-specific latents")
    ticks = [t.get_text().split("  ")[0] for t in ax.get_yticklabels()]
    colour = {ticks[round(p.get_y() + p.get_height() / 2)]: to_hex(p.get_facecolor()) for p in ax.patches}
    assert colour["up"] == plots.COLORS["B"] and colour["down"] == plots.COLORS["A"]


def test_shift_cells_headings_and_axes_are_labelled(run, tmp_path, monkeypatch):  # noqa: F811
    from jobs.report import _pct, plots, render
    from jobs.report.config import ReportConfig

    assert _pct(14.1) == "+1410%" and _pct(0.625) == "+62.5%"
    rows = [
        {"category": "big", "n_s": 30, "N_s": 35, "n_i": 2, "N_i": 35, "delta": 14.0, "ci_low": 2.0,
         "ci_high": 50.0, "small_count": True, "only_in": None},
        {"category": "gone", "n_s": 0, "N_s": 35, "n_i": 6, "N_i": 35, "delta": -1.0, "ci_low": -1.0,
         "ci_high": 0.3, "small_count": True, "only_in": "I"},
    ]  # fmt: skip
    table = render.shift_table(rows, "95% CI (Katz)", "ft-specific", "base-specific")
    assert "<td>+1400%</td>" in table and "[+200.0%, +5000%]" in table and "1.4e+03" not in table
    assert "only in base-specific (-100.0%)" in table
    xlabels = []
    real = plots.to_data_uri
    monkeypatch.setattr(
        plots, "to_data_uri", lambda fig: xlabels.append(fig.axes[0].get_xlabel()) or real(fig)
    )
    r = tmp_path / "run"
    shutil.copytree(run, r)
    write_report(r, opts=ReportConfig(max_cards=2))
    assert "latents" in xlabels  # the class bar chart's x axis
    n = len(_groups(r)["chat-specific"])
    assert f"first 2 of {n} shown, most robust first)" in (r / "report.html").read_text()


def test_provenance_takes_resolved_revisions_and_the_steps_the_fit_ran(tmp_path):
    """A store whose manifest alone holds the harvest config and the commits its unpinned models
    resolved to: the models show at those commits; the fit's steps are metrics.json's (the steps
    it ran), not run_config's plan (report-side mutation review)."""
    from jobs.report.provenance import _crosscoder, _harvest

    rd, store = tmp_path / "run", tmp_path / "store"
    rd.mkdir()
    store.mkdir()
    harvest = {
        "models": [{"name": "base", "path": "/m/base"}, {"name": "chat", "path": "/m/chat"}],
        "layer": 3,
    }
    meta = {"harvest": harvest, "revisions": {"chat": "abc123"}}
    (store / "manifest.json").write_text(json.dumps({"model_names": ["base", "chat"], "metadata": meta}))
    (rd / "analysis_config.json").write_text(json.dumps({"store": str(store)}))
    (rd / "run_config.json").write_text(json.dumps({"total_steps": 100, "fit": {"train": {"seed": 3}}}))
    h = _harvest(rd)
    assert h["models"] == [
        {"name": "base", "path": "/m/base"},
        {"name": "chat", "path": "/m/chat", "revision": "abc123"},
    ]
    assert h["layer"] == 3
    assert _crosscoder(rd, {"steps": 80})["steps"] == 80 and _crosscoder(rd, None)["steps"] == 100
