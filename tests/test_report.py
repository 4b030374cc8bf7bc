"""The report: self-contained HTML (no network assets), before and after labelling, extra sections."""

import json
import re
import shutil
import subprocess

import numpy as np
import pytest
import torch

from diffing.analysis import analyze_run
from diffing.collect import collect_evidence
from diffing.config import AnalysisConfig, CrosscoderConfig
from diffing.crosscoder import Crosscoder
from diffing.evidence import LABELS_FILE, LatentLabel, write_jsonl
from diffing.stats import category_shift
from diffing.store import write_arrays
from jobs.report import ReportOptions, ReportSection, write_report

CATS = ["safety", "code generation", "multilingual"]


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A small run: random crosscoder with a threshold, a store with docs/tokens/sources, analysis
    with tail selection, and evidence."""
    tmp = tmp_path_factory.mktemp("report")
    cfg = CrosscoderConfig(n_models=2, d_model=16, n_latents=96, k=4, model_names=("base", "chat"), aux_k=8)
    cc = Crosscoder(cfg, seed=3)
    with torch.no_grad():
        cc.W_dec[0, :20] *= 0.1  # chat-leaning latents
        cc.W_dec[1, 20:40] *= 0.1  # base-leaning latents
        cc.threshold.fill_(0.02)
    run = tmp / "run"
    cc.save(run / "crosscoder")
    (run / "metrics.json").write_text(
        json.dumps({"fve": {"base": 0.81, "chat": 0.79}, "l0": 4.1, "steps": 100})
    )
    rng = np.random.default_rng(0)
    n = 4000
    x = rng.standard_normal((n, 2, 16)).astype(np.float32)
    texts = list("the quick brown fox jumps over the lazy dog\n") * 200
    tok = np.array([ord(c) for c in texts[:n]])
    store = write_arrays(
        str(tmp / "store"),
        x,
        model_names=["base", "chat"],
        doc_ids=np.arange(n) // 40,
        positions=np.arange(n) % 40,
        token_ids=tok,
        extra={"source": [["chat", "web"][i // 40 % 2] for i in range(n)]},
    )
    acfg = AnalysisConfig(tail_frac=0.06, heldout="all", n_top=6, window=6, reservoir=64)
    analyze_run(run, store, acfg)
    collect_evidence(run, store, acfg)
    return run


def _groups(run):
    import pyarrow.parquet as pq

    t = pq.read_table(run / "latents.parquet").to_pydict()
    return {
        g: [lat for lat, gg in zip(t["latent"], t["group"], strict=True) if gg == g] for g in set(t["group"])
    }


def _check_offline(html: str):
    assert not re.search(r"(?:src|href)\s*=\s*[\"']?(?:https?:)?//", html, re.I)
    assert "http://" not in html and "https://" not in html and "@import" not in html
    imgs = re.findall(r"<img[^>]*\bsrc=\"([^\"]*)\"", html)
    assert imgs and all(s.startswith("data:image/png;base64,") for s in imgs)
    assert "<script" not in html and "<link" not in html


def test_report_before_labelling(run):
    out = write_report(run)
    html = (run / "report.html").read_text()
    _check_offline(html)
    alts = re.findall(r'<img alt="([^"]*)"', html)
    want = ["Δnorm histogram", "decoder cosine histogram", "Latent Scaling ν scatter", "class counts"]
    assert alts[:4] == want, alts
    g = _groups(run)
    assert len(g["base-specific"]) > 0 and len(g["chat-specific"]) > 0
    n_cards = (
        len(g["base-specific"])
        + len(g["chat-specific"])
        + min(len(g["baseline"]), ReportOptions().baseline_cards)
    )
    assert html.count('class="card"') == n_cards
    assert "not labelled yet" in html and "no labels yet" in html
    assert "activation mass by source" in html and 'class="pk"' in html  # highlighted contexts
    rep = json.loads((run / "report.json").read_text())
    assert rep["shift"] is None and rep["groups"]["base-specific"] == len(g["base-specific"])
    assert rep["metrics"]["fve"]["base"] == 0.81
    assert out["labelled"] == 0 and (run / "report.md").read_text().startswith("# crossdiff report")


def test_report_after_labelling_shows_shift_and_labels(run, tmp_path):
    lab_run = tmp_path / "run"
    shutil.copytree(run, lab_run)
    g = _groups(lab_run)
    labels, counts = [], {"chat-specific": {}, "base-specific": {}}
    for grp in ("chat-specific", "base-specific", "baseline"):
        for j, lat in enumerate(g[grp]):
            cat = CATS[(j + (grp == "base-specific")) % len(CATS)]
            counts.setdefault(grp, {})[cat] = counts.get(grp, {}).get(cat, 0) + 1
            labels.append(
                LatentLabel(
                    latent=lat,
                    explanation=f"explains latent {lat}",
                    category=cat,
                    confidence=0.7,
                    detection_score=0.8,
                )
            )
    write_jsonl(lab_run / LABELS_FILE, labels)
    write_report(lab_run)
    rep = json.loads((lab_run / "report.json").read_text())
    want = category_shift(counts["chat-specific"], counts["base-specific"], min_count=5)  # S = B-specific
    assert [(r["category"], r["n_s"], r["n_i"]) for r in rep["shift"]] == [
        (w.category, w.n_s, w.n_i) for w in want
    ]
    for r, w in zip(rep["shift"], want, strict=True):
        assert r["delta"] == pytest.approx(w.delta) and r["ci_low"] == pytest.approx(w.ci_low)
    html = (lab_run / "report.html").read_text()
    _check_offline(html)
    assert f"explains latent {g['chat-specific'][0]}" in html and "detection score 0.8" in html
    assert "not labelled yet" not in html
    assert rep["category_counts"]["baseline"] and "Δ_c" in (lab_run / "report.md").read_text()
    assert (
        rep["report_config"] == ReportOptions().model_dump(mode="json") and rep["ci_label"] == "95% CI (Katz)"
    )

    # the interval the config asks for: a score interval over the whole table (Bonferroni)
    cfg = ReportOptions(ci_method="score", ci_adjust="bonferroni", ci_level=0.9, min_count=2)
    write_report(lab_run, opts=cfg)
    rep = json.loads((lab_run / "report.json").read_text())
    want = category_shift(
        counts["chat-specific"],
        counts["base-specific"],
        alpha=0.1,
        method="score",
        adjust="bonferroni",
        min_count=2,
    )
    for r, w in zip(rep["shift"], want, strict=True):
        assert r["ci_low"] == pytest.approx(w.ci_low) and r["ci_high"] == pytest.approx(w.ci_high)
        assert r["ci_level"] == pytest.approx(1 - 0.1 / len(want)) and r["small_count"] == w.small_count
    assert rep["report_config"]["ci_method"] == "score" and rep["ci_label"] == "90% CI (score, Bonferroni)"
    assert "90% CI (score, Bonferroni)" in (lab_run / "report.md").read_text()
    assert "<th>90% CI (score, Bonferroni)</th>" in (lab_run / "report.html").read_text()


def test_what_the_page_and_the_markdown_show_match_the_data(run, tmp_path, monkeypatch):
    """From the report's mutation review: the Markdown shift table's counts and interval ends, the
    HTML table's "only in" side and small-count flag, the groups and live-latent KPIs, the cards'
    order (most robust by ν over its cut first), their context count and source-mass order, each
    against what latents.parquet and category_shift give."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from diffing.analysis import robustness
    from jobs.report.md import _pct

    lab_run = tmp_path / "run"
    shutil.copytree(run, lab_run)
    g = _groups(lab_run)
    labels = [  # "multilingual" only in chat-specific (S), a count under min_count elsewhere
        LatentLabel(latent=lat, explanation="x.", category=cat, confidence=0.5)
        for grp, cat_of in (
            ("chat-specific", lambda j: CATS[j % 3]),
            ("base-specific", lambda j: CATS[j % 2]),
        )
        for j, lat in enumerate(g[grp])
        for cat in [cat_of(j)]
    ]
    write_jsonl(lab_run / LABELS_FILE, labels)
    t = pq.read_table(lab_run / "latents.parquet")
    freq = t["freq"].to_numpy().copy()
    freq[np.flatnonzero(np.asarray(t["group"]) == "")[:3]] = 0.0  # three dead latents
    t = t.set_column(t.schema.get_field_index("freq"), "freq", pa.array(freq))
    meta = dict(t.schema.metadata)  # the analysis's own cuts rank the cards, not the defaults
    cuts = {**json.loads(meta[b"config"]), "nu_eps_max": 0.05, "nu_r_max": 2.0}
    t = t.replace_schema_metadata({**meta, b"config": json.dumps(cuts).encode()})
    pq.write_table(t, lab_run / "latents.parquet")
    from jobs.report import plots

    xlabels = []
    real = plots.to_data_uri
    monkeypatch.setattr(
        plots, "to_data_uri", lambda fig: xlabels.append(fig.axes[0].get_xlabel()) or real(fig)
    )
    write_report(lab_run, opts=ReportOptions(max_cards=2, contexts_per_card=2))
    assert any(x.startswith("Δ_c (%) of chat-specific vs base-specific") for x in xlabels), xlabels
    rep = json.loads((lab_run / "report.json").read_text())
    md, html = (lab_run / "report.md").read_text(), (lab_run / "report.html").read_text()
    for r in rep["shift"]:
        row = next(line for line in md.splitlines() if line.startswith(f"| {r['category']} |"))
        assert f"| {r['n_s']}/{r['N_s']} | {r['n_i']}/{r['N_i']} |" in row, row
        hi = "+∞" if r["ci_high_unbounded"] else _pct(r["ci_high"])  # JSON has no infinity
        assert f"[{_pct(r['ci_low'])}, {hi}]" in row, row
    multi = next(r for r in rep["shift"] if r["category"] == "multilingual")
    assert multi["n_i"] == 0 and multi["n_s"] > 0
    assert re.search(r"<td>multilingual</td>(?:<td>[^<]*</td>){4}<td>only in chat-specific</td>", html)
    if any(r["small_count"] for r in rep["shift"]):
        assert "<td>small count</td>" in html
    t = pq.read_table(lab_run / "latents.parquet").to_pydict()
    assert set(rep["groups"]) == {"base-specific", "chat-specific", "baseline"}
    live = int((np.asarray(t["freq"]) > 0).sum())
    assert f'<b>{live}</b><span class="muted">live</span>' in html
    score = robustness(np.asarray(t["nu_eps"], float), np.asarray(t["nu_r"], float), 0.05, 2.0)
    for grp in ("chat-specific", "base-specific"):
        idx = np.asarray(g[grp])
        want = idx[np.lexsort((idx, score[idx]))][:2].tolist()
        cards = rep["cards"][grp]
        assert [c["latent"] for c in cards] == want, grp
        assert all(len(c["top"]) <= 2 for c in cards)
    first = rep["cards"]["chat-specific"][0]
    card = html[html.index(f"latent {first['latent']}") :]
    card = card[: card.index('<div class="card">')] if '<div class="card">' in card else card
    assert card.count('<div class="ctx">') == min(2, len(first["top"])) > 0
    shown = [
        int(p)
        for p in re.findall(r" (\d+)%", card[card.index("activation mass by source") :].split("</div>")[0])
    ]
    assert len(shown) == len(first["source_mass"]) > 1 and shown == sorted(
        shown, reverse=True
    )  # largest first


def test_extra_sections_hook(run, tmp_path):
    r2 = tmp_path / "run"
    shutil.copytree(run, r2)
    sec = ReportSection(
        title="Planted truth",
        html="<p>recovered 97%</p>",
        markdown="recovered 97%",
        data={"recovered": 0.97},
        key="planted",
    )
    write_report(
        r2,
        extra_sections=[sec, lambda run_dir: {"title": "From a callable", "html": f"<p>{run_dir.name}</p>"}],
    )
    html = (r2 / "report.html").read_text()
    assert "Planted truth" in html and "recovered 97%" in html and "From a callable" in html
    rep = json.loads((r2 / "report.json").read_text())
    assert rep["sections"][0] == {"title": "Planted truth", "key": "planted", "data": {"recovered": 0.97}}
    md = (r2 / "report.md").read_text()
    assert "recovered 97%" in md
    # results sit beside the shift, before the latent cards (most of the page); the contents link them
    heads = re.findall(r"<h2 id=\"s\d+\">([^<]*)</h2>", html)
    assert heads[heads.index("Category shift") + 1] == "Planted truth"
    assert heads.index("From a callable") < min(i for i, h in enumerate(heads) if "-specific latents" in h)
    md_heads = re.findall(r"^## (.*)$", md, flags=re.M)
    assert md_heads.index("Planted truth") < min(
        i for i, h in enumerate(md_heads) if "-specific latents" in h
    )
    assert '<a href="#s' in html and ">Planted truth</a>" in html
    with pytest.raises(TypeError):
        write_report(r2, extra_sections=[42])


def test_report_needs_latents(tmp_path):
    with pytest.raises(FileNotFoundError, match="crossdiff analyze"):
        write_report(tmp_path)


def _chromium():
    return shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")


@pytest.mark.skipif(_chromium() is None, reason="chromium is not installed")
@pytest.mark.timeout(120)
def test_report_renders_in_headless_chromium(run, tmp_path):
    from PIL import Image

    write_report(run)
    shot = tmp_path / "report.png"
    subprocess.run(
        [
            _chromium(),
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--hide-scrollbars",
            f"--screenshot={shot}",
            "--window-size=1200,2400",
            "--user-data-dir=" + str(tmp_path / "profile"),
            (run / "report.html").as_uri(),
        ],
        check=True,
        capture_output=True,
        timeout=100,
    )
    img = np.asarray(Image.open(shot).convert("RGB"))
    assert img.shape[0] >= 2000 and img.shape[1] >= 1100
    colours = len(np.unique(img.reshape(-1, 3)[::7], axis=0))
    assert colours > 200  # text, plots and highlights, not a blank or broken page


def test_cli_analyze_then_report(tmp_path, run):
    from typer.testing import CliRunner

    from jobs.cli import app

    r2 = tmp_path / "run"
    shutil.copytree(run / "crosscoder", r2 / "crosscoder")
    store = str(run.parent / "store")
    res = CliRunner().invoke(
        app,
        ["analyze", "--run", str(r2), "--store", store, "--set", "tail_frac=0.05", "--set", "heldout=all"],
    )
    assert res.exit_code == 0, res.output
    out = json.loads(res.stdout)
    assert out["examples"] == 1 and out["groups"]["chat-specific"] > 0
    assert (r2 / "examples" / "0000000-0001024.jsonl").exists()
    res = CliRunner().invoke(app, ["report", "--run", str(r2)])
    assert res.exit_code == 0, res.output
    _check_offline((r2 / "report.html").read_text())
    res = CliRunner().invoke(app, ["report", "--run", str(r2), "--set", "ci_adjust=bonferroni"])
    assert res.exit_code == 0, res.output
    assert json.loads((r2 / "report.json").read_text())["report_config"]["ci_adjust"] == "bonferroni"
    res = CliRunner().invoke(app, ["report", "--run", str(r2), "--set", "ci_method=wilson"])
    assert res.exit_code == 2 and "ci_method" in res.output
    res = CliRunner().invoke(
        app, ["analyze", "--run", str(r2), "--store", store, "--no-evidence", "--set", "x=1"]
    )
    assert res.exit_code == 2 and "x" in res.output


@pytest.mark.timeout(300)
def test_cli_analyze_then_report_on_s3(tmp_path, run, s3_endpoint, monkeypatch):
    """`analyze --run s3://...` and `report --run s3://...`: a fit run in the bucket is copied down,
    analysed, and its outputs go back; a second machine (empty cache) reports from the bucket alone."""
    import uuid

    import fsspec
    from typer.testing import CliRunner

    from jobs.cli import app

    url = f"s3://crossdiff-test/runs/{uuid.uuid4().hex[:8]}"
    fs, root = fsspec.core.url_to_fs(url)
    for name in ("model.safetensors", "cfg.json"):
        fs.put_file(str(run / "crosscoder" / name), f"{root}/crosscoder/{name}")
    store = str(run.parent / "store")
    monkeypatch.setenv("CROSSDIFF_CACHE", str(tmp_path / "machine1"))
    args = ["analyze", "--run", url, "--store", store, "--set", "tail_frac=0.05", "--set", "heldout=all"]
    res = CliRunner().invoke(app, args)
    assert res.exit_code == 0, res.output
    fs.invalidate_cache()
    assert fs.exists(f"{root}/latents.parquet") and fs.exists(f"{root}/examples/0000000-0001024.jsonl")
    monkeypatch.setenv("CROSSDIFF_CACHE", str(tmp_path / "machine2"))
    res = CliRunner().invoke(app, ["report", "--run", url])
    assert res.exit_code == 0, res.output
    fs.invalidate_cache()
    _check_offline(fs.cat_file(f"{root}/report.html").decode())
    # the report reads the analysis only: the crosscoder's weights stay in the bucket (for a
    # Gemma-2-9b run they are gigabytes), and are not deleted there either
    assert not list((tmp_path / "machine2").rglob("model.safetensors"))
    assert fs.exists(f"{root}/crosscoder/model.safetensors")


def test_odd_labels_and_a_partial_splice_file(run, tmp_path):
    """Labels of latents the run does not have are not counted; categories and explanations reach
    the Markdown escaped (no raw HTML, no extra table columns, one line); a splice.json without
    every number is rendered, not a KeyError; a broken labels line names the file and line."""
    r = tmp_path / "run"
    shutil.copytree(run, r)
    g = _groups(r)
    bad = "x <img src=x onerror=alert(1)> | y"
    mine = g["chat-specific"] + g["base-specific"]
    labs = [
        LatentLabel(latent=lat, explanation="fires\non <script>x</script>", category=bad, confidence=0.5)
        for lat in mine
    ]
    labs.append(LatentLabel(latent=10_000, explanation="not in this run", category="safety", confidence=0.5))
    write_jsonl(r / LABELS_FILE, labs)
    (r / "splice.json").write_text(json.dumps({"n_tokens": "<b>5</b>", "layer": 3, "models": {"base": {}}}))
    out = write_report(r)
    data = json.loads((r / "report.json").read_text())
    assert data["n_labels"] == len(mine)
    md = (r / "report.md").read_text()
    assert "<img" not in md and "<script" not in md and "&lt;img" in md and "\\|" in md
    assert "fires on &lt;script&gt;" in md
    html = (r / "report.html").read_text()
    assert "<b>5</b>" not in html and out
    (r / LABELS_FILE).write_text((r / LABELS_FILE).read_text() + '{"latent": 2, "confidence": 1.5\n')
    with pytest.raises(ValueError, match=rf"labels.jsonl:{len(labs) + 1}: .*fix or delete that line"):
        write_report(r)


def test_token_strings_longer_than_evidence_allows_are_cut():
    from diffing.collect import _example
    from diffing.evidence import MAX_TOKEN_CHARS
    from diffing.windows import Request

    frag = {"pos": np.array([0, 1]), "token_id": np.array([1, 2]), "act": np.array([0.5, 1.0])}
    ex = _example(
        frag, Request(k=0, kind="top", doc=0, pos=1, shard=0, edge=0), lambda ids: ["a", " " * 5000]
    )
    assert len(ex.tokens[1]) == MAX_TOKEN_CHARS and ex.tokens[1].endswith("…")


def test_report_of_a_multi_comparison_run_points_to_its_comparisons(tmp_path):
    from jobs.report import write_report

    for pair in ("pt-vs-it", "pt-vs-simpo"):
        (tmp_path / "compare" / pair).mkdir(parents=True)
        (tmp_path / "compare" / pair / "latents.parquet").write_text("")
    with pytest.raises(FileNotFoundError, match=r"2 comparisons \(pt-vs-it, pt-vs-simpo\).*compare/<A-vs-B>"):
        write_report(tmp_path)
