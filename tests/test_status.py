"""`crossdiff status`: a run's stages and the running stage's progress, read from its files
(a local directory, and a bucket through fsspec), without Ray."""

import json
import os
import time

import fsspec
import pytest
from conftest import pipeline_dict
from typer.testing import CliRunner

from jobs.pipeline import PipelineConfig, with_defaults
from jobs.status import format_status, run_status


def _write(fs, path, obj):
    fs.makedirs(path.rsplit("/", 1)[0], exist_ok=True)
    fs.pipe_file(path, (obj if isinstance(obj, str) else json.dumps(obj)).encode())


def _run_at(fs, root, out, **kw):
    cfg = PipelineConfig.model_validate(with_defaults(pipeline_dict(out, **kw)))
    _write(fs, f"{root}/pipeline.json", cfg.model_dump_json())
    return cfg


def _walk_a_run(fs, root, run, store_root, want_labels):
    """Advance a fake run (at `root` of `fs`, named `run`) through its stages, checking status at each."""
    # harvest: 2 of 5 shards written
    _write(fs, f"{root}/stages/harvest.json", {"running": True, "hash": "h"})
    _write(fs, f"{store_root}/harvest_config.json", {"hash": "x", "records": 480, "shards": 5})
    for sid in ("00000", "00001"):
        _write(fs, f"{store_root}/shards/{sid}.json", {"shard_id": sid})
    st = run_status(run)
    assert [r["state"] for r in st["stages"]] == ["running", "pending", "pending", "pending", "pending"]
    assert st["current"] == "harvest" and st["progress"]["shards_done"] == 2 and st["progress"]["shards"] == 5
    assert "2/5 shards written" in format_status(st)

    # fit at step 40 of 100: ETA from the logged token rate
    _write(
        fs,
        f"{root}/stages/harvest.json",
        {"hash": "h", "seconds": 12.5, "summary": {"rows": 9000, "shards": 5}},
    )
    _write(fs, f"{root}/stages/fit.json", {"running": True, "hash": "f"})
    _write(fs, f"{root}/run_config.json", {"total_steps": 100, "fit": {"train": {"batch_size": 512}}})
    rows = [
        {"step": s, "loss": 10.0 / s, "fve/a": 0.5, "fve/b": 0.6, "tokens_per_s": 1024.0} for s in (20, 40)
    ]
    _write(
        fs, f"{root}/metrics.jsonl", "".join(json.dumps(r) + "\n" for r in rows) + '{"step": 4'
    )  # torn line
    st = run_status(run)
    assert [r["state"] for r in st["stages"]][:2] == ["done", "running"]
    p = st["progress"]
    assert (p["step"], p["steps"], p["eta_s"]) == (40, 100, 60 * 512 / 1024)
    assert p["fve"] == {"a": 0.5, "b": 0.6}
    text = format_status(st)
    assert "step 40/100 (40%)" in text and "9,000 rows" in text
    # the in-process fit logs its clock, not its rate: the ETA comes from the last two lines
    rows = [{"step": s, "loss": 1.0, "tokens_seen": 512 * s, "elapsed_s": s / 2} for s in (20, 40)]
    _write(fs, f"{root}/metrics.jsonl", "".join(json.dumps(r) + "\n" for r in rows))
    assert run_status(run)["progress"]["eta_s"] == 30

    # label: 3 of the labelled groups' latents (all 105, or the 70 of `label.groups`)
    fit_summary = {"fve": {"a": 0.9, "b": 0.91}, "steps": 100, "dead_fraction": 0.25}
    _write(fs, f"{root}/stages/fit.json", {"hash": "f", "seconds": 300, "summary": fit_summary})
    for rel in ("metrics.json", "crosscoder/model.safetensors", "latents.parquet"):  # what they vouch for
        _write(fs, f"{root}/{rel}", "{}")
    groups = {"a-specific": 35, "b-specific": 35, "baseline": 35}
    _write(fs, f"{root}/stages/analyze.json", {"hash": "a", "seconds": 30, "summary": {"groups": groups}})
    _write(fs, f"{root}/stages/label.json", {"running": True, "hash": "l"})
    # a latent written twice (a resumed batch) and a torn last line count once / not at all
    labels = "".join(json.dumps({"latent": i}) + "\n" for i in (0, 1, 2, 2)) + '{"latent": 9'
    _write(fs, f"{root}/labels.jsonl", labels)
    st = run_status(run)
    assert st["progress"] == {"a-vs-b": {**st["progress"]["a-vs-b"], "labelled": 3, "latents": want_labels}}
    assert f"a-vs-b: 3/{want_labels} labelled" in format_status(st)

    # a stage redone after an earlier one ran again is `to redo`; the first unfinished one is current
    _write(fs, f"{root}/stages/label.json", {"stale": True})
    st = run_status(run)
    assert st["stages"][3]["state"] == "to redo" and st["current"] == "label"


def test_status_follows_a_local_run_given_from_another_directory(tmp_path, monkeypatch):
    """A relative `out` and store (the demo's runs/demo) resolve against the directory the pipeline
    ran in, whatever directory status is run from."""
    fs = fsspec.filesystem("file")
    base = tmp_path / "work"
    root = str(base / "runs" / "r")
    _run_at(
        fs,
        root,
        "./runs/r",  # as typed: ./ and all
        harvest={**pipeline_dict("x")["harvest"], "store": "runs/r/store"},
        label={"groups": ["a-specific", "b-specific"]},  # the baseline's 35 are not labelled
    )
    monkeypatch.chdir(tmp_path)  # not where the pipeline ran
    _walk_a_run(fs, root, root, f"{root}/store", want_labels=70)
    # last write ages come from the files' times
    _write(fs, f"{root}/stages/label.json", {"running": True, "hash": "l"})
    st = run_status(root)
    assert 0 <= st["last_write_age_s"] < 60
    old = time.time() - 3600
    os.utime(f"{root}/labels.jsonl", (old, old))
    assert "probably killed" not in format_status(run_status(root))  # the running marker is newer
    os.utime(f"{root}/stages/label.json", (old, old))
    assert "probably killed" in format_status(run_status(root))
    # a killed fit shows no ETA: it was the dead attempt's, and the run is not moving
    os.remove(f"{root}/stages/label.json")
    _write(fs, f"{root}/stages/fit.json", {"running": True, "hash": "f"})
    assert "eta_s" in run_status(root)["progress"]
    for rel in ("stages/fit.json", "metrics.jsonl"):
        os.utime(f"{root}/{rel}", (old, old))
    st = run_status(root)
    assert st["current"] == "fit" and st["probably_killed"] and "eta_s" not in st["progress"]
    assert "ETA" not in format_status(st) and "step 40/100" in format_status(st)
    # a fit killed by a crossdiff from before the `running` markers left none: its quiet files say it
    os.remove(f"{root}/stages/fit.json")
    st = run_status(root)
    assert st["stages"][1]["state"] == "pending" and st["current"] == "fit"
    assert st["probably_killed"] and "eta_s" not in st["progress"] and "ETA" not in format_status(st)


def test_status_reads_a_bucket_run_and_reports_a_finished_one():
    fs = fsspec.filesystem("memory")
    root = "/status-test/run"
    _run_at(fs, root, f"memory://{root}")
    _walk_a_run(fs, root, f"memory://{root}", f"{root}/store", want_labels=105)
    for stage in ("label", "report"):
        _write(fs, f"{root}/stages/{stage}.json", {"hash": "x", "seconds": 1, "summary": {}})
    _write(fs, f"{root}/report.html", "<html></html>")
    _write(fs, f"{root}/report.json", "{}")
    st = run_status(f"memory://{root}")
    assert st["current"] is None and {r["state"] for r in st["stages"]} == {"done"}
    # a marker vouches for files someone may have deleted since: the pipeline redoes that stage
    fs.rm(f"{root}/crosscoder/model.safetensors")
    gone = run_status(f"memory://{root}")
    assert [r["state"] for r in gone["stages"]][:3] == ["done", "to redo", "done"] and gone[
        "current"
    ] == "fit"
    assert f"outputs gone: {root}/crosscoder/model.safetensors" in format_status(gone)
    _write(fs, f"{root}/crosscoder/model.safetensors", "{}")
    # a remote run that syncs only at each stage's end never looks killed for being quiet
    _write(fs, f"{root}/stages/report.json", {"running": True})
    assert run_status(f"memory://{root}")["quiet_after_s"] == 900  # sync_every_s 300: 3x is less
    cfg = json.loads(fs.cat_file(f"{root}/pipeline.json"))
    _write(fs, f"{root}/pipeline.json", {**cfg, "sync_every_s": 0})
    assert "quiet_after_s" not in run_status(f"memory://{root}")
    assert st["report"] == f"memory://{root}/report.html"
    fs.rm("/status-test", recursive=True)


def test_status_cli(tmp_path):
    from jobs.cli import app

    fs = fsspec.filesystem("file")
    root = str(tmp_path / "run")
    _run_at(fs, root, root, stages=["harvest", "fit"])
    res = CliRunner().invoke(app, ["status", root, "--json"])
    assert res.exit_code == 0, res.output
    st = json.loads(res.output)
    assert [r["stage"] for r in st["stages"]] == ["harvest", "fit"] and st["current"] == "harvest"
    res = CliRunner().invoke(app, ["status", root])
    assert res.exit_code == 0 and "harvest  pending" in res.output
    res = CliRunner().invoke(app, ["status", "--run", root])  # as every other command names a run
    assert res.exit_code == 0 and "harvest  pending" in res.output
    res = CliRunner().invoke(app, ["status", "--run", root, root])
    assert res.exit_code == 2 and "name the run once" in res.output
    res = CliRunner().invoke(app, ["status", str(tmp_path / "nope")])
    assert res.exit_code == 2 and f"{tmp_path / 'nope'} does not exist" in res.output
    (tmp_path / "nothing").mkdir()
    res = CliRunner().invoke(app, ["status", str(tmp_path / "nothing")])
    assert res.exit_code == 2 and "holds no crossdiff run" in res.output


def test_a_home_relative_path_means_the_same_place_everywhere(tmp_path, monkeypatch):
    """`--out=~/x` (no shell expands that `~`) or `out: ~/x` in a config: the run's paths are the
    home directory's, in every config field and option (the harvest wrote ./~/x/store while the
    corpus and the fit went to $HOME/x)."""
    from diffing.corpus import CorpusSpec, read_corpus
    from diffing.harvest import ModelSpec
    from jobs.cli import app

    monkeypatch.setenv("HOME", str(tmp_path))
    cfg = PipelineConfig.model_validate(with_defaults(pipeline_dict("~/run", stages=["harvest", "fit"])))
    assert cfg.out == str(tmp_path / "run") and cfg.harvest.store == str(tmp_path / "run" / "store")
    (tmp_path / "c.jsonl").write_text('{"text": "hi"}\n')  # read through fsspec, which expands it:
    assert read_corpus(CorpusSpec(uri="~/c.jsonl"))[0]["text"] == "hi"  # kept as typed (its identity)
    assert ModelSpec(name="a", path="~/models/a").path == str(tmp_path / "models" / "a")
    assert CorpusSpec(uri="s3://b/~x.jsonl").uri == "s3://b/~x.jsonl"  # URLs as given
    _run_at(fsspec.filesystem("file"), str(tmp_path / "run"), "~/run", stages=["harvest", "fit"])
    for args in (["status", "--run=~/run"], ["status", "~/run"]):
        res = CliRunner().invoke(app, args)
        assert res.exit_code == 0 and "harvest  pending" in res.output, res.output


@pytest.mark.parametrize("stages", [["fit", "analyze"], ["analyze", "fit"]])
def test_status_of_a_run_that_starts_later(tmp_path, stages):
    """A pipeline configured without the harvest (a store made elsewhere) starts at its first stage."""
    fs = fsspec.filesystem("file")
    root = str(tmp_path / "run")
    _run_at(fs, root, root, stages=stages)
    st = run_status(root)
    assert st["current"] == "fit" and st["progress"] == {"steps": None}
    assert "no step logged yet" in format_status(st)


def test_status_of_single_stage_commands_reads_their_outputs(tmp_path):
    """No pipeline.json: a `crossdiff harvest` store and a `crossdiff fit` run show what their
    outputs say (begun = `started`: running, or killed and resumable by rerunning the command)."""
    fs = fsspec.filesystem("file")
    store = str(tmp_path / "store")
    _write(fs, f"{store}/harvest_config.json", {"hash": "x", "shards": 3})
    _write(fs, f"{store}/shards/00000.json", {"shard_id": "00000"})
    st = run_status(store)
    assert st["stages"] == [{"stage": "harvest", "state": "started"}] and st["progress"]["shards_done"] == 1
    assert "1/3 shards written" in format_status(st)
    _write(fs, f"{store}/manifest.json", {})
    assert run_status(store)["stages"] == [{"stage": "harvest", "state": "done"}]

    run = str(tmp_path / "fit")
    _write(fs, f"{run}/run_config.json", {"total_steps": 10, "fit": {"train": {"batch_size": 4}}})
    _write(fs, f"{run}/metrics.jsonl", json.dumps({"step": 5, "loss": 2.0, "tokens_per_s": 2.0}) + "\n")
    st = run_status(run)
    assert [(r["stage"], r["state"]) for r in st["stages"]] == [
        ("fit", "started"),
        ("analyze", "absent"),
        ("label", "absent"),
        ("report", "absent"),
    ]
    assert st["progress"]["eta_s"] == 10 and "step 5/10 (50%)" in format_status(st)
    for rel in ("metrics.json", "crosscoder/model.safetensors", "latents.parquet"):
        _write(fs, f"{run}/{rel}", "{}")
    st = run_status(run)
    # analyze and label write as they go: their outputs say `present`, not done
    assert [r["state"] for r in st["stages"]] == ["done", "present", "absent", "absent"]
    assert st["current"] is None
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="holds no crossdiff run"):
        run_status(str(tmp_path / "empty"))


def test_status_raises_what_is_not_a_state_of_the_run(tmp_path, monkeypatch):
    """Access denied (or a bucket that does not answer) is an error, not `pending` or `no run`."""
    fs = fsspec.filesystem("file")
    root = str(tmp_path / "run")
    _run_at(fs, root, root)

    def denied(self, path, *a, **kw):
        raise PermissionError(13, "Access Denied", path)

    monkeypatch.setattr(type(fs), "cat_file", denied)
    with pytest.raises(PermissionError):
        run_status(root)


@pytest.mark.timeout(60)
def test_who_holds_the_run_decides_running_or_stopped(tmp_path, monkeypatch):
    """A run held by a live process is running however quiet its files (a long fit step); one whose
    holder is gone was stopped, said at once (a local lock seen from its host, a lease given back or
    stale), not after 15 quiet minutes."""
    import signal
    import subprocess
    import sys

    from jobs.runlock import LEASE_FILE

    fs = fsspec.filesystem("file")
    root = str(tmp_path / "run")
    _run_at(fs, root, root)
    _write(fs, f"{root}/stages/harvest.json", {"hash": "h", "seconds": 1, "summary": {}})
    _write(fs, f"{root}/stages/fit.json", {"running": True, "hash": "f"})
    old = time.time() - 3600
    os.utime(f"{root}/stages/fit.json", (old, old))  # quiet for an hour
    st = run_status(root)
    assert st["probably_killed"] and "holder_gone" not in st  # no lock file: the file-age rule
    hold = "import sys, time; from pathlib import Path; from jobs.runlock import hold_run\n"
    hold += "with hold_run(Path(sys.argv[1]), command='crossdiff pipeline'):\n    print('held', flush=True); time.sleep(60)"
    p = subprocess.Popen([sys.executable, "-c", hold, root], stdout=subprocess.PIPE, text=True)
    try:
        assert p.stdout.readline().strip() == "held"
        st = run_status(root)
        assert st["held_by"]["pid"] == p.pid and not st["probably_killed"]
        assert f"held by crossdiff pipeline (pid {p.pid} on " in format_status(st)
    finally:
        p.send_signal(signal.SIGKILL)
        p.wait()
    st = run_status(root)
    assert st["probably_killed"] and st["holder_gone"] and "held_by" not in st
    assert "no process holds the run" in format_status(st)

    # a bucket run: its lease, fresh, given back, or stale
    mem = fsspec.filesystem("memory")
    mroot = f"/status-lease/{time.time_ns()}"
    _run_at(mem, mroot, f"memory://{mroot}")
    _write(mem, f"{mroot}/stages/harvest.json", {"running": True, "hash": "h"})
    lease = {"lease": "x", "host": "node-3", "pid": 7, "command": "crossdiff pipeline"}
    import jobs.runlock

    monkeypatch.setattr(jobs.runlock, "object_age", lambda info: 3600.0)  # written an hour ago
    for body, held, gone in (
        ({**lease, "heartbeat": time.time()}, True, False),
        ({**lease, "heartbeat": time.time(), "released": time.time()}, False, True),
        ({**lease, "heartbeat": time.time() - 3600}, False, True),
    ):
        _write(mem, f"{mroot}/{LEASE_FILE}", body)
        st = run_status(f"memory://{mroot}")
        assert ("held_by" in st) == held and bool(st.get("holder_gone")) == gone, body
    mem.rm(mroot, recursive=True)


def test_report_path_is_absolute_for_a_local_run(tmp_path, monkeypatch):
    """`status` names the report so it opens from any directory; a bucket's stays a URL."""
    from jobs.status import _report_path

    monkeypatch.chdir(tmp_path)
    assert _report_path("runs/r/") == str(tmp_path / "runs" / "r" / "report.html")
    assert _report_path("s3://b/runs/r/") == "s3://b/runs/r/report.html"


def test_labels_holding_unicode_line_separators_are_counted(tmp_path):
    """JSON leaves U+2028/U+2029/U+0085 unescaped; a label quoting such text counts once, not zero."""
    from diffing.evidence import LatentLabel, write_jsonl
    from jobs.status import _labelled

    labs = [
        LatentLabel(latent=i, explanation=f"quotes a{sep}b", category="c", confidence=1)
        for i, sep in enumerate(["\u2028", "\u2029", "\x85", "\n"])
    ]
    write_jsonl(tmp_path / "labels.jsonl", labs)
    assert _labelled(fsspec.filesystem("file"), str(tmp_path / "labels.jsonl")) == 4


def test_what_the_cli_prints_and_runs_write_is_standard_json():
    """NaN/inf (a CE recovered over a zero gap, an unbounded interval) print as null, not as bare
    NaN/Infinity that strict parsers (jq, JSON.parse) refuse."""
    import numpy as np

    from jobs import jsonsafe

    text = jsonsafe.dumps({"a": float("nan"), "b": [np.float32(np.inf), np.int64(2), 1.5], 3: "x"})
    assert json.loads(text) == {"a": None, "b": [None, 2, 1.5], "3": "x"}
    assert "NaN" not in text and "Infinity" not in text
