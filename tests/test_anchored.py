"""`crossdiff anchored`: the anchored category shift between two runs (two pairwise crosscoders of one
base), refused where the runs do not share base, site or labelling."""

import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from typer.testing import CliRunner

from diffing.evidence import LABELS_FILE, LatentLabel, write_jsonl
from jobs.anchored import AnchoredError, write_anchored
from jobs.cli import app

SETTINGS = {
    "prompt_version": "v",
    "service.judge.model_id": "j",
    "service.taxonomy": "/a/t.yaml",
    "taxonomy_fingerprint": "f",
}


def _run(
    root, name, pair, cats, *, base="/m/pt", layer=20, settings=None, corpus="c.jsonl", ft=None, records=None
):
    """A labelled pairwise run: latents 0.. are <B>-specific with the given categories, two more A-specific."""
    store = root / f"{name}-store"
    store.mkdir(parents=True)
    if records is not None:  # the corpus content's hash, as the harvest stamps it
        (store / "harvest_config.json").write_text(json.dumps({"records_sha256": records}))
    models = [{"name": pair[0], "path": base}, {"name": pair[1], "path": ft or f"/m/{name}"}]
    harvest = {"models": models, "layer": layer, "site": "resid_post", "corpus": {"uri": corpus}}
    (store / "manifest.json").write_text(json.dumps({"layer": layer, "metadata": {"harvest": harvest}}))
    run = root / name
    run.mkdir()
    n = len(cats)
    groups = [f"{pair[1]}-specific"] * n + [f"{pair[0]}-specific"] * 2
    table = pa.table({"latent": list(range(n + 2)), "group": groups})
    pq.write_table(table.replace_schema_metadata({"pair": ",".join(pair)}), run / "latents.parquet")
    labs = [
        LatentLabel(latent=i, explanation="", category=c, confidence=1)
        for i, c in enumerate([*cats, "math", "math"])
    ]
    write_jsonl(run / LABELS_FILE, labs)
    (run / "label_settings.json").write_text(
        json.dumps(settings or {**SETTINGS, "service.taxonomy": f"/{name}/t.yaml"})
    )
    (run / "analysis_config.json").write_text(json.dumps({"analysis": {}, "store": str(store)}))
    return run


def test_two_runs_give_the_anchored_shift(tmp_path):
    s = _run(tmp_path, "simpo", ("pt", "simpo"), ["safety"] * 3)
    i = _run(tmp_path, "it", ("pt", "it"), ["safety", "math", "math", "other"])
    res = write_anchored(str(s), str(i), str(tmp_path / "out"))
    assert res["warnings"] == []  # taxonomy paths differ; their fingerprints do not
    body = json.loads((tmp_path / "out" / "anchored.json").read_text())
    rows = {r["category"]: r for r in body["shift"]}
    assert rows["safety"]["delta"] == pytest.approx(3.0)  # (3/3) / (1/4) - 1
    assert (
        rows["math"]["n_s"] == 0 and rows["math"]["n_i"] == 2
    )  # the A-specific "math" latents are not counted
    assert body["S"] == f"simpo-specific ({s})" and body["I"] == f"it-specific ({i})"
    assert body["overlap"] == 0  # ids 0-2 in both, but of two dictionaries
    md = (tmp_path / "out" / "anchored.md").read_text()
    assert (
        md.startswith("# Anchored category shift: simpo-specific vs it-specific")
        and "| safety | 3 | 1 |" in md
    )
    assert "<img" in (tmp_path / "out" / "anchored.html").read_text()


@pytest.mark.parametrize(
    "change, needle",
    [
        ({"base": "/m/other-pt"}, "different bases"),
        ({"layer": 30}, "different layers"),
        ({"settings": {**SETTINGS, "service.judge.model_id": "k"}}, "labelled differently .*model_id"),
    ],
)
def test_runs_that_do_not_share_base_site_or_judge_are_refused(tmp_path, change, needle):
    s = _run(tmp_path, "simpo", ("pt", "simpo"), ["safety"])
    i = _run(tmp_path, "it", ("pt", "it"), ["math"], **change)
    with pytest.raises(AnchoredError, match=needle):
        write_anchored(str(s), str(i), str(tmp_path / "out"))
    assert not (tmp_path / "out" / "anchored.json").exists()


def test_unchecked_or_unlabelled_runs(tmp_path):
    s = _run(tmp_path, "simpo", ("pt", "simpo"), ["safety"], corpus="a.jsonl")
    i = _run(tmp_path, "it", ("pt", "it"), ["math"], corpus="b.jsonl")
    (i / "label_settings.json").unlink()
    warnings = write_anchored(str(s), str(i), str(tmp_path / "out"))["warnings"]
    assert any("different corpora" in w for w in warnings) and any("labelled alike" in w for w in warnings)
    (i / LABELS_FILE).unlink()
    r = CliRunner().invoke(app, ["anchored", "--s", str(s), "--i", str(i), "--out", str(tmp_path / "o2")])
    assert r.exit_code == 2 and "label both runs first" in r.output
    r = CliRunner().invoke(
        app, ["anchored", "--s", str(s), "--i", str(tmp_path / "nope"), "--out", str(tmp_path / "o3")]
    )
    assert r.exit_code == 2 and "no latents.parquet" in r.output


def test_runs_and_output_on_object_storage(tmp_path, s3_endpoint, monkeypatch):
    """Both runs in a bucket and the output too: each is read through a local copy, the output uploaded."""
    import uuid

    import fsspec

    monkeypatch.setenv("CROSSDIFF_CACHE", str(tmp_path / "cache"))
    s = _run(tmp_path, "simpo", ("pt", "simpo"), ["safety"] * 3)
    i = _run(tmp_path, "it", ("pt", "it"), ["safety", "math"])
    root = f"s3://crossdiff-test/anchored-{uuid.uuid4().hex[:8]}"
    fs = fsspec.filesystem("s3")
    for d in (s, i):
        fs.put(str(d), f"{root}/{d.name}", recursive=True)
    res = write_anchored(f"{root}/simpo", f"{root}/it", f"{root}/out")
    fs.invalidate_cache()
    assert res["out"]["anchored.json"] == f"{root}/out/anchored.json"
    body = json.loads(fs.cat_file(f"{root}/out/anchored.json"))
    assert body["S"] == f"simpo-specific ({root}/simpo)" and body["overlap"] == 0
    assert fs.exists(f"{root}/out/anchored.html") and fs.exists(f"{root}/out/anchored.md")


def test_two_comparisons_of_one_run_count_their_overlap(tmp_path):
    """--s/--i naming RUN/compare/<A>-vs-<B> of one pipeline run: one dictionary, ids are shared."""
    from jobs.anchored import _one_dictionary

    run = tmp_path / "run" / "compare"
    run.mkdir(parents=True)
    s = _run(run, "pt-vs-simpo", ("pt", "simpo"), ["safety"] * 3)
    i = _run(run, "pt-vs-it", ("pt", "it"), ["safety", "math"])
    assert _one_dictionary(str(s), str(i)) and not _one_dictionary(str(s), str(tmp_path / "other"))
    assert _one_dictionary("s3://b/r/compare/a-vs-b/", "s3://b/r/compare/a-vs-c")
    assert json.loads(json.dumps(write_anchored(str(s), str(i), str(tmp_path / "out"))))
    assert json.loads((tmp_path / "out" / "anchored.json").read_text())["overlap"] == 2  # ids 0 and 1


def test_labelling_is_compared_by_endpoint_fingerprint_judge_and_prompt(tmp_path):
    """Runs labelled through endpoints compare the endpoints' settings fingerprints; every label's
    judge and prompt version must agree; machine-local judge paths do not count."""
    s = _run(
        tmp_path,
        "simpo",
        ("pt", "simpo"),
        ["safety"] * 2,
        settings={**SETTINGS, "service.judge.model_source": "/a/j"},
    )
    i = _run(
        tmp_path, "it", ("pt", "it"), ["math"], settings={**SETTINGS, "service.judge.model_source": "/b/j"}
    )
    assert write_anchored(str(s), str(i), str(tmp_path / "o1"))["warnings"] == []
    for run, fp in ((s, "aaa"), (i, "bbb")):
        (run / "label_endpoint.json").write_text(json.dumps({"settings_fingerprint": fp}))
    with pytest.raises(AnchoredError, match="endpoints with different settings"):
        write_anchored(str(s), str(i), str(tmp_path / "o2"))
    (i / "label_endpoint.json").write_text(json.dumps({"settings_fingerprint": "aaa"}))
    assert write_anchored(str(s), str(i), str(tmp_path / "o3"))["warnings"] == []
    labs = [LatentLabel(latent=0, explanation="", category="math", confidence=1, judge_model="other-judge")]
    write_jsonl(i / LABELS_FILE, labs)
    with pytest.raises(AnchoredError, match="different judges or prompts"):
        write_anchored(str(s), str(i), str(tmp_path / "o4"))


def test_a_deleted_store_falls_back_to_the_runs_saved_harvest(tmp_path):
    import shutil

    s = _run(tmp_path, "simpo", ("pt", "simpo"), ["safety"])
    i = _run(tmp_path, "it", ("pt", "it"), ["math"], layer=30)
    harvest = json.loads((tmp_path / "it-store" / "manifest.json").read_text())["metadata"]["harvest"]
    (i / "pipeline.json").write_text(json.dumps({"harvest": harvest}))
    shutil.rmtree(tmp_path / "it-store")
    with pytest.raises(AnchoredError, match="different layers"):
        write_anchored(str(s), str(i), str(tmp_path / "o"))


def test_the_same_run_or_fine_tune_twice_is_refused_and_corpora_compare_by_content(tmp_path):
    s = _run(tmp_path, "simpo", ("pt", "simpo"), ["safety"], corpus="a.jsonl", records="same")
    with pytest.raises(AnchoredError, match="name the same run"):
        write_anchored(str(s), str(tmp_path / "." / "simpo"), str(tmp_path / "out"))
    twin = _run(tmp_path, "twin", ("pt", "simpo2"), ["math"], ft="/m/simpo")
    with pytest.raises(AnchoredError, match="same fine-tune \\(/m/simpo\\)"):
        write_anchored(str(s), str(twin), str(tmp_path / "out"))
    # two copies of one corpus under other names: the same prompts, no warning
    i = _run(tmp_path, "it", ("pt", "it"), ["math"], corpus="copy/b.jsonl", records="same")
    assert not any(
        "different corpora" in w for w in write_anchored(str(s), str(i), str(tmp_path / "o"))["warnings"]
    )
    j = _run(tmp_path, "it2", ("pt", "it2"), ["math"], corpus="a.jsonl", records="other")
    assert any(
        "different corpora" in w for w in write_anchored(str(s), str(j), str(tmp_path / "o2"))["warnings"]
    )


def test_anchored_json_is_standard_json_where_a_category_is_on_one_side_only(tmp_path):
    """Δ of a category absent from I is NaN and its upper bound +inf: written as null, with
    `only_in` / `ci_high_unbounded` saying which (as report.json does), not as bare NaN/Infinity."""
    s = _run(tmp_path, "simpo", ("pt", "simpo"), ["safety", "poetry"])
    i = _run(tmp_path, "it", ("pt", "it"), ["safety", "math"])
    write_anchored(str(s), str(i), str(tmp_path / "out"))

    def refuse(constant):
        raise ValueError(f"not JSON: {constant}")

    body = json.loads((tmp_path / "out" / "anchored.json").read_text(), parse_constant=refuse)
    poetry = next(r for r in body["shift"] if r["category"] == "poetry")
    assert poetry["delta"] is None and poetry["ci_high"] is None and poetry["ci_high_unbounded"] is True
    assert poetry["only_in"] == "S"
