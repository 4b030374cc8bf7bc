"""Pipeline run directories on S3 (moto on 127.0.0.1): the local-copy mirror, a remote run that
resumes on a machine with an empty working copy, and the tiny pipeline end to end with `out=s3://`."""

import json
import shutil
import uuid

import fsspec
import pytest
from conftest import pipeline_dict

from jobs.pipeline import STAGES, Pipeline, PipelineConfig, load_pipeline_config, with_defaults
from jobs.rundir import RunMirror


def _url() -> str:
    return f"s3://crossdiff-test/runs/{uuid.uuid4().hex[:8]}"


def _remote_text(url: str, rel: str) -> str:
    fs, root = fsspec.core.url_to_fs(url)
    fs.invalidate_cache()
    return fs.cat_file(f"{root}/{rel}").decode()


@pytest.mark.timeout(120)
def test_mirror_push_pull_changes_deletes_and_stale_markers(tmp_path, s3_endpoint):
    url = _url()
    a = tmp_path / "a"
    (a / "stages").mkdir(parents=True)
    (a / "stages" / "harvest.json").write_text('{"hash": "h1"}')
    (a / "big.bin").write_bytes(b"x" * (2 << 20))
    (a / "store").mkdir()
    (a / "store" / "shard.parquet").write_bytes(b"never copied")  # lives on the remote only
    (a / "part.tmp").write_text("half-written")
    m = RunMirror(url, a)
    assert m.push() == 2 and m.push() == 0  # unchanged files are not sent again
    assert set(m.remote_files()) == {"stages/harvest.json", "big.bin"}

    b = tmp_path / "b"  # another machine
    mb = RunMirror(url, b)
    assert mb.pull() == 2 and (b / "big.bin").read_bytes() == b"x" * (2 << 20)
    assert mb.pull() == 0  # nothing changed on either side: nothing fetched
    # same size, new content on the remote: fetched (versions, not sizes, decide)
    (a / "big.bin").write_bytes(b"y" * (2 << 20))
    assert m.push() == 1
    mb.pull()
    assert (b / "big.bin").read_bytes()[:1] == b"y"
    # deleted locally -> deleted remotely; a local marker the remote never got is dropped on pull
    (a / "big.bin").unlink()
    m.push()
    assert set(m.remote_files()) == {"stages/harvest.json"}
    (b / "stages" / "fit.json").write_text('{"hash": "unconfirmed"}')
    mb.pull()
    assert not (b / "stages" / "fit.json").exists() and (b / "stages" / "harvest.json").exists()
    # the remote is the truth: a file synced before and deleted there goes locally too (else a
    # reused working copy would re-upload a marker for outputs the bucket no longer has)
    assert not (b / "big.bin").exists()
    fs, root = fsspec.core.url_to_fs(url)
    fs.rm(f"{root}/stages/harvest.json")
    mb.pull()
    assert not (b / "stages" / "harvest.json").exists()
    # folder placeholders are not files; symlinks (compare/ links to the shared crosscoder) stay local
    fs.pipe_file(f"{root}/examples/", b"")
    (a / "examples").mkdir()
    (a / "examples" / "0-8.jsonl").write_text("{}")
    (a / "compare").mkdir()
    (a / "compare" / "metrics.json").symlink_to(a / "examples" / "0-8.jsonl")
    m.push()
    assert set(m.remote_files()) == {"examples/0-8.jsonl"}
    mb.pull()
    assert (b / "examples" / "0-8.jsonl").read_text() == "{}"
    # a mirror that skips an entry (label/report skip the crosscoder) neither fetches, uploads nor
    # deletes it, even in a working copy that synced it before
    (a / "crosscoder").mkdir()
    (a / "crosscoder" / "model.safetensors").write_bytes(b"w")
    m.push()
    mb.pull()
    (b / "crosscoder" / "model.safetensors").unlink()
    (b / "crosscoder" / "local-only.txt").write_text("x")
    skipping = RunMirror(url, b, skip=("crosscoder",))
    assert skipping.pull() == 0 and skipping.push() == 0
    assert "crosscoder/model.safetensors" in m.remote_files()
    assert "crosscoder/local-only.txt" not in m.remote_files()
    c = tmp_path / "c"
    RunMirror(url, c, skip=("crosscoder",)).pull()
    assert (c / "examples" / "0-8.jsonl").exists() and not (c / "crosscoder").exists()


def _stub_cfg(tmp_path, url, **kw):
    return PipelineConfig.model_validate(
        with_defaults(pipeline_dict(url, work_dir=str(tmp_path / "work"), **kw))
    )


def _stubbed(p: Pipeline, calls: list, fail_at: str | None = None) -> Pipeline:
    def stage(s):
        def fn(overwrite):
            if s == fail_at:
                raise RuntimeError(f"killed in {s}")
            calls.append(s)
            (p.run / f"{s}.out").write_text(s)
            if s == "fit":
                (p.run / "crosscoder").mkdir(exist_ok=True)
                (p.run / "crosscoder" / "model.safetensors").write_text("weights")
            return {"stage": s}

        return fn

    p.missing_outputs = lambda stage: []  # stubbed stages write no outputs
    p.stage_fns = {s: stage(s) for s in STAGES}
    return p


@pytest.mark.timeout(120)
def test_remote_run_resumes_on_another_machine(tmp_path, s3_endpoint):
    """Stages stubbed (no Ray). A run killed in `label` resumes from the remote alone, with an empty
    working copy, at `label`; a finished remote run reruns nothing; --overwrite clears the remote markers."""
    url = _url()
    cfg = _stub_cfg(tmp_path / "m1", url)
    assert cfg.harvest.store == f"{url}/store" and cfg.run == tmp_path / "m1" / "work"
    calls: list = []
    with pytest.raises(RuntimeError, match="killed in label"):
        _stubbed(Pipeline(cfg), calls, fail_at="label")()
    assert calls == ["harvest", "fit", "analyze"]
    fs, root = fsspec.core.url_to_fs(url)
    fs.invalidate_cache()
    assert sorted(fs.ls(f"{root}/stages", detail=False)) == [
        f"{root}/stages/{s}.json" for s in ("analyze", "fit", "harvest", "label")
    ]
    # the killed stage's marker went up when it started: it says running, never done
    assert json.loads(_remote_text(url, "stages/label.json"))["running"] is True
    assert _remote_text(url, "analyze.out") == "analyze"  # outputs went up with their stage

    cfg2 = _stub_cfg(tmp_path / "m2", url)  # a second machine: nothing local
    calls.clear()
    _stubbed(Pipeline(cfg2), calls)()
    assert calls == ["label", "report"]
    assert (cfg2.run / "fit.out").read_text() == "fit"  # earlier outputs copied down
    # label and report read the analysis: the weights stay in the bucket, not copied, not deleted
    assert not (cfg2.run / "crosscoder").exists()
    assert _remote_text(url, "crosscoder/model.safetensors") == "weights"
    assert json.loads(_remote_text(url, "stages/report.json"))["summary"] == {"stage": "report"}
    assert json.loads(_remote_text(url, "pipeline.json"))["out"] == url

    calls.clear()
    _stubbed(Pipeline(cfg), calls)()  # the first machine again: its stale copy catches up, no work
    assert calls == []
    _stubbed(Pipeline(cfg), calls)(overwrite=True)
    assert calls == list(STAGES)


@pytest.mark.timeout(120)
def test_remote_run_resumed_at_analyze_copies_the_weights_down(tmp_path, s3_endpoint):
    url = _url()
    calls: list = []
    with pytest.raises(RuntimeError, match="killed in analyze"):
        _stubbed(Pipeline(_stub_cfg(tmp_path / "m1", url)), calls, fail_at="analyze")()
    cfg2 = _stub_cfg(tmp_path / "m2", url)
    calls.clear()
    _stubbed(Pipeline(cfg2), calls)()
    assert calls == ["analyze", "label", "report"]
    assert (cfg2.run / "crosscoder" / "model.safetensors").read_text() == "weights"


@pytest.mark.timeout(120)
def test_placed_analysis_leaves_the_weights_in_the_bucket(tmp_path, s3_endpoint):
    """With `analyze_task` the driver resuming at analyze does not copy the weights down (the task
    copies them to its own node); the stage's outputs, which the task pushed, are pulled back."""
    url = _url()
    calls: list = []
    with pytest.raises(RuntimeError, match="killed in analyze"):
        _stubbed(Pipeline(_stub_cfg(tmp_path / "m1", url)), calls, fail_at="analyze")()
    cfg2 = _stub_cfg(tmp_path / "m2", url, analyze_task={"num_gpus": 1})
    p = _stubbed(Pipeline(cfg2), calls)
    other = RunMirror(url, tmp_path / "task")  # the task's node

    def placed(overwrite):
        other.pull()
        assert (other.local / "crosscoder" / "model.safetensors").read_text() == "weights"
        (other.local / "latents.parquet").write_text("from the task")
        other.push()
        p.mirror.pull()  # as Pipeline._analyze does after the task
        return {"task": True}

    p.stage_fns["analyze"] = placed
    calls.clear()
    p()
    assert calls == ["label", "report"]
    assert not (cfg2.run / "crosscoder").exists()
    assert (cfg2.run / "latents.parquet").read_text() == "from the task"


def test_placement_feasibility_names_what_every_node_lacks():
    from jobs.analyze_task import unmet
    from jobs.pipeline_config import TaskPlacement

    cpu = {"Alive": True, "Resources": {"CPU": 4.0, "memory": 8 * 2**30}}
    gpu = {
        "Alive": True,
        "Resources": {"CPU": 8.0, "GPU": 1.0, "memory": 40 * 2**30, "accelerator_type:A10G": 1.0},
    }
    assert unmet(TaskPlacement(num_gpus=0), [cpu]) == []
    assert unmet(TaskPlacement(), [cpu]) == ["GPU 0 < 1"]
    assert unmet(TaskPlacement(num_cpus=4), [cpu, gpu]) == []  # one node that fits is enough
    why = unmet(TaskPlacement(memory_gb=64, accelerator_type="H100"), [cpu, gpu])
    assert why == [
        "GPU 0 < 1, memory 8.0 GiB < 64 GiB, no accelerator_type:H100",
        "memory 40.0 GiB < 64 GiB, no accelerator_type:H100",
    ]
    assert unmet(TaskPlacement(), [{**gpu, "Alive": False}]) == ["no live node"]


def test_a_placement_no_node_of_our_own_ray_can_hold_is_refused(tmp_path, monkeypatch):
    """On the Ray this process started on this machine (by any earlier stage: nothing joins it),
    a placement no node can hold fails at once instead of waiting forever."""
    import ray

    from cluster import connect
    from jobs.analyze_task import analyze_in_task

    monkeypatch.setattr(connect, "ensure_ray", lambda address=None: None)
    monkeypatch.setattr(connect, "STARTED_LOCAL", True)
    monkeypatch.setattr(ray, "nodes", lambda: [{"Alive": True, "Resources": {"CPU": 4.0}}])
    cfg = PipelineConfig.model_validate(with_defaults(pipeline_dict(str(tmp_path / "run"), analyze_task={})))
    with pytest.raises(ValueError, match=r"GPU 0 < 1.*set analyze_task: null"):
        analyze_in_task(cfg, cfg.run, overwrite=False)


@pytest.mark.timeout(120)
def test_a_pull_keeps_the_remotes_order_of_writes(tmp_path, s3_endpoint):
    """Pulled files carry the remote's modification times, not the download's: what decides by
    mtime (a legacy analysis older than its weights) sees the order the run was written in."""
    import time

    url = _url()
    a = tmp_path / "a"
    (a / "crosscoder").mkdir(parents=True)
    (a / "latents.parquet").write_bytes(b"analysis")
    m = RunMirror(url, a)
    assert m.push() == 1
    time.sleep(1.2)  # S3 keeps whole seconds
    (a / "crosscoder" / "model.safetensors").write_bytes(b"weights")  # written after: a refit
    assert m.push() == 1
    b = tmp_path / "b"
    mb = RunMirror(url, b)
    assert mb.pull() == 2  # in path order: the weights first
    older = (b / "latents.parquet").stat().st_mtime
    assert (b / "crosscoder" / "model.safetensors").stat().st_mtime >= older + 1
    assert mb.pull() == 0  # the sync record holds the times set: nothing fetched again


def test_pruning_pull_drops_what_the_remote_lacks(tmp_path, s3_endpoint):
    """A placed analysis's own copy: files a killed attempt left unsynced go on pull(prune=True);
    symlinks (compare/ links to the shared crosscoder) and what the mirror skips stay."""
    url = _url()
    a = RunMirror(url, tmp_path / "a")
    (a.local / "examples").mkdir(parents=True)
    (a.local / "examples" / "0-8.jsonl").write_text("{}")
    a.push()
    t = RunMirror(url, tmp_path / "task")
    t.pull()
    (t.local / "latents.parquet").write_text("from a killed attempt")  # never pushed
    (t.local / "examples" / "8-16.jsonl").write_text("{}")
    (t.local / "crosscoder").mkdir()
    (t.local / "compare" / "p").mkdir(parents=True)
    (t.local / "compare" / "p" / "crosscoder").symlink_to(t.local / "crosscoder")
    (t.local / "store").mkdir()
    (t.local / "store" / "x").write_text("remote only: skipped")
    t.pull()  # a plain pull keeps local work
    assert (t.local / "latents.parquet").exists()
    t.pull(prune=True)
    assert not (t.local / "latents.parquet").exists() and not (t.local / "examples" / "8-16.jsonl").exists()
    assert (t.local / "examples" / "0-8.jsonl").exists() and (
        t.local / "compare" / "p" / "crosscoder"
    ).is_symlink()
    assert (t.local / "store" / "x").exists()


@pytest.mark.ray
@pytest.mark.timeout(180)
def test_placed_analysis_of_a_run_the_node_cannot_see(tmp_path, ray_cluster):
    """A local out the task's node does not see fails with the fix, not a Ray traceback."""
    from jobs.analyze_task import analyze_in_task

    cfg = PipelineConfig.model_validate(
        with_defaults(pipeline_dict(str(tmp_path / "run"), analyze_task={"num_gpus": 0, "num_cpus": 0.25}))
    )
    with pytest.raises(FileNotFoundError, match="object-storage URL") as e:
        analyze_in_task(cfg, cfg.run, overwrite=False)
    assert "RayTaskError" not in type(e.value).__name__


@pytest.mark.timeout(120)
def test_remote_overwrite_does_not_fetch_the_weights_it_replaces(tmp_path, s3_endpoint):
    url = _url()
    calls: list = []
    _stubbed(Pipeline(_stub_cfg(tmp_path / "m1", url)), calls)()
    p = _stubbed(Pipeline(_stub_cfg(tmp_path / "m2", url)), calls)
    fit = p.stage_fns["fit"]
    seen = []
    p.stage_fns["fit"] = lambda overwrite: seen.append((p.run / "crosscoder").exists()) or fit(overwrite)
    calls.clear()
    p(overwrite=True)
    assert calls == list(STAGES) and seen == [False]
    assert _remote_text(url, "crosscoder/model.safetensors") == "weights"  # the refit's, pushed


def test_remote_out_config_errors(tmp_path):
    with pytest.raises(ValueError, match="work_dir"):
        PipelineConfig.model_validate(
            with_defaults(pipeline_dict(str(tmp_path / "run"), work_dir=str(tmp_path / "w")))
        )


@pytest.mark.timeout(120)
def test_unwritable_remote_fails_before_any_stage(tmp_path, s3_endpoint):
    cfg = _stub_cfg(tmp_path, "s3://no-such-bucket-crossdiff/run")
    calls: list = []
    with pytest.raises(RuntimeError, match="out=s3://no-such-bucket-crossdiff/run"):
        _stubbed(Pipeline(cfg), calls)()
    assert calls == []


@pytest.mark.timeout(120)
def test_a_bucket_run_leased_by_a_live_driver_elsewhere_is_refused_then_taken_when_stale(
    tmp_path, s3_endpoint
):
    """A RayJob resubmitted while the first driver (another pod) still heartbeats: the second is
    refused before it pulls or writes anything; once the lease is stale it takes the run over."""
    import json
    import time

    import fsspec

    from jobs.runlock import LEASE_FILE, RunBusy

    fs = fsspec.filesystem("s3")
    lease = {
        "lease": "other",
        "host": "pod-a",
        "pid": 7,
        "command": "crossdiff pipeline",
        "heartbeat": time.time(),
    }
    fs.pipe_file(f"crossdiff-test/held/{LEASE_FILE}", json.dumps(lease).encode())
    cfg = _stub_cfg(tmp_path, "s3://crossdiff-test/held")
    calls: list = []
    with pytest.raises(RunBusy, match=r"in use by crossdiff pipeline \(pid 7 on pod-a"):
        _stubbed(Pipeline(cfg), calls)()
    assert calls == [] and fs.ls("crossdiff-test/held") == [f"crossdiff-test/held/{LEASE_FILE}"]
    fs.pipe_file(
        f"crossdiff-test/held/{LEASE_FILE}", json.dumps({**lease, "heartbeat": time.time() - 600}).encode()
    )
    # just written, so the store's own time would vouch for the holder: as if ten minutes had passed
    import jobs.runlock

    real_age = jobs.runlock.object_age
    assert real_age(fs.info(f"crossdiff-test/held/{LEASE_FILE}")) < 60  # S3's LastModified, read
    jobs.runlock.object_age = lambda info: 600.0
    try:
        _stubbed(Pipeline(cfg), calls)()
    finally:
        jobs.runlock.object_age = real_age
    assert calls == ["harvest", "fit", "analyze", "label", "report"]
    assert json.loads(fs.cat_file(f"crossdiff-test/held/{LEASE_FILE}"))["released"]  # given back at the end


@pytest.mark.ray
@pytest.mark.slow
@pytest.mark.timeout(900)
def test_tiny_pipeline_on_s3(tmp_path, s3_endpoint, ray_cluster):
    """The tiny preset with out=s3://: the corpus, the store, Ray Train's checkpoints and every stage's
    outputs land in the bucket; the analysis runs as a placed Ray task (`analyze_task`, as on a GPU
    worker) and gives what the driver gives; a second machine (empty work dir) finds the run finished."""
    import os

    import pyarrow.parquet as pq

    from jobs.analyze import run_analyze
    from jobs.analyze_task import task_work_dir
    from jobs.pipeline import run_pipeline

    url = _url()
    sets = [
        "stages=[harvest,fit,analyze,report]",
        "fit.distributed.workers=1",
        "fit.distributed.cpus_per_worker=1",
        "analyze_task={num_gpus: 0, num_cpus: 0.5}",
    ]
    try:
        res = run_pipeline(preset="tiny", out=url, overrides=[*sets, f"work_dir={tmp_path / 'w1'}"])
        assert (task_work_dir(url) / "latents.parquet").exists()
    finally:  # the task's working copy is in the shared cache
        shutil.rmtree(task_work_dir(url), ignore_errors=True)
    assert res["harvest"]["rows"] > 1000 and res["fit"]["fve"]["base"] > 0.5
    task = res["analyze"]["task"]
    assert task["pid"] != os.getpid()  # it ran in a Ray worker, on its own copy of the run
    assert res["analyze"]["out"] == str(tmp_path / "w1" / "latents.parquet")  # as the driver sees it
    # the driver's copy holds the task's outputs, and they are what an analysis here gives
    cfg = load_pipeline_config(preset="tiny", out=url, overrides=[*sets, f"work_dir={tmp_path / 'w1'}"])
    here = tmp_path / "here"
    assert not (tmp_path / "w1" / "crosscoder").exists()  # fit on Ray Train, analysis placed: never here
    fs, root = fsspec.core.url_to_fs(url)
    fs.get(f"{root}/crosscoder", str(here / "crosscoder"), recursive=True)
    run_analyze(here, cfg.harvest.store, cfg.analyze, pair=cfg.pair_names)
    placed, local = (
        pq.read_table(tmp_path / "w1" / "latents.parquet"),
        pq.read_table(here / "latents.parquet"),
    )
    assert placed.num_rows > 0 and placed.to_pandas().equals(local.to_pandas())  # NaN ν of dead latents alike
    assert sorted(p.name for p in (tmp_path / "w1" / "examples").iterdir()) == sorted(
        p.name for p in (here / "examples").iterdir()
    )
    fs, root = fsspec.core.url_to_fs(url)
    fs.invalidate_cache()
    have = {p[len(root) + 1 :] for p in fs.find(root)}
    for rel in (
        "corpus.jsonl",
        "store/manifest.json",
        "metrics.json",
        "crosscoder/model.safetensors",
        "latents.parquet",
        "report.html",
        "stages/report.json",
        "pipeline.json",
    ):
        assert rel in have, rel
    assert any(p.startswith("ray/") for p in have)  # Ray Train checkpointed to the bucket

    cfg = load_pipeline_config(preset="tiny", out=url, overrides=[*sets, f"work_dir={tmp_path / 'w2'}"])
    again = Pipeline(cfg)
    ran: list = []
    again.missing_outputs = lambda stage: []  # stubbed stages write no outputs
    again.stage_fns = {s: (lambda overwrite, s=s: ran.append(s) or {}) for s in STAGES}
    again()
    assert ran == [] and (tmp_path / "w2" / "report.html").exists()


@pytest.mark.timeout(120)
def test_work_inside_a_stage_reaches_the_bucket_before_the_stage_ends(tmp_path, s3_endpoint):
    """sync_every_s: a stage killed midway leaves what it wrote so far in the bucket (not its marker);
    the rerun on an empty machine sees that partial work and redoes the stage, which resumes it."""
    import time

    url = _url()
    cfg = _stub_cfg(tmp_path / "m1", url, sync_every_s=0.2, stages=["harvest", "label"])
    fs, root = fsspec.core.url_to_fs(url)
    p = Pipeline(cfg)
    seen: list = []

    def label(overwrite):
        with open(p.run / "labels.jsonl", "a") as f:
            f.write('{"latent": 1}\n')
        for _ in range(600):  # the background sync (every 0.2 s) uploads it while the stage still runs
            fs.invalidate_cache()
            if fs.exists(f"{root}/labels.jsonl"):
                raise RuntimeError("killed after the first label")
            time.sleep(0.1)
        raise AssertionError("labels.jsonl never reached the bucket during the stage")

    p.missing_outputs = lambda stage: []  # stubbed stages write no outputs
    p.stage_fns = {"harvest": lambda overwrite: {}, "label": label}
    with pytest.raises(RuntimeError, match="killed after the first label"):
        p()
    assert json.loads(fs.cat_file(f"{root}/stages/label.json")).get("running") is True  # not done
    p2 = Pipeline(_stub_cfg(tmp_path / "m2", url, sync_every_s=0.2, stages=["harvest", "label"]))
    p2.missing_outputs = lambda stage: []  # stubbed stages write no outputs
    p2.stage_fns = {
        "harvest": lambda overwrite: seen.append("harvest") or {},
        "label": lambda overwrite: seen.append((p2.run / "labels.jsonl").read_text()) or {},
    }
    p2()
    assert seen == ['{"latent": 1}\n']  # harvest skipped; label resumed from the partial file


@pytest.mark.timeout(120)
def test_a_remote_redo_killed_midway_resumes_elsewhere_without_the_old_outputs(tmp_path, s3_endpoint):
    """The refit's clear reaches the bucket before its fresh-start marker: a second machine that
    resumes the killed refit finds no old crosscoder or metrics to take for the new ones."""
    url = _url()
    calls: list = []
    _stubbed(Pipeline(_stub_cfg(tmp_path / "m1", url)), calls)()
    assert _remote_text(url, "crosscoder/model.safetensors") == "weights"
    lr = {"fit": {"train": {"lr": 5e-3}}}
    with pytest.raises(RuntimeError, match="killed in fit"):
        _stubbed(Pipeline(_stub_cfg(tmp_path / "m1", url, **lr)), calls, fail_at="fit")(redo_changed=True)
    fs, root = fsspec.core.url_to_fs(url)
    fs.invalidate_cache()
    assert not fs.exists(f"{root}/crosscoder/model.safetensors")
    assert json.loads(_remote_text(url, "stages/fit.json"))["overwrite"] is False  # cleared: resumable
    cfg2 = _stub_cfg(tmp_path / "m2", url, **lr)
    seen: list = []
    p2 = _stubbed(Pipeline(cfg2), [])
    fns = dict(p2.stage_fns)
    p2.missing_outputs = lambda stage: []  # stubbed stages write no outputs
    p2.stage_fns = {
        s: (lambda overwrite, s=s: seen.append((s, overwrite)) or fns[s](overwrite)) for s in STAGES
    }
    p2()
    assert seen == [("fit", False), ("analyze", True), ("label", True), ("report", True)]


def test_a_pull_never_writes_outside_the_working_copy(tmp_path):
    """Anyone who can write to the run's prefix can name an object "run/../../x" (S3 and GCS accept
    it): a pull skips such names instead of writing outside the local copy."""
    url = f"memory://crossdiff-test/{uuid.uuid4().hex[:8]}/run"
    fs, root = fsspec.core.url_to_fs(url)
    fs.pipe_file(f"{root}/labels.jsonl", b"{}\n")
    # the memory filesystem keeps keys verbatim, as S3 does
    fs.store[f"{root}/../../../../escaped.txt"] = fs.store[f"{root}/labels.jsonl"]
    fs.store[f"{root}/./dot.txt"] = fs.store[f"{root}/labels.jsonl"]
    work = tmp_path / "a" / "b" / "c" / "work"
    m = RunMirror(url, work)
    assert set(m.remote_files()) == {"labels.jsonl"}
    assert m.pull() == 1
    assert (work / "labels.jsonl").read_text() == "{}\n"
    assert not list(tmp_path.rglob("escaped.txt")) and not list(tmp_path.rglob("dot.txt"))
