"""The command line: fit and analyze end to end, and clear errors before any work."""

import json
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from diffing.store import write_arrays
from diffing.synthetic import make_planted
from jobs.cli import app

runner = CliRunner()


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    p = tmp_path_factory.mktemp("cli") / "store"
    planted = make_planted(16, n_shared=16, n_only=(4, 4), mean_active=2, seed=0)
    # documents of 32 tokens: the analysis holds out whole documents for evidence
    write_arrays(
        str(p), planted.sample(8192, seed=1), model_names=["base", "ft"], doc_ids=np.arange(8192) // 32
    )
    return str(p)


def test_fit_then_analyze(tmp_path, store):
    run = tmp_path / "run"
    r = runner.invoke(
        app,
        [
            "fit",
            "--store",
            store,
            "--out",
            str(run),
            "--set",
            "crosscoder.n_latents=64",
            "--set",
            "crosscoder.k=2",
            "--set",
            "train.batch_size=256",
            "--set",
            "train.seed=3",
        ],
    )
    assert r.exit_code == 0, r.output
    m = json.loads((run / "metrics.json").read_text())
    assert set(m) >= {"fve", "l0", "dead_fraction", "tokens_seen", "tokens_per_s"}
    assert set(m["fve"]) == {"base", "ft"}
    assert m["tokens_seen"] == 8192 // 256 * 256  # default: one pass over the store
    rc = json.loads((run / "run_config.json").read_text())
    assert rc["fit"]["crosscoder"]["n_latents"] == 64 and rc["fit"]["train"]["seed"] == 3
    assert (run / "crosscoder" / "model.safetensors").exists() and (run / "metrics.jsonl").exists()

    # the same command again is a no-op (idempotent); other settings are refused, not answered with
    # this run's results; --overwrite redoes it
    before = (run / "metrics.json").stat().st_mtime_ns
    same = ["--set", "crosscoder.n_latents=64", "--set", "crosscoder.k=2", "--set", "train.batch_size=256"]
    assert (
        runner.invoke(
            app, ["fit", "--store", store, "--out", str(run), *same, "--set", "train.seed=3"]
        ).exit_code
        == 0
    )
    assert (run / "metrics.json").stat().st_mtime_ns == before
    r = runner.invoke(app, ["fit", "--store", store, "--out", str(run), *same])
    assert r.exit_code == 2 and "train.seed" in r.output and "--overwrite" in r.output

    r = runner.invoke(app, ["analyze", "--run", str(run), "--store", store])
    assert r.exit_code == 0, r.output
    assert json.loads(r.stdout)["latents"] == 64


def test_l1_kind_via_set(tmp_path, store):
    r = runner.invoke(
        app,
        [
            "fit",
            "--store",
            store,
            "--out",
            str(tmp_path / "r"),
            "--set",
            "crosscoder.kind=l1",
            "--set",
            "crosscoder.n_latents=32",
            "--set",
            "train.steps=5",
            "--set",
            "train.batch_size=128",
        ],
    )
    assert r.exit_code == 0, r.output
    assert json.loads((tmp_path / "r" / "metrics.json").read_text())["steps"] == 5


@pytest.mark.parametrize(
    "args, needle",
    [
        (["--set", "crosscoder.kind=topk"], "crosscoder.kind"),
        (["--set", "train.lrr=1"], "train.lrr: unknown field"),
        (["--set", "crosscoder.k=100", "--set", "crosscoder.n_latents=32"], "exceeds crosscoder.n_latents"),
        (["--set", "crosscoder.d_model=99"], "crosscoder.d_model=99 but the store has d_model=16"),
        (["--set", "train.batch_size=100000"], "train.batch_size"),
        (["--set", "trainlr"], "key=value"),
        (["--set", "train.adam_betas=[0.9,1.5]"], "train.adam_betas"),  # torch would refuse it at the start
        (  # n_latents from the store's width: one line naming where it came from
            ["--set", "crosscoder.expansion_factor=1", "--set", "crosscoder.k=100"],
            "crosscoder.k=100 exceeds crosscoder.n_latents=16; lower k (crosscoder.n_latents = "
            "expansion_factor 1 x d_model 16 = 16)",
        ),
        (["--set", "train.epochs=.inf"], "finite number"),  # an OverflowError traceback before
        (["--set", "train.lr=1e400"], "finite number"),
    ],
)
def test_bad_config_fails_before_work(tmp_path, store, args, needle):
    r = runner.invoke(app, ["fit", "--store", store, "--out", str(tmp_path / "r"), *args])
    assert r.exit_code == 2
    assert needle in r.output, r.output
    assert not (tmp_path / "r" / "crosscoder").exists()


def test_a_diverging_fit_names_the_setting_to_change(tmp_path, store):
    """A learning rate far too high: one line naming train.lr, exit 2, no traceback (it was a
    FloatingPointError traceback, and a rerun "to resume" diverged again)."""
    r = runner.invoke(
        app,
        [
            "fit",
            "--store",
            store,
            "--out",
            str(tmp_path / "r"),
            "--set",
            "train.lr=1e8",
            "--set",
            "train.steps=8",
        ],
    )
    assert r.exit_code == 2, r.output
    assert "the fit diverged at step" in r.output and "train.lr=100000000.0" in r.output
    assert "lower train.lr" in r.output and "Traceback" not in r.output
    assert not (tmp_path / "r" / "crosscoder").exists()


def test_a_diverging_ray_train_fit_is_the_same_one_line(capsys):
    """Under Ray Train the divergence reaches the driver inside a WorkerGroupError (rank -> error):
    the same exit 2 and message, not a traceback."""
    import typer
    from ray.train.v2.api.exceptions import WorkerGroupError

    from diffing.train import FitDiverged
    from jobs.cli_common import _run

    def fails():
        raise WorkerGroupError(
            "rank 0 failed", {1: RuntimeError("other"), 0: FitDiverged("the fit diverged at step 3")}
        )

    with pytest.raises(typer.Exit) as e:
        _run(fails)
    assert e.value.exit_code == 2 and "the fit diverged at step 3" in capsys.readouterr().err


def test_missing_store_and_config_file(tmp_path):
    r = runner.invoke(app, ["fit", "--store", str(tmp_path / "nope"), "--out", str(tmp_path / "r")])
    assert r.exit_code == 2 and "no manifest.json" in r.output
    r = runner.invoke(app, ["fit", "--store", "x", "--out", "y", "--config", str(tmp_path / "missing.yaml")])
    assert r.exit_code == 2 and "does not exist" in r.output


def test_config_file_and_override_precedence(tmp_path, store):
    cfg = tmp_path / "fit.yaml"
    cfg.write_text("crosscoder:\n  n_latents: 48\n  k: 3\ntrain:\n  steps: 4\n  batch_size: 128\n")
    run = tmp_path / "r"
    r = runner.invoke(
        app, ["fit", "--store", store, "--out", str(run), "--config", str(cfg), "--set", "crosscoder.k=2"]
    )
    assert r.exit_code == 0, r.output
    rc = json.loads((run / "run_config.json").read_text())["fit"]
    assert rc["crosscoder"]["n_latents"] == 48 and rc["crosscoder"]["k"] == 2 and rc["train"]["steps"] == 4


def test_interrupted_fit_resumes_from_checkpoint(tmp_path, store):
    """A fit killed after a checkpoint resumes there and ends exactly like an uninterrupted run."""
    import shutil

    import torch

    from diffing.config import FitConfig
    from diffing.fit import fit
    from diffing.store import open_store

    st = open_store(store)
    cfg = FitConfig.model_validate(
        {
            "crosscoder": {"n_latents": 32, "k": 2},
            "train": {"steps": 20, "batch_size": 256, "checkpoint_every": 8},
        }
    )
    fit(st, cfg, tmp_path / "full")

    import diffing.fit as fit_mod

    real = fit_mod.train_step
    calls = {"n": 0}

    def dying(state, xb, **kw):
        calls["n"] += 1
        if calls["n"] == 13:
            raise KeyboardInterrupt
        return real(state, xb, **kw)

    fit_mod.train_step = dying
    try:
        with pytest.raises(KeyboardInterrupt):
            fit(st, cfg, tmp_path / "cut")
    finally:
        fit_mod.train_step = real
    assert not (tmp_path / "cut" / "metrics.json").exists()
    assert [p.name for p in (tmp_path / "cut" / "checkpoints").iterdir()] == ["step_000000008.pt"]
    shutil.copytree(tmp_path / "cut", tmp_path / "cut-again")  # for --overwrite, below
    other_lr = cfg.model_copy(update={"train": cfg.train.model_copy(update={"lr": cfg.train.lr / 2})})
    with pytest.raises(ValueError, match="checkpoints of a different config"):
        fit(st, other_lr, tmp_path / "cut")
    # another store of the same shape and size (other rows): not mixed into the resumed fit
    planted = make_planted(16, n_shared=16, n_only=(4, 4), mean_active=2, seed=0)
    write_arrays(str(tmp_path / "other"), planted.sample(8192, seed=2), model_names=["base", "ft"])
    with pytest.raises(ValueError, match="another store"):
        fit(open_store(str(tmp_path / "other")), cfg, tmp_path / "cut")
    # logging and the device have no effect on the weights: the resume takes them as given
    # (a fit cut short on a GPU goes on on a CPU)
    moved = cfg.model_copy(update={"train": cfg.train.model_copy(update={"log_every": 3, "device": "cpu"})})
    calls["n"] = 0

    def counting(state, xb, **kw):
        calls["n"] += 1
        return real(state, xb, **kw)

    fit_mod.train_step = counting
    try:
        fit(st, moved, tmp_path / "cut")
    finally:
        fit_mod.train_step = real
    # a resume, not a restart: only the steps after the checkpoint ran again
    assert json.loads((tmp_path / "cut" / "metrics.json").read_text())["resumed_from_step"] == 8
    assert json.loads((tmp_path / "full" / "metrics.json").read_text())["resumed_from_step"] == 0
    assert calls["n"] == 20 - 8
    from diffing.crosscoder import Crosscoder

    a, b = Crosscoder.load(tmp_path / "full" / "crosscoder"), Crosscoder.load(tmp_path / "cut" / "crosscoder")
    for k, v in a.state_dict().items():
        assert torch.allclose(v, b.state_dict()[k], atol=1e-6), k
    # --overwrite of an interrupted fit starts over: its checkpoint is not resumed
    fit(st, cfg, tmp_path / "cut-again", overwrite=True)
    assert json.loads((tmp_path / "cut-again" / "metrics.json").read_text())["resumed_from_step"] == 0


def test_configuration_reference_is_current():
    from pathlib import Path

    from jobs.pipeline import reference

    doc = Path(__file__).resolve().parents[1] / "docs" / "configuration.md"
    assert doc.read_text().strip() == reference().strip(), (
        "regenerate: crossdiff config-docs > docs/configuration.md"
    )


def test_shipped_job_configs_validate():
    from pathlib import Path

    from diffing.config import FitConfig, load_config
    from diffing.harvest import HarvestConfig
    from jobs.pipeline import load_pipeline_config

    root = Path(__file__).resolve().parents[1] / "jobs" / "configs"
    files = sorted(root.glob("*.yaml"))
    assert files
    for f in files:
        if ".pipeline." in f.name:
            load_pipeline_config(f)
            continue
        cls = HarvestConfig if ".harvest." in f.name else FitConfig
        load_config(cls, f)


def test_a_url_without_its_filesystem_package_is_one_line(tmp_path):
    r = runner.invoke(app, ["fit", "--store", "gs://bucket/acts", "--out", str(tmp_path / "r")])
    assert r.exit_code == 2 and "gcsfs" in r.output and "Traceback" not in r.output


def test_serve_on_a_taken_port_fails_at_once(tmp_path):
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        r = runner.invoke(app, ["serve", "--port", str(port), "--judge-model", str(tmp_path)])
    assert r.exit_code == 2 and f"127.0.0.1:{port}" in r.output and "another --port" in r.output


def test_planted_dictionary_demo_takes_no_settings(tmp_path):
    r = runner.invoke(
        app, ["demo", "--planted-dictionary", "--out", str(tmp_path), "--set", "fit.train.lr=1"]
    )
    assert r.exit_code == 2 and "takes no settings" in r.output


def test_planted_dictionary_demo_keeps_out_of_the_embedded_demos_run(tmp_path, monkeypatch):
    """Its default run is its own (runs/demo holds the embedded demo's SmolLM2 store), and a store
    of other models in its --out is refused instead of fitted."""
    import numpy as np

    import jobs.demo
    from diffing.store import write_arrays

    seen = []
    monkeypatch.chdir(tmp_path)  # the default run is relative: nothing lands in the checkout
    monkeypatch.setattr(jobs.demo, "run_planted_demo", lambda out: seen.append(out) or {})
    assert runner.invoke(app, ["demo", "--planted-dictionary"]).exit_code == 0
    assert seen == [Path("runs/planted-dictionary")]
    monkeypatch.undo()
    x = np.zeros((64, 2, 8), np.float32)
    write_arrays(str(tmp_path / "store"), x, model_names=["base", "ft"])
    r = runner.invoke(app, ["demo", "--planted-dictionary", "--out", str(tmp_path)])
    assert r.exit_code != 0 and "holds another store" in r.output and "another --out" in r.output
    assert not (tmp_path / "run").exists()


def test_a_job_api_address_for_a_stage_command_names_the_right_one(tmp_path, store, monkeypatch):
    import ray

    monkeypatch.setenv("RAY_ADDRESS", "http://head:8265")
    monkeypatch.setattr(ray, "is_initialized", lambda: False)  # whatever Ray earlier tests left up
    r = runner.invoke(app, ["fit", "--store", store, "--out", str(tmp_path / "r"), "--workers", "1"])
    assert r.exit_code == 2 and "HEAD:6379" in r.output and "crossdiff submit" in r.output


def test_a_logger_made_under_a_swapped_stderr_outlives_it(capsys):
    """Module loggers created inside a CliRunner call (its stderr, closed afterwards) kept writing
    to it: every later log line in the process raised 'I/O operation on closed file'."""
    import io
    import pickle
    import sys

    from diffing.logs import get_logger

    real, sys.stderr = sys.stderr, io.StringIO()
    try:
        log = get_logger("swapped", run="r")
    finally:
        swapped, sys.stderr = sys.stderr, real
        swapped.close()
    log.info("still.writes")
    assert "still.writes" in capsys.readouterr().err
    pickle.dumps(log._logger)  # Ray Serve pickles deployment code that holds loggers


def test_the_port_check_binds_as_serve_does():
    import socket

    from serve.local import _check_port_free, free_port

    _check_port_free("127.0.0.1", free_port())
    _check_port_free("::1", free_port())  # an IPv6 host is no "address family" error
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        with pytest.raises(OSError, match="port in use"):
            _check_port_free("127.0.0.1", s.getsockname()[1])


def test_s3_without_credentials_is_one_line_with_the_fix(capsys):
    """botocore's NoCredentialsError (s3:// with no credentials) is an expected condition."""
    import typer
    from botocore.exceptions import NoCredentialsError

    from jobs.cli import _run

    def fails():
        raise NoCredentialsError()

    with pytest.raises(typer.Exit) as e:
        _run(fails)
    assert e.value.exit_code == 2
    err = capsys.readouterr().err
    assert "Unable to locate credentials" in err and "AWS_ACCESS_KEY_ID" in err and "Traceback" not in err


def test_stage_commands_on_a_pipeline_run_point_to_the_pipeline(tmp_path, monkeypatch):
    """A stage command that would rewrite what a pipeline's marker vouches for (report with other
    settings, or without the planted/anchored sections; fit/analyze/label --overwrite) is refused,
    naming the pipeline command; the same settings, and commands that only resume or add, go on."""
    import jobs.report
    from jobs.report.config import ReportConfig

    (tmp_path / "compare" / "pt-vs-it").mkdir(parents=True)
    (tmp_path / "pipeline.json").write_text(json.dumps({"out": str(tmp_path), "anchored": ["it", "simpo"]}))
    called = []
    monkeypatch.setattr(jobs.report, "write_report", lambda *a, **k: called.append(a) or {})
    for run in (tmp_path, tmp_path / "compare" / "pt-vs-it"):
        r = runner.invoke(app, ["report", "--run", str(run)])
        assert (
            r.exit_code == 2 and "--redo-changed" in r.output and str(tmp_path / "pipeline.json") in r.output
        )
        assert "--set report.FIELD=VALUE" in r.output and "planted-truth and anchored sections" in r.output
    assert not called
    pipe = {"out": str(tmp_path), "anchored": None, "report": ReportConfig().model_dump(mode="json")}
    (tmp_path / "pipeline.json").write_text(json.dumps(pipe))
    assert runner.invoke(app, ["report", "--run", str(tmp_path)]).exit_code == 0 and called  # the same report
    called.clear()
    monkeypatch.chdir(tmp_path)  # a relative comparison path is its run's too
    for args, stage in (
        (["report", "--run", str(tmp_path), "--set", "ci_method=score"], "report"),
        (["analyze", "--run", str(tmp_path), "--store", "s", "--overwrite"], "analyze"),
        (["label", "--run", "compare/pt-vs-it", "--overwrite"], "label"),
        (["fit", "--store", "s", "--out", ".", "--overwrite"], "fit"),
    ):
        r = runner.invoke(app, args)
        assert r.exit_code == 2 and f"--set {stage}.FIELD=VALUE --redo-changed" in r.output, r.output
        assert f"--out {tmp_path}" in r.output
    assert not called
    # without --overwrite they resume or add under their own checks (here: no store, no examples)
    for args in (["analyze", "--run", str(tmp_path), "--store", "s"], ["label", "--run", "compare/pt-vs-it"]):
        r = runner.invoke(app, args)
        assert "belongs to the pipeline run" not in r.output, r.output
    # a pipeline run without a report stage: the command makes the run's only report
    (tmp_path / "pipeline.json").write_text(json.dumps({"out": str(tmp_path), "stages": ["harvest", "fit"]}))
    assert runner.invoke(app, ["report", "--run", str(tmp_path), "--set", "ci_method=score"]).exit_code == 0
    assert called


def test_a_corrupt_checkpoint_falls_back_and_the_log_is_not_repeated(tmp_path, store):
    """A kill while the newest checkpoint was written (or a damaged file): the resume warns and takes
    the one before, ends like an uninterrupted fit, and metrics.jsonl lists each step once."""
    import torch

    from diffing.config import FitConfig
    from diffing.crosscoder import Crosscoder
    from diffing.fit import fit
    from diffing.store import StoreError, open_store

    st = open_store(store)
    cfg = FitConfig.model_validate(
        {
            "crosscoder": {"n_latents": 32, "k": 2},
            "train": {"steps": 24, "batch_size": 256, "checkpoint_every": 8, "log_every": 4},
        }
    )
    fit(st, cfg, tmp_path / "full")
    cut = tmp_path / "cut"
    import diffing.fit as fit_mod

    real, calls = fit_mod.train_step, {"n": 0}

    def dying(state, xb, **kw):
        calls["n"] += 1
        if calls["n"] == 22:  # after step 16's checkpoint and step 20's log line
            raise KeyboardInterrupt
        return real(state, xb, **kw)

    fit_mod.train_step = dying
    try:
        with pytest.raises(KeyboardInterrupt):
            fit(st, cfg, cut)
    finally:
        fit_mod.train_step = real
    ckpts = sorted((cut / "checkpoints").glob("step_*.pt"))
    assert [p.name for p in ckpts] == ["step_000000008.pt", "step_000000016.pt"]
    ckpts[-1].write_bytes(ckpts[-1].read_bytes()[:1000])  # cut short
    (cut / "checkpoints" / "step_000000024.tmp").write_bytes(b"partial")
    fit(st, cfg, cut)
    assert not (cut / "checkpoints" / "step_000000024.tmp").exists()
    steps = [json.loads(line)["step"] for line in (cut / "metrics.jsonl").read_text().splitlines()]
    assert steps == [4, 8, 12, 16, 20, 24]
    a, b = Crosscoder.load(tmp_path / "full" / "crosscoder"), Crosscoder.load(cut / "crosscoder")
    for k, v in a.state_dict().items():
        assert torch.allclose(v, b.state_dict()[k], atol=1e-6), k
    # nothing readable: a clear error with the fix, not a torch traceback
    (cut / "metrics.json").unlink()
    (cut / "checkpoints").mkdir(exist_ok=True)
    (cut / "checkpoints" / "step_000000008.pt").write_bytes(b"garbage")
    with pytest.raises(StoreError, match="no checkpoint .* can be read.*--overwrite"):
        fit(st, cfg, cut)
    # a checkpoint that would run code when unpickled (someone wrote it into the run): never run
    marker = tmp_path / "ran"

    class Payload:
        def __reduce__(self):
            return (Path.touch, (marker,))

    torch.save({"state": Payload()}, cut / "checkpoints" / "step_000000008.pt")
    with pytest.raises(StoreError, match="no checkpoint .* can be read"):
        fit(st, cfg, cut)
    assert not marker.exists()


def test_a_checkpoint_is_memory_mapped_not_read_whole(tmp_path):
    """Every rank of a node loads the checkpoint (~30 GB at the Gemma shape): mapped, a load costs
    almost no memory until the tensors are copied into the model, and a copy-on-write tensor that is
    changed in place never writes the file."""
    import subprocess
    import sys

    import torch

    path = tmp_path / "state.pt"
    torch.save({"state": {"w": torch.ones(64, 1 << 20)}, "history": [{"step": 1}]}, path)  # 256 MiB
    code = f"""
import torch
from diffing.fit import load_checkpoint
rss = lambda: int(open("/proc/self/statm").read().split()[1]) * 4096 >> 20  # resident MiB now
before = rss()
blob = load_checkpoint({str(path)!r})
grew = rss() - before
w = blob["state"]["w"]
w[0, :4] += 1
assert w[0, 0].item() == 2 and w[1, 0].item() == 1 and blob["history"] == [{{"step": 1}}]
print(grew)
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert int(out.stdout.split()[-1]) < 64, out.stdout  # MiB resident after the load, of 256
    assert torch.load(path, weights_only=True)["state"]["w"][0, 0].item() == 1  # the file is unchanged


def test_a_cpu_resume_does_not_keep_the_checkpoint_mapped(tmp_path):
    """A CPU fit's optimiser keeps the loaded Adam moments: mapped, they would hold a rotated-out
    checkpoint's disk blocks for the whole run. Only a state bound for a GPU is mapped."""
    import torch

    from diffing.fit import load_checkpoint

    path = tmp_path / "state.pt"
    torch.save({"w": torch.ones(1024, 1024)}, path)

    def mapped() -> bool:
        return str(path) in open("/proc/self/maps").read()

    blob = load_checkpoint(path, mmap=False)
    assert not mapped()
    del blob
    blob = load_checkpoint(path)  # the default: mapped
    assert mapped()
    del blob


def test_a_refit_replaces_the_weights_file_instead_of_writing_into_it(tmp_path):
    """A loaded crosscoder's parameters are the file's pages (Crosscoder.load assigns them): the
    Ray fit's final write must be a new file renamed over the old one, never the old inode rewritten."""
    import torch

    from diffing.config import CrosscoderConfig
    from diffing.crosscoder import Crosscoder
    from jobs.fit import _write_outputs

    cfg = CrosscoderConfig(n_latents=32, k=4).resolve(n_models=2, d_model=8, model_names=("a", "b"))
    out = tmp_path / "run"
    _write_outputs(str(out), Crosscoder(cfg, seed=1), {"steps": 1}, [])
    loaded = Crosscoder.load(out / "crosscoder")
    before = loaded.W_dec.detach().clone()
    _write_outputs(str(out), Crosscoder(cfg, seed=2), {"steps": 1}, [])
    assert torch.equal(loaded.W_dec, before)
    assert not torch.equal(Crosscoder.load(out / "crosscoder").W_dec, before)


def test_pipeline_command_hands_every_option_to_the_library(monkeypatch, tmp_path):
    """`crossdiff pipeline` is a thin entrypoint: each flag reaches run_pipeline unchanged, the
    result is printed as JSON, and a config error is one line with exit code 2 (no traceback)."""
    import jobs.pipeline
    from diffing.config import ConfigError

    seen = {}
    monkeypatch.setattr(jobs.pipeline, "run_pipeline", lambda **kw: seen.update(kw) or {"stages": "done"})
    r = runner.invoke(
        app,
        [
            "pipeline", "--config", str(tmp_path / "p.yaml"), "--out", "s3://b/run", "--set", "fit.train.lr=1e-3",
            "--set", "analyze.tail_frac=0.03", "--address", "ray://head:10001", "--endpoint", "http://l:8000",
            "--redo-changed", "--steal-lock", "--redo", "label",
        ],
    )  # fmt: skip
    assert r.exit_code == 0, r.output
    assert json.loads(r.output) == {"stages": "done"}
    assert seen == {
        "config": tmp_path / "p.yaml",
        "preset": None,
        "out": "s3://b/run",
        "overrides": ["fit.train.lr=1e-3", "analyze.tail_frac=0.03"],
        "address": "ray://head:10001",
        "endpoint": "http://l:8000",
        "overwrite": False,
        "redo_changed": True,
        "steal_lock": True,
        "redo": "label",
    }
    assert runner.invoke(app, ["pipeline", "--preset", "tiny", "--overwrite"]).exit_code == 0
    assert (
        seen["preset"] == "tiny" and seen["overwrite"] and not seen["redo_changed"] and not seen["steal_lock"]
    )

    def bad(**kw):
        raise ConfigError("fit.train.lr: must be > 0")

    monkeypatch.setattr(jobs.pipeline, "run_pipeline", bad)
    r = runner.invoke(app, ["pipeline", "--preset", "tiny"])
    assert r.exit_code == 2 and "error: fit.train.lr: must be > 0" in r.output and "Traceback" not in r.output


def test_serve_command_names_the_judge_after_its_model(monkeypatch, tmp_path):
    """`crossdiff serve --judge-model DIR` serves that model under its own name (labels record it),
    unless the config or --set names it; it serves without a token only on loopback."""
    import serve.local

    started = []

    class Fake:
        def __init__(self, settings, **kw):
            self.settings, self.kw, self.url, self.token = settings, kw, "http://127.0.0.1:1", None

        def start(self):
            started.append(self)
            raise KeyboardInterrupt  # stands for Ctrl-C once it is up

        def stop(self):
            pass

    monkeypatch.setattr(serve.local, "LocalService", Fake)
    model = tmp_path / "Qwen2.5-7B-Instruct"
    model.mkdir()
    runner.invoke(app, ["serve", "--judge-model", str(model)])
    s = started[-1].settings
    assert s.judge.model_source == str(model) and s.judge.model_id == "Qwen2.5-7B-Instruct"
    runner.invoke(app, ["serve", "--judge-model", str(model), "--set", "judge.model_id=judge"])
    assert started[-1].settings.judge.model_id == "judge"
    assert started[-1].kw["host"] == "127.0.0.1"


def test_an_analysis_of_another_fit_is_not_reused_and_artifacts_carry_provenance(tmp_path, store):
    """`crossdiff fit --overwrite` refits into a run that still holds the old latents.parquet: the
    analysis notices (it records which fit it read) instead of skipping to the old results. The
    fit records where it ran; the report records the files it was computed from."""
    from diffing.analysis import analyze_run
    from diffing.config import AnalysisConfig, FitConfig
    from diffing.fit import fit
    from diffing.store import open_store
    from jobs.provenance import file_digest
    from jobs.report import write_report

    st, run = open_store(store), tmp_path / "run"
    cfg = FitConfig.model_validate(
        {"crosscoder": {"n_latents": 32, "k": 2}, "train": {"steps": 6, "batch_size": 256}}
    )
    metrics = fit(st, cfg, run)
    assert metrics["device"] == "cpu" and metrics["autocast"] is None and metrics["resumed_from_step"] == 0
    acfg = AnalysisConfig(evidence=False, max_tokens=2048)
    analyze_run(run, st, acfg)
    analyze_run(run, st, acfg)  # the same fit: skipped
    fit(st, cfg.model_copy(update={"train": cfg.train.model_copy(update={"seed": 1})}), run, overwrite=True)
    with pytest.raises(ValueError, match="another fit of this run.*--overwrite"):
        analyze_run(run, st, acfg)
    analyze_run(run, st, acfg, overwrite=True)
    # a refit to the same weights (its timings differ) is the same fit: the analysis stands, and a
    # fresh one of those weights is byte-identical
    before = (run / "latents.parquet").read_bytes()
    fit(st, cfg.model_copy(update={"train": cfg.train.model_copy(update={"seed": 1})}), run, overwrite=True)
    analyze_run(run, st, acfg)
    analyze_run(run, st, acfg, overwrite=True)
    assert (run / "latents.parquet").read_bytes() == before
    # an analysis written when metrics.json named the fit still stands for it
    import pyarrow.parquet as pq

    from diffing.analysis import _legacy_fit_digest

    t = pq.read_table(run / "latents.parquet")
    pq.write_table(
        t.replace_schema_metadata({**t.schema.metadata, b"fit": _legacy_fit_digest(run).encode()}),
        run / "latents.parquet",
    )
    analyze_run(run, st, acfg)
    (run / "metrics.json").write_text((run / "metrics.json").read_text().replace("{", '{"x": 1, ', 1))
    with pytest.raises(ValueError, match="another fit of this run"):
        analyze_run(run, st, acfg)
    analyze_run(run, st, acfg, overwrite=True)
    write_report(run)
    rep = json.loads((run / "report.json").read_text())
    prov = rep["provenance"]
    assert prov["inputs"]["latents.parquet"] == file_digest(run / "latents.parquet")
    assert (
        prov["inputs"]["metrics.json"] == file_digest(run / "metrics.json")
        and prov["inputs"]["labels.jsonl"] is None
    )
    env = prov["environment"]
    assert env["packages"]["torch"].startswith("2.") and env["python"] and env["at"].endswith("Z")
    assert env["cpu"]["count"] >= 1 and isinstance(env["cpu"]["native_bf16"], bool)  # what `auto` resolved by


def test_expected_errors_raised_in_ray_workers_stay_one_line(monkeypatch):
    """Ray wraps a worker's exception (Ray Data: UserCodeException `from` it; tasks: `.cause`): the
    expected condition inside still gives its one line and exit 2, out of GPU memory names the batch
    settings, Ctrl-C says how to resume (130), and a real bug keeps its traceback."""
    import torch
    from ray.exceptions import OutOfMemoryError as RayOOM
    from ray.exceptions import RayTaskError

    import jobs.pipeline
    from diffing.store import StoreError

    class UserCodeException(Exception):  # what Ray Data raises around a UDF's error (in-process)
        pass

    def task_error(cause):  # what ray.get raises: an instance of the cause's class too
        return RayTaskError(
            "fn", "Traceback (most recent call last):\n  ...remote...", cause
        ).as_instanceof_cause()

    OutOfMemoryError = torch.OutOfMemoryError

    def raising(exc):
        def run_pipeline(**kw):
            raise exc

        monkeypatch.setattr(jobs.pipeline, "run_pipeline", run_pipeline)
        return runner.invoke(app, ["pipeline", "--preset", "tiny"])

    def wrapped(inner):
        try:
            raise inner
        except Exception as e:
            try:
                raise UserCodeException("UDF failed to process a data block.") from e
            except UserCodeException as u:
                return u

    r = raising(wrapped(StoreError("activation overflows store_dtype=float16; set store_dtype: float32")))
    assert r.exit_code == 2 and "error: activation overflows" in r.output and "Traceback" not in r.output
    r = raising(task_error(ValueError("no node can hold analyze_task; lower its resources")))
    assert (
        r.exit_code == 2 and "error: no node can hold analyze_task" in r.output and "remote" not in r.output
    )
    r = raising(task_error(StoreError("shard 3 is corrupt; rerun with --overwrite")))
    assert r.exit_code == 2 and "error: shard 3 is corrupt" in r.output
    r = raising(RayOOM("Task was killed due to the node running low on memory."))
    assert r.exit_code == 2 and "ran out of RAM" in r.output and "GPU" not in r.output
    r = raising(wrapped(OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB")))
    assert r.exit_code == 2 and "lower harvest.batch_prompts" in r.output
    r = raising(KeyboardInterrupt())
    assert r.exit_code == 130 and "without --overwrite) to resume" in r.output
    # 3, not 2, where a rerun later may succeed: a connection, a timeout, a service that kept failing
    import errno

    from botocore.exceptions import EndpointConnectionError, ReadTimeoutError

    from jobs.label import LabelJobError
    from serve.local import ServiceNotHealthy

    def s3fs_error(inner):  # s3fs raises an OSError `from` botocore's error
        try:
            raise inner
        except Exception as e:
            try:
                raise OSError(errno.EIO, "Read timeout on endpoint URL") from e
            except OSError as o:
                return o

    for exc in (
        task_error(ConnectionError("cannot reach Ray at HEAD:6379")),
        TimeoutError("timed out"),
        LabelJobError("latents [3] failed 6 times (last: 503); rerun to resume", retryable=True),
        EndpointConnectionError(endpoint_url="http://127.0.0.1:1/bucket"),
        OSError(errno.EBUSY, "Please reduce your request rate (SlowDown)"),
        s3fs_error(ReadTimeoutError(endpoint_url="http://127.0.0.1:1/bucket")),
    ):
        r = raising(exc)
        assert r.exit_code == 3 and "error: " in r.output and "Traceback" not in r.output, (exc, r.output)
        assert "needs credentials" not in r.output  # an endpoint that does not answer is not a key problem
    assert (
        "the S3 endpoint did not answer"
        in raising(EndpointConnectionError(endpoint_url="http://h:1/b")).output
    )
    for exc in (
        LabelJobError("the endpoint rejected latents [3]: 401"),
        ServiceNotHealthy("labelling service at http://127.0.0.1:1 not healthy after 600 s"),
        BrokenPipeError(errno.EPIPE, "Broken pipe"),
        OSError(errno.EACCES, "Permission denied"),
    ):
        assert raising(exc).exit_code == 2, exc
    r = raising(wrapped(KeyError("a bug")))
    assert r.exit_code == 1 and isinstance(r.exception, UserCodeException)  # not dressed up as a user error


@pytest.mark.timeout(120)
def test_a_crosscoder_the_models_cannot_have_is_refused_before_the_harvest(tmp_path):
    """k above the n_latents the models' width gives: refused at once, not after the harvest."""
    out = tmp_path / "run"
    r = runner.invoke(
        app,
        ["pipeline", "--preset", "tiny", "--out", str(out), "--set", "fit.crosscoder.expansion_factor=1",
         "--set", "fit.crosscoder.k=100"],
    )  # fmt: skip
    assert r.exit_code == 2, r.output
    assert "fit: crosscoder.k=100 exceeds crosscoder.n_latents=64" in r.output
    assert "found before the harvest" in r.output
    assert not (out / "store").exists() and not (out / "stages").exists()


def test_an_out_that_is_a_file_is_named_as_one(tmp_path, store):
    """[Errno 17] File exists / [Errno 20] Not a directory, raw: the message names the file in the way."""
    f = tmp_path / "harvest.yaml"
    f.write_text("x: 1\n")
    for args in (
        ["fit", "--store", store, "--out", str(f)],
        ["fit", "--store", store, "--out", str(f / "sub")],
        ["status", str(f)],
    ):
        r = runner.invoke(app, args)
        assert r.exit_code == 2, (args, r.output)
        assert f"{f} is a file where a directory is needed" in r.output and "Traceback" not in r.output
