"""Pipeline resume across kills (stages stubbed, no Ray): a redo survives the kill of the run
that started it, a first run resumes where it stopped, settings that change no result redo
nothing, and finished runs keep their markers across the change of the stage identity."""

import json

import pytest

from jobs.pipeline import STAGES, Pipeline, PipelineConfig, with_defaults


class Killed(Exception):
    pass


def _pipeline(out, calls, kill_at=None, **kw):
    from conftest import pipeline_dict

    p = Pipeline(PipelineConfig.model_validate(with_defaults(pipeline_dict(str(out), **kw))))

    def fn(stage):
        def run(overwrite):
            calls.append((stage, overwrite))
            if stage == kill_at:
                raise Killed(stage)
            return {"stage": stage}

        return run

    p.missing_outputs = lambda stage: []  # stubbed stages write no outputs
    p.stage_fns = {s: fn(s) for s in STAGES}
    return p


def _run(out, kill_at=None, flags=None, **kw):
    calls: list = []
    try:
        _pipeline(out, calls, kill_at, **kw)(**(flags or {}))
    except Killed:
        pass
    return calls


def test_a_first_run_killed_resumes_the_stage_it_reached(tmp_path):
    out = tmp_path / "run"
    assert _run(out, kill_at="label") == [(s, False) for s in STAGES[:4]]
    assert _run(out) == [("label", False), ("report", False)]  # resumed, not redone
    assert _run(out) == []


def test_a_redo_killed_midway_is_still_a_redo(tmp_path):
    out = tmp_path / "run"
    _run(out)
    lr = {"fit": {"train": {"lr": 5e-3}}}
    assert _run(out, kill_at="fit", flags={"redo_changed": True}, **lr) == [("fit", True)]
    # rerun without the flag: the refit resumes (its old outputs were cleared before it started),
    # and analyze, label and report are redone (before, they resumed on the old crosscoder's outputs)
    assert _run(out, **lr) == [("fit", False), *((s, True) for s in ("analyze", "label", "report"))]
    assert _run(out, **lr) == []


def test_an_overwrite_killed_midway_redoes_every_stage(tmp_path):
    out = tmp_path / "run"
    _run(out)
    assert _run(out, kill_at="harvest", flags={"overwrite": True}) == [("harvest", True)]
    # the stub harvest never said it cleared its store: it starts over, and so does all after it
    assert _run(out) == [(s, True) for s in STAGES]


def test_a_re_harvest_killed_after_clearing_resumes_its_own_shards(tmp_path):
    """run_harvest calls on_cleared once its checks passed and the old store is gone: from then on
    a kill resumes the new harvest (it does not clear a shared store for a harvest that cannot run)."""
    out = tmp_path / "run"
    _run(out)
    calls: list = []
    p = _pipeline(out, calls)

    def harvest(overwrite):
        calls.append(("harvest", overwrite))
        if overwrite:
            p._on_cleared()
        raise Killed("harvest")

    p.stage_fns["harvest"] = harvest
    with pytest.raises(Killed):
        p(overwrite=True)
    assert _run(out) == [("harvest", False), *((s, True) for s in STAGES[1:])]


def test_a_changed_unfinished_stage_is_refused_before_anything_is_written(tmp_path):
    out = tmp_path / "run"
    _run(out, kill_at="analyze")
    before = (out / "pipeline.json").read_text()
    with pytest.raises(ValueError, match="--redo-changed"):
        _run(out, analyze={"tail_frac": 0.05})
    assert (out / "pipeline.json").read_text() == before  # the refused config was not recorded
    # analyze starts over; label and report never started, so they have nothing to replace
    assert _run(out, flags={"redo_changed": True}, analyze={"tail_frac": 0.05}) == [
        ("analyze", True),
        ("label", False),
        ("report", False),
    ]


@pytest.mark.parametrize(
    "change",
    [
        {"fit": {"train": {"log_every": 7, "checkpoint_every": 99, "device": "cpu"}}},
        {
            "fit": {
                "distributed": {"workers": 2, "max_failures": 5, "cpus_per_worker": 2, "prefetch_batches": 4},
                "train": {"batch_size": 1024, "shuffle_buffer_rows": 7},  # the in-process reader's
            }
        },
        {"analyze": {"evidence_workers": 3, "latents_per_pass": 64, "batch_size": 2048}},
        {"label": {"request_timeout_s": 999, "max_attempts": 9, "concurrency": 1, "batch_size": 3}},
    ],
)
def test_settings_that_change_no_result_redo_nothing(tmp_path, change):
    out = tmp_path / "run"
    ddp = {"distributed": {"workers": 2}, "train": {"batch_size": 1024}}
    fit = {"fit": ddp} if "distributed" in change.get("fit", {}) else {}
    _run(out, **fit)
    assert _run(out, **change) == []


def test_the_same_run_named_relatively_or_absolutely_is_the_same_run(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    _run("run")
    assert _run(tmp_path / "run") == []


def test_runs_finished_before_the_identity_change_are_not_redone(tmp_path):
    out = tmp_path / "run"
    _run(out)
    p = _pipeline(out, [])
    for s in STAGES:  # markers as the previous crossdiff wrote them
        m = json.loads(p.marker(s).read_text())
        m["hash"] = p.stage_config(s, legacy=True)["hash"]
        p.marker(s).write_text(json.dumps(m))
    assert _run(out) == []
    # the legacy identity is what the code of then dumped: no field added since (this test builds
    # it with today's code, so a new field must be kept out by name)
    from jobs.stage_identity import stage_own

    assert {"tokenizer", "source_mass"}.isdisjoint(stage_own(p.cfg, "analyze", legacy=True)["analyze"])


def test_a_fit_with_other_ddp_workers_is_a_changed_fit(tmp_path):
    # which rows each rank sees, hence the weights, depend on the DDP workers (and their shuffle)
    out = tmp_path / "run"
    ddp = {"distributed": {"workers": 2}, "train": {"batch_size": 1024}}
    _run(out, fit={"train": {"batch_size": 1024}})
    with pytest.raises(ValueError, match="ran stage 'fit' with a different config"):
        _run(out, fit=ddp)
    redo = _run(out, flags={"redo_changed": True}, fit=ddp)
    assert redo == [(s, True) for s in STAGES[1:]]
    buffer = {"distributed": {"workers": 2, "shuffle_buffer_rows": 5}, "train": {"batch_size": 1024}}
    with pytest.raises(ValueError, match="ran stage 'fit' with a different config"):
        _run(out, fit=buffer)


def _fit_record(p, **distributed):
    """run_config.json as a finished fit writes it, with these DDP settings."""
    fit = p.cfg.fit.model_dump(mode="json")
    fit["distributed"].update(distributed)
    (p.run / "run_config.json").write_text(json.dumps({"fit": fit}))


def test_ray_fits_marked_before_ddp_settings_counted_stand_only_for_their_own(tmp_path):
    out = tmp_path / "run"
    ddp = {"distributed": {"workers": 2}, "train": {"batch_size": 1024}}
    _run(out, fit=ddp)
    p = _pipeline(out, [], fit=ddp)
    for s in STAGES:  # markers as the previous crossdiff wrote them: no DDP settings in the fit's
        m = json.loads(p.marker(s).read_text())
        m["hash"] = p.stage_config(s, fit_workers=False)["hash"]
        p.marker(s).write_text(json.dumps(m))
    from jobs.stage_identity import stage_own

    was = p.cfg.fit.model_dump(
        mode="json", exclude={"distributed": True, "train": {"log_every", "checkpoint_every", "device"}}
    )
    assert stage_own(p.cfg, "fit", fit_workers=False) == was  # what that crossdiff hashed
    _fit_record(p, workers=2)  # ...made with the workers asked for: done
    assert _run(out, fit=ddp) == []
    _fit_record(p, workers=4)  # ...with others: a changed fit, however the marker reads
    with pytest.raises(ValueError, match="ran stage 'fit' with a different config"):
        _run(out, fit=ddp)
    # an in-process config on a run whose fit ran on 2 DDP workers (its identity never named them)
    out2 = tmp_path / "run2"
    _run(out2, fit={"train": {"batch_size": 1024}})
    _fit_record(_pipeline(out2, [], fit={"train": {"batch_size": 1024}}), workers=2)
    with pytest.raises(ValueError, match="ran stage 'fit' with a different config"):
        _run(out2, fit={"train": {"batch_size": 1024}})


def test_fit_changes_count_the_ddp_settings_that_decide_the_weights():
    from diffing.config import FitConfig
    from diffing.fit import fit_changes

    def cfg(**d):
        return FitConfig.model_validate({"distributed": d})

    def old(**d):
        return {"fit": cfg(**d).model_dump(mode="json")}

    assert fit_changes(old(), cfg(workers=2), 10) == ["distributed.workers"]
    assert fit_changes(old(workers=2), cfg(), 10) == ["distributed.workers"]
    assert fit_changes(old(workers=2), cfg(workers=4), 10) == ["distributed.workers"]
    assert fit_changes(old(workers=2), cfg(workers=2, shuffle_buffer_rows=9), 10) == [
        "distributed.shuffle_buffer_rows"
    ]
    same = cfg(workers=2, max_failures=9, cpus_per_worker=3, num_to_keep=5, prefetch_batches=0, use_gpu=True)
    assert fit_changes(old(workers=2), same, 10) == []  # GPUs or CPUs: as the in-process device
    assert fit_changes(old(shuffle_buffer_rows=1), cfg(shuffle_buffer_rows=2), 10) == []  # in-process: unused


def test_an_overwrite_of_some_stages_leaves_the_earlier_ones_done(tmp_path):
    out = tmp_path / "run"
    _run(out)
    assert _run(out, flags={"overwrite": True}, stages=["report"]) == [("report", True)]
    assert _run(out) == []  # harvest..label were not touched: nothing to redo


def test_redo_a_stage_redoes_it_and_the_later_ones_under_the_same_config(tmp_path):
    """--redo STAGE: that stage and the later ones run again from scratch (a report after an
    upgrade, a refit), the earlier ones stay done; killed midway, a rerun still redoes; a pending
    earlier stage resumes first, and a stage the run does not have is refused before anything."""
    out = tmp_path / "run"
    _run(out)
    assert _run(out, flags={"redo": "report"}) == [("report", True)]
    assert _run(out, flags={"redo": "analyze"}) == [("analyze", True), ("label", True), ("report", True)]
    assert _run(out, kill_at="label", flags={"redo": "analyze"}) == [("analyze", True), ("label", True)]
    # killed in label: its old labels were cleared when it started, so it resumes its new ones
    assert _run(out) == [("label", False), ("report", True)]
    assert _run(out) == []
    fresh = tmp_path / "fresh"
    _run(fresh, kill_at="fit")
    want = [("fit", False), ("analyze", False), ("label", False), ("report", True)]
    assert _run(fresh, flags={"redo": "report"}) == want  # the killed fit resumes, not redone
    with pytest.raises(ValueError, match=r"--redo label: not one of this run's stages \['fit', 'analyze'\]"):
        _run(out, flags={"redo": "label"}, stages=["fit", "analyze"])
    assert _run(out) == []  # the refusal wrote nothing
    with pytest.raises(ValueError, match="--redo fit and --overwrite: give one"):
        _run(out, flags={"redo": "fit", "overwrite": True})
    lr = {"fit": {"train": {"lr": 5e-3}}}  # a changed stage needs no --redo-changed to be redone
    assert [s for s, _ in _run(out, flags={"redo": "fit"}, **lr)] == ["fit", "analyze", "label", "report"]
    with pytest.raises(ValueError, match="--redo-changed"):  # ... but a changed earlier one does
        _run(out, flags={"redo": "analyze"})


def test_a_fit_killed_midway_resumes_under_its_checkpoint_hash(tmp_path):
    """A killed fit's checkpoints resume under the fit's own checkpoint hash: other logging and
    checkpoint intervals resume it; a change to the math is refused (or refit with the flag)."""
    out = tmp_path / "run"
    _run(out, kill_at="fit")
    # resumed (the stage runs without overwrite), not refused and not redone
    assert _run(out, kill_at="fit", fit={"train": {"log_every": 7, "checkpoint_every": 3}}) == [
        ("fit", False)
    ]
    with pytest.raises(ValueError, match="--redo-changed"):
        _run(out, fit={"train": {"lr": 5e-3}})
    assert _run(out, flags={"redo_changed": True}, fit={"train": {"lr": 5e-3}})[0] == ("fit", True)
    assert _run(out, fit={"train": {"lr": 5e-3, "log_every": 9}}) == []  # finished: any interval


def test_a_stage_subset_does_not_build_on_an_unfinished_stage(tmp_path):
    out = tmp_path / "run"
    _run(out)
    _run(out, kill_at="fit", flags={"redo_changed": True}, fit={"train": {"lr": 5e-3}})
    with pytest.raises(ValueError, match="stage 'fit' is unfinished"):
        _run(out, stages=["analyze", "label", "report"], fit={"train": {"lr": 5e-3}})


def test_a_redo_clears_the_old_outputs_before_it_starts(tmp_path):
    """What makes resuming a killed redo safe: the stage's old outputs are gone before it runs."""
    out = tmp_path / "run"
    _run(out)
    old = {
        "checkpoints/step_00000100.pt": "old",
        "metrics.json": "{}",
        "crosscoder/cfg.json": "{}",
        "latents.parquet": "old",
        "examples/latents-00000.jsonl": "old",
        "splice.json": "old",
        "labels.jsonl": "old",
        "store/manifest.json": "old",
    }
    for rel, text in old.items():
        (out / rel).parent.mkdir(parents=True, exist_ok=True)
        (out / rel).write_text(text)
    _run(out, kill_at="fit", flags={"redo_changed": True}, fit={"train": {"lr": 5e-3}})
    assert (out / "store" / "manifest.json").exists()  # harvest was not redone
    for rel in ("checkpoints/step_00000100.pt", "metrics.json", "crosscoder/cfg.json"):
        assert not (out / rel).exists(), rel  # the fit's: cleared before the refit started
    p = _pipeline(out, [], fit={"train": {"lr": 5e-3}})
    assert all(p._saved(s) == {"stale": True} for s in ("analyze", "label", "report"))
    _run(out, kill_at="label", fit={"train": {"lr": 5e-3}})  # analyze and label cleared as they start
    for rel in ("latents.parquet", "examples/latents-00000.jsonl", "splice.json", "labels.jsonl"):
        assert not (out / rel).exists(), rel


def test_a_missing_taxonomy_is_refused_before_the_first_stage(tmp_path):
    calls: list = []
    p = _pipeline(tmp_path / "r", calls, label={"service": {"taxonomy": str(tmp_path / "nope.yaml")}})
    with pytest.raises(FileNotFoundError, match="nope.yaml"):
        p()
    assert calls == []  # not after hours of harvest and fit


def test_label_groups_must_name_groups_of_the_run(tmp_path):
    from conftest import pipeline_dict

    from diffing.config import ConfigError
    from jobs.pipeline_config import load_pipeline_config

    d = pipeline_dict(str(tmp_path / "r"), label={"groups": ["base-specific", "ft-specific"]})
    with pytest.raises(ValueError, match=r"label.groups: \['base-specific', 'ft-specific'\] name no group"):
        PipelineConfig.model_validate(with_defaults(d))
    ok = pipeline_dict(str(tmp_path / "r"), label={"groups": ["b-specific", "baseline"]})
    assert set(PipelineConfig.model_validate(with_defaults(ok)).label.groups) == {"b-specific", "baseline"}
    # a stage's own config given to the pipeline says where its fields go
    (tmp_path / "h.yaml").write_text("models: [{name: a, path: /m/a}, {name: b, path: /m/b}]\nlayer: 1\n")
    with pytest.raises(ConfigError, match="looks like a `harvest` stage config"):
        load_pipeline_config(tmp_path / "h.yaml", out=str(tmp_path / "r"))


def test_the_embedded_judge_in_json_mode_is_called_weak(monkeypatch):
    from serve.settings import ServiceSettings

    monkeypatch.delenv("CROSSDIFF_JUDGE_MODEL", raising=False)
    assert "one category" in ServiceSettings().weak_judge()
    assert ServiceSettings.model_validate({"method": {"classify_mode": "channel"}}).weak_judge() is None
    assert (
        ServiceSettings.model_validate({"judge": {"model_source": "Qwen/Qwen2.5-7B-Instruct"}}).weak_judge()
        is None
    )


def test_a_ray_fit_killed_midway_refuses_another_data_split(tmp_path):
    """A Ray Train fit's checkpoints are tied to how its workers split the data (the shuffle
    buffer is not part of the stage's own hash, only of the checkpoints'): refused, or refit with
    the flag; its CPUs per worker are not (resumed)."""
    out = tmp_path / "run"
    ray_fit = {"distributed": {"workers": 2}}
    _run(out, kill_at="fit", fit=ray_fit)
    again = {"distributed": {"workers": 2, "cpus_per_worker": 2.0}}
    assert _run(out, kill_at="fit", fit=again) == [("fit", False)]
    other = {"distributed": {"workers": 2, "shuffle_buffer_rows": 1024}}
    with pytest.raises(ValueError, match="--redo-changed"):
        _run(out, fit=other)
    assert _run(out, flags={"redo_changed": True}, fit=other)[0] == ("fit", True)


def test_a_corpus_changed_in_place_is_not_taken_for_the_one_harvested(tmp_path):
    """The harvest stage is named by its config, whose corpus is a URI: prompts appended to that
    file would otherwise leave every stage 'finished with this config' and report the old results."""
    out, corpus = tmp_path / "run", tmp_path / "c.jsonl"
    corpus.write_text('{"text": "one"}\n')
    harvest = {"models": [{"name": "a", "path": "/m/a"}, {"name": "b", "path": "/m/b"}], "layer": 1}
    harvest["corpus"] = {"uri": str(corpus)}
    assert len(_run(out, harvest=harvest)) == len(STAGES)
    corpus.write_text('{"text": "one"}\n')  # rewritten with the same content: still the same corpus
    assert _run(out, harvest=harvest) == []
    corpus.write_text('{"text": "one"}\n{"text": "two"}\n')
    with pytest.raises(ValueError, match=r"another version of its corpus .*--redo-changed"):
        _run(out, harvest=harvest)
    redo = _run(out, harvest=harvest, flags={"redo_changed": True})
    assert redo[0] == ("harvest", True) and [s for s, _ in redo] == list(STAGES)  # from scratch
    assert _run(out, harvest=harvest) == []  # the new version is the harvested one now


def _writing(out, calls, **kw):
    """Stubs that write each stage's key outputs, with the real check of them."""
    from conftest import pipeline_dict

    p = Pipeline(PipelineConfig.model_validate(with_defaults(pipeline_dict(str(out), **kw))))
    files = {
        "harvest": ["store/manifest.json"],
        "fit": ["metrics.json", "crosscoder/model.safetensors"],
        "analyze": ["latents.parquet", "examples/0.jsonl"],
        "label": ["labels.jsonl"],
        "report": ["report.json", "report.html"],
    }

    def fn(stage):
        def run(overwrite):
            calls.append((stage, overwrite))
            for rel in files[stage]:
                (p.run / rel).parent.mkdir(parents=True, exist_ok=True)
                (p.run / rel).write_text("x")
            return {"stage": stage}

        return run

    p.stage_fns = {s: fn(s) for s in STAGES}
    return p


@pytest.mark.parametrize(
    "gone, redone",
    [
        ("report.html", ["report"]),
        ("labels.jsonl", ["label", "report"]),
        ("latents.parquet", ["analyze", "label", "report"]),
        ("crosscoder/model.safetensors", ["fit", "analyze", "label", "report"]),
        ("metrics.json", ["fit", "analyze", "label", "report"]),
        ("report.json", ["report"]),
        # a store deleted to save space after fit and analyze: label and report do not read it
        ("store/manifest.json", []),
    ],
)
def test_a_deleted_output_is_redone_not_vouched_for_by_its_marker(tmp_path, gone, redone):
    """A `done` marker whose stage's output was deleted since: that stage resumes, the later ones
    (built on it) are redone; before, every stage said finished and the file stayed missing."""
    out = tmp_path / "run"
    calls: list = []
    _writing(out, calls)()
    for rel in gone.split():
        (out / rel).unlink()
    calls.clear()
    _writing(out, calls)()
    assert [s for s, _ in calls] == redone
    if redone:
        assert calls[0] == (redone[0], False)  # resumed, not cleared
        assert all(ow for _, ow in calls[1:])  # the later ones redone from scratch
    calls.clear()
    _writing(out, calls)()
    assert calls == []


@pytest.mark.parametrize(
    "gone, redone",
    [
        ("compare/a-vs-c/labels.jsonl", ["label", "report"]),
        ("compare/a-vs-b/latents.parquet", ["analyze", "label", "report"]),
        ("compare/a-vs-c/report.html", ["report"]),
        ("report.html", ["report"]),  # the run's own page over the comparisons
    ],
)
def test_a_deleted_output_of_one_comparison_is_redone(tmp_path, gone, redone):
    """Several comparisons over one crosscoder: each comparison's outputs are vouched for on their
    own, and so is the run's page over them."""
    from conftest import pipeline_dict

    models = [*pipeline_dict("x")["harvest"]["models"], {"name": "c", "path": "/m/c"}]
    kw = {
        "harvest": {**pipeline_dict("x")["harvest"], "models": models},
        "comparisons": [["a", "b"], ["a", "c"]],
    }
    out = tmp_path / "run"
    calls: list = []
    per = {
        "analyze": ["latents.parquet", "examples/0.jsonl"],
        "label": ["labels.jsonl"],
        "report": ["report.json", "report.html"],
    }

    def pipeline():
        """_writing's stubs, each also writing its outputs into both comparisons' directories."""
        p = _writing(out, calls, **kw)
        base = dict(p.stage_fns)

        def both(stage):
            def run(overwrite):
                base[stage](overwrite)
                for d in ("compare/a-vs-b", "compare/a-vs-c"):
                    for rel in per.get(stage, []):
                        (out / d / rel).parent.mkdir(parents=True, exist_ok=True)
                        (out / d / rel).write_text("x")
                return {"stage": stage}

            return run

        p.stage_fns = {s: both(s) for s in STAGES}
        return p

    pipeline()()
    (out / gone).unlink()
    calls.clear()
    pipeline()()
    assert [s for s, _ in calls] == redone
    calls.clear()
    pipeline()()
    assert calls == []


def test_a_corpus_inside_the_run_moves_with_it(tmp_path, monkeypatch):
    """The presets write their corpus into the run: the run named relatively, absolutely or moved
    is the same run (its corpus content is stamped); markers written with the path as typed (before
    this) are still accepted."""
    import shutil

    monkeypatch.chdir(tmp_path)

    def corpus(out):
        return {"harvest": {**_harvest(), "corpus": {"uri": f"{out}/corpus.jsonl"}}}

    def _harvest():
        from conftest import pipeline_dict

        return pipeline_dict("x")["harvest"]

    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "corpus.jsonl").write_text('{"text": "a"}\n')
    assert len(_run("run", **corpus("run"))) == len(STAGES)
    assert _run(tmp_path / "run", **corpus(tmp_path / "run")) == []
    (tmp_path / "sub").mkdir()
    monkeypatch.chdir(tmp_path / "sub")
    assert _run("../run", **corpus("../run")) == []
    monkeypatch.chdir(tmp_path)
    shutil.copytree("run", "moved")
    assert _run("moved", **corpus("moved")) == []
    # a marker as the previous crossdiff wrote it: the corpus path as typed
    p = _pipeline("run", [], **corpus("run"))
    for s in STAGES:
        m = json.loads(p.marker(s).read_text())
        m["hash"] = p.stage_config(s, raw_paths=True)["hash"]
        p.marker(s).write_text(json.dumps(m))
    assert p.stage_config("harvest", raw_paths=True)["hash"] != p.stage_config("harvest")["hash"]
    assert _run("run", **corpus("run")) == []


def test_a_stage_that_reads_a_deleted_store_is_refused_not_reharvested(tmp_path):
    """Analyze must run again but the store is gone: re-harvesting would clear the fitted crosscoder
    (fit builds on the harvest), so the run stops with the ways out; nothing is touched."""
    out = tmp_path / "run"
    _writing(out, [])()
    (out / "store" / "manifest.json").unlink()
    (out / "latents.parquet").unlink()
    calls: list = []
    with pytest.raises(
        ValueError, match=r"\['analyze'\] read the store .* is gone.*crossdiff harvest.*--overwrite"
    ):
        _writing(out, calls)()
    assert calls == [] and (out / "crosscoder" / "model.safetensors").exists()


def test_a_shared_store_redone_by_another_run_is_refused_before_fit_or_analyze(tmp_path):
    """The harvest marker keeps the store's content fingerprint: when a run sharing the store redid
    it since, this run's fit or analysis would read that other data under its own name."""
    import numpy as np

    from diffing.fit import manifest_fingerprint
    from diffing.store import write_arrays

    out = tmp_path / "run"
    _writing(out, [])()
    acts = np.random.default_rng(0).standard_normal((64, 2, 8)).astype(np.float32)
    st = write_arrays(str(out / "store"), acts, model_names=["a", "b"], overwrite=True)
    marker = out / "stages" / "harvest.json"
    m = json.loads(marker.read_text())
    m["summary"] = {**m["summary"], "fingerprint": manifest_fingerprint(st.manifest)}
    marker.write_text(json.dumps(m))
    (out / "latents.parquet").unlink()
    calls: list = []
    _writing(out, calls)()  # the same content: analyze resumes
    assert [s for s, _ in calls][:1] == ["analyze"]
    write_arrays(str(out / "store"), acts[::-1].copy(), model_names=["a", "b"], overwrite=True)
    (out / "latents.parquet").unlink()
    calls.clear()
    with pytest.raises(
        ValueError, match=r"holds other data than this run's harvest wrote.*another run sharing it"
    ):
        _writing(out, calls)()
    assert calls == []
