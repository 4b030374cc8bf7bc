"""Ray job submission: deterministic ids, runtime_env without secrets, a real `ray start --head`
cluster running stages through the job API (success with outputs, refusal of duplicates, failures
that surface their error)."""

import json
import os
import subprocess
import sys
import time
import uuid
import zipfile
from pathlib import Path

import pytest
import yaml

from cluster import submit as sm
from cluster.runtime_env import PROJECT_ROOT, build_runtime_env, find_secrets, is_secret_name, passthrough_env

SECRET = "sEcReT-" + uuid.uuid4().hex  # a credential value that must never reach the cluster's job table
ENV = {
    "AWS_ENDPOINT_URL": "http://minio.local:9000",
    "AWS_DEFAULT_REGION": "eu-west-3",
    "AWS_ACCESS_KEY_ID": "AKIA" + SECRET,
    "AWS_SECRET_ACCESS_KEY": SECRET,
    "AWS_SESSION_TOKEN": SECRET + "-session",
    "HF_TOKEN": SECRET + "-hf",
    "CROSSDIFF_ENDPOINT_TOKEN": SECRET + "-endpoint",
    "CROSSDIFF_LOG_JSON": "1",
    "HOME": "/root",
}


def _harvest_cfg(path: Path, tiny_pair, corpus: Path, store: Path) -> Path:
    base, ft = tiny_pair
    data = {
        "models": [{"name": "base", "path": str(base)}, {"name": "ft", "path": str(ft)}],
        "layer": 2,
        "corpus": {"uri": str(corpus)},
        "store": str(store),
        "prompts_per_shard": 4,
        "batch_prompts": 4,
        "context_length": 64,
        "outlier_norm_mult": None,
        "ray": {"num_actors": 1, "num_cpus_per_actor": 0.5},
    }
    path.write_text(yaml.safe_dump(data))
    return path


def _corpus(path: Path, n: int = 8) -> Path:
    path.write_text(
        "\n".join(
            json.dumps({"id": f"t{i}", "text": f"Document {i}: a fox jumps over {i} dogs."}) for i in range(n)
        )
    )
    return path


# ---------------------------------------------------------------- offline: what a submission sends


def test_submission_id_is_deterministic_per_run_and_stage():
    a = sm.build_submission("fit", None, ["--store", "s3://b/acts", "--out", "s3://b/runs/r1"], environ={})
    b = sm.build_submission("fit", None, ["--out", "s3://b/runs/r1", "--store", "s3://b/acts"], environ={})
    c = sm.build_submission("fit", None, ["--store", "s3://b/acts", "--out", "s3://b/runs/r2"], environ={})
    d = sm.build_submission("analyze", None, ["--run", "s3://b/runs/r1", "--store", "x"], environ={})
    assert a.submission_id == b.submission_id
    assert a.submission_id.startswith("crossdiff-fit-r1-")
    assert len({a.submission_id, c.submission_id, d.submission_id}) == 3
    assert sm.submission_id("pipeline", "runs/x") == sm.submission_id("pipeline", "runs/x")
    with pytest.raises(sm.SubmitError, match="--name"):
        sm.run_key("report", None, ["--overwrite"], None)
    assert sm.run_key("report", {"out": "runs/a"}, [], None) == "runs/a"
    assert sm.run_key("report", {"out": "runs/a"}, ["--out=runs/b"], None) == "runs/b"
    assert sm.run_key("report", {"out": "runs/a"}, [], "mine") == "mine"


def test_relative_run_paths_are_flagged_before_submitting():
    """A relative --out lands in Ray's temporary job directory on the cluster: `submit` warns."""
    absolute = sm.build_submission(
        "fit", None, ["--store", "s3://b/acts", "--out", "/data/runs/r1"], environ={}
    )
    assert "relative_paths" not in absolute.extra
    rel = sm.build_submission("fit", None, ["--store", "s3://b/acts", "--out", "runs/r1"], environ={})
    assert rel.extra["relative_paths"] == ["--out runs/r1"]
    assert sm.relative_outputs("pipeline", {"out": "gs://b/r", "harvest": {"store": "acts"}}, []) == [
        "harvest.store acts"
    ]
    assert sm.relative_outputs("report", {"out": "/abs/a"}, ["--out=~/x"]) == ["--out ~/x"]
    # the corpus too: the job reads it where it runs
    pipe = {"out": "s3://b/r", "harvest": {"store": "s3://b/s", "corpus": {"uri": "data/c.jsonl"}}}
    assert sm.relative_outputs("pipeline", pipe, []) == ["harvest.corpus.uri data/c.jsonl"]
    harvest = {"store": "s3://b/s", "corpus": {"uri": "shards/"}}
    assert sm.relative_outputs("harvest", harvest, []) == ["corpus.uri shards/"]
    assert sm.relative_outputs("harvest", {"store": "s3://b/s", "corpus": {"uri": "s3://b/c/"}}, []) == []


def test_runtime_env_passes_settings_and_never_secrets(tmp_path, tiny_pair):
    cfg = _harvest_cfg(tmp_path / "h.yaml", tiny_pair, tmp_path / "c.jsonl", tmp_path / "store")
    sub = sm.build_submission("harvest", cfg, ["--set", "layer=1"], environ=ENV)
    env = sub.runtime_env["env_vars"]
    assert env["AWS_ENDPOINT_URL"] == "http://minio.local:9000"
    assert env["AWS_DEFAULT_REGION"] == "eu-west-3"
    assert env["CROSSDIFF_LOG_JSON"] == "1"
    for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "HF_TOKEN"):
        assert name not in env
    assert "CROSSDIFF_ENDPOINT_TOKEN" not in env and "HOME" not in env
    blob = json.dumps([sub.entrypoint, sub.runtime_env, sub.metadata])
    assert SECRET not in blob
    assert find_secrets({"runtime_env": {"env_vars": {"X_TOKEN": "a"}}}, ENV) == [
        "runtime_env.env_vars.X_TOKEN"
    ]
    # the config itself travels (validated here), the run is the store
    assert yaml.safe_load(env[sm.CONFIG_ENV])["store"] == str(tmp_path / "store")
    assert sub.metadata["crossdiff_run"] == str(tmp_path / "store")
    assert sub.runtime_env["working_dir"] == str(PROJECT_ROOT)
    # an installed crossdiff (the images, a wheel) uploads nothing: its "project" is site-packages
    from cluster.runtime_env import checkout

    assert checkout(PROJECT_ROOT) == PROJECT_ROOT and checkout(tmp_path) is None
    assert "working_dir" not in build_runtime_env(working_dir=checkout(tmp_path), environ={})
    assert {".venv", ".git", "runs"} <= set(sub.runtime_env["excludes"])
    with pytest.raises(sm.SubmitError, match="AWS_SECRET_ACCESS_KEY.*Secret"):
        sm.build_submission("harvest", cfg, [], env={"AWS_SECRET_ACCESS_KEY": "x"}, environ={})
    assert passthrough_env({"CROSSDIFF_API_KEY": "k", "CROSSDIFF_X": "1"}) == {"CROSSDIFF_X": "1"}


def test_bad_config_is_refused_before_submitting(tmp_path, tiny_pair):
    cfg = _harvest_cfg(tmp_path / "h.yaml", tiny_pair, tmp_path / "c.jsonl", tmp_path / "store")
    data = yaml.safe_load(cfg.read_text())
    data["layr"] = 2
    cfg.write_text(yaml.safe_dump(data))
    from diffing.config import ConfigError

    with pytest.raises(ConfigError, match="layr"):
        sm.build_submission("harvest", cfg, [], environ={})
    with pytest.raises(ConfigError, match="does not exist"):
        sm.build_submission("harvest", tmp_path / "missing.yaml", [], environ={})
    # a broken file is one line naming it, as the stage commands say it (no parser traceback)
    (tmp_path / "broken.yaml").write_text("train: [1, 2\n")
    with pytest.raises(ConfigError, match="broken.yaml: YAML error at line"):
        sm.build_submission("fit", tmp_path / "broken.yaml", ["--store", "s", "--out", "r"], environ={})
    with pytest.raises(ConfigError, match="is a directory"):
        sm.build_submission("fit", tmp_path, ["--store", "s", "--out", "r"], environ={})
    # without a config file, a misspelt --set key is still caught here, before the cluster sees it
    with pytest.raises(ConfigError, match=r"crosscoder\.kk: unknown field"):
        sm.build_submission(
            "fit", None, ["--store", "s", "--out", "r", "--set", "crosscoder.kk=1"], environ={}
        )
    with pytest.raises(ConfigError, match=r"fit\.trian\.lr"):
        sm.build_submission(
            "pipeline", None, ["--preset", "tiny", "--out", "r", "--set", "fit.trian.lr=1"], environ={}
        )
    sm.build_submission(
        "pipeline", None, ["--preset", "tiny", "--out", "r", "--set", "analyze_task.num_gpus=1"], environ={}
    )


def test_entrypoints_parse_with_the_cli(tmp_path, tiny_pair):
    cfg = _harvest_cfg(tmp_path / "h.yaml", tiny_pair, tmp_path / "c.jsonl", tmp_path / "store")
    subs = [
        sm.build_submission("harvest", cfg, ["--overwrite"], environ={}),
        sm.build_submission(
            "fit", None, ["--store", "s", "--out", "r", "--set", "train.lr=1e-3"], environ={}
        ),
        sm.build_submission("analyze", None, ["--run", "r", "--store", "s"], environ={}),
    ]
    for sub in subs:
        argv = sm.entrypoint_argv(sub.entrypoint, str(cfg))
        assert sm.parse_cli(argv) == sub.stage
    assert subs[0].entrypoint.endswith('crossdiff harvest --config "$cfg" --overwrite')
    with pytest.raises(sm.SubmitError):
        sm.parse_cli(["analyze", "--run", "r", "--stoer", "s"])
    with pytest.raises(sm.SubmitError):
        sm.parse_cli(["jobs", "frobnicate"])
    assert sm.parse_cli(["jobs", "logs", "some-id", "--follow"]) == "logs"
    # a typo in a pass-through option is caught before anything is sent
    with pytest.raises(sm.SubmitError, match="stoer"):
        sm.build_submission("analyze", None, ["--run", "r", "--stoer", "s"], environ={})


def test_pip_requirements_travel_in_the_runtime_env():
    # an installed crossdiff uploads no code: --pip has the job's runtime env install it
    sub = sm.build_submission(
        "report", None, ["--run", "s3://b/run"], working_dir=None, environ={}, pip=[" crossdiff==0.1.0 "]
    )
    assert sub.runtime_env["pip"] == ["crossdiff==0.1.0"] and "working_dir" not in sub.runtime_env
    assert "pip" not in sm.build_submission("report", None, ["--run", "s3://b/run"], environ={}).runtime_env
    with pytest.raises(sm.SubmitError, match="--pip '-e .': give a requirement"):
        sm.build_submission("report", None, ["--run", "s3://b/run"], environ={}, pip=["-e ."])


def test_working_dir_upload_stays_small(tmp_path):
    """What Ray would upload for working_dir (its own packager, our excludes, .gitignore)."""
    from ray._private.runtime_env.packaging import create_package

    env = build_runtime_env(environ={})
    target = tmp_path / "pkg.zip"
    create_package(env["working_dir"], target, include_gitignore=True, excludes=env["excludes"])
    names = zipfile.ZipFile(target).namelist()
    assert "jobs/cli.py" in names and "diffing/store/writer.py" in names and "cluster/submit.py" in names
    assert not any(n.startswith((".venv/", ".git/", "runs/")) or "__pycache__" in n for n in names)
    assert target.stat().st_size < 5 * 2**20, target.stat().st_size
    # data a user keeps inside the checkout (a store, weights) stays home, .gitignore or not
    proj = tmp_path / "proj"
    (proj / "runs2" / "store").mkdir(parents=True)
    (proj / "job.py").write_text("print(1)\n")
    for name in ("runs2/store/shard.parquet", "w.safetensors", "m.gguf", "c.pt"):
        (proj / name).write_bytes(b"0" * 64)
    env = build_runtime_env(working_dir=proj, environ={})
    create_package(str(proj), tmp_path / "p.zip", include_gitignore=True, excludes=env["excludes"])
    assert zipfile.ZipFile(tmp_path / "p.zip").namelist() == ["job.py"]


# ---------------------------------------------------------------- a real `ray start --head` cluster


@pytest.fixture(scope="module")
def head(tmp_path_factory):
    """A local head started like `crossdiff cluster up` (own ports, temp dir, state file); the
    finalizer stops only its processes. It holds a credential in its environment (as a real cluster
    would, from a Secret) so the tests can check the credential never lands in the job table."""
    from cluster.local import down, up

    state_dir = tmp_path_factory.mktemp("cluster-state")
    name = "t" + uuid.uuid4().hex[:8]
    st = up(name, num_cpus=4, state_dir=state_dir, env={"AWS_SECRET_ACCESS_KEY": SECRET})
    try:
        yield st
    finally:
        down(name, state_dir=state_dir)


def _cli(*args, env=None, timeout=900):
    e = dict(os.environ)
    e.update(env or {})
    e.pop("RAY_ADDRESS", None)
    return subprocess.run(
        [sys.executable, "-m", "jobs.cli", *args],
        cwd=PROJECT_ROOT,
        env=e,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


@pytest.mark.ray
@pytest.mark.slow
@pytest.mark.timeout(600)
def test_an_installed_crossdiff_reaches_a_cluster_without_it_through_pip(head, tmp_path):
    """An installed crossdiff uploads no code (working_dir None); `--pip WHEEL` has Ray build the
    job a virtualenv holding it, and the job's `crossdiff` is that one."""
    import shutil

    src = tmp_path / "src"  # the wheel is built from a copy: setuptools writes build/ where it builds
    for name in ("diffing", "jobs", "serve", "cluster"):
        shutil.copytree(PROJECT_ROOT / name, src / name, ignore=shutil.ignore_patterns("__pycache__"))
    for name in ("pyproject.toml", "README.md", "LICENSE"):
        shutil.copy(PROJECT_ROOT / name, src / name)
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "-q",
            "--no-deps",
            "--no-build-isolation",
            "-w",
            tmp_path,
            src,
        ],
        check=True,
        capture_output=True,
        timeout=300,
    )
    (wheel,) = tmp_path.glob("crossdiff-*.whl")
    sub = sm.build_submission(
        "report", None, ["--run", str(tmp_path / "none")], working_dir=None, pip=[str(wheel)]
    )
    assert "working_dir" not in sub.runtime_env
    jc = sm.client(head["dashboard"])
    sid = jc.submit_job(
        entrypoint='which crossdiff && (cd / && python -c "import jobs; print(jobs.__file__)") && '
        + sub.entrypoint,
        runtime_env=sub.runtime_env,
    )
    st = sm.wait(sid, timeout_s=500, jc=jc)
    logs = jc.get_job_logs(sid)
    assert st["status"] == "FAILED", logs  # the stage's own error: the run does not exist
    exe, mod = [line for line in logs.splitlines() if line.endswith(("/crossdiff", "/jobs/__init__.py"))][:2]
    assert "/runtime_resources/pip/" in exe and "/runtime_resources/pip/" in mod, logs
    assert "latents.parquet is missing" in logs


@pytest.mark.ray
@pytest.mark.slow
@pytest.mark.timeout(1500)
def test_harvest_job_runs_on_a_real_cluster(head, tmp_path, tiny_pair):
    addr = head["dashboard"]
    corpus = _corpus(tmp_path / "c.jsonl", 8)
    store = tmp_path / "store"
    cfg = _harvest_cfg(tmp_path / "h.yaml", tiny_pair, corpus, store)
    env = {"AWS_SECRET_ACCESS_KEY": SECRET, "AWS_ENDPOINT_URL": "http://127.0.0.1:9"}
    r = _cli("submit", "harvest", "--address", addr, "--config", str(cfg), env=env, timeout=300)
    assert r.returncode == 0, r.stderr
    sid = json.loads(r.stdout.strip().splitlines()[-1])["submission_id"]
    # a second submission of the same run while the first is pending/running is refused
    again = _cli("submit", "harvest", "--address", addr, "--config", str(cfg), env=env, timeout=300)
    jc = sm.client(addr)
    if sm.status(sid, jc=jc)["status"] in sm.ACTIVE or again.returncode != 0:
        assert again.returncode == 2, again.stdout
        assert "already" in again.stderr and sid in again.stderr and "jobs stop" in again.stderr
    st = sm.wait(sid, timeout_s=1200, jc=jc)
    assert st["status"] == "SUCCEEDED", sm.failure_report(sid, jc=jc)
    # outputs: a complete store with every document's tokens, from both models
    from diffing.store import open_store

    s = open_store(str(store))
    assert s.model_names == ["base", "ft"] and s.n_rows > 8
    # the job record holds no credential, the S3 settings travelled
    info = jc.get_job_info(sid)
    record = json.dumps([info.entrypoint, info.runtime_env, info.metadata], default=str)
    assert SECRET not in record
    assert info.runtime_env["env_vars"]["AWS_ENDPOINT_URL"] == "http://127.0.0.1:9"
    assert info.metadata["crossdiff_stage"] == "harvest"
    # listed; a resubmission of a finished run is refused unless --replace
    r = _cli("jobs", "list", "--address", addr, timeout=120)
    assert sid in [j["submission_id"] for j in json.loads(r.stdout)]
    again = _cli("submit", "harvest", "--address", addr, "--config", str(cfg), timeout=120)
    assert again.returncode == 2 and "already SUCCEEDED" in again.stderr and "--replace" in again.stderr
    r = _cli("jobs", "status", sid, "--address", addr, timeout=120)
    assert json.loads(r.stdout)["status"] == "SUCCEEDED"


@pytest.mark.ray
@pytest.mark.slow
@pytest.mark.timeout(900)
def test_failing_job_surfaces_its_error(head, tmp_path, tiny_pair):
    cfg = _harvest_cfg(tmp_path / "h.yaml", tiny_pair, tmp_path / "no-such-corpus.jsonl", tmp_path / "s")
    t0 = time.monotonic()
    r = _cli("submit", "harvest", "--address", head["dashboard"], "--config", str(cfg), "--wait")
    assert r.returncode == 1, (r.stdout, r.stderr)
    assert "FAILED" in r.stderr
    assert "no-such-corpus.jsonl" in r.stderr  # the stage's own error message, from the job's logs
    assert time.monotonic() - t0 < 900


# The stages the submitted tiny pipeline runs. label/report join once the tiny preset's label config
# and the fake judge settle (they are still moving); the job mechanics are the same for every stage.
PIPELINE_STAGES = ("harvest", "fit", "analyze")


@pytest.mark.ray
@pytest.mark.slow
@pytest.mark.timeout(1500)
def test_tiny_pipeline_job_on_a_real_cluster(head, tmp_path):
    pytest.importorskip("jobs.pipeline")
    stages = PIPELINE_STAGES
    run = tmp_path / "run"
    r = _cli(
        "submit", "pipeline", "--address", head["dashboard"], "--preset", "tiny", "--out", str(run),
        "--set", "stages=[" + ",".join(stages) + "]", "--wait", timeout=1400,
    )  # fmt: skip
    assert r.returncode == 0, (r.stdout[-3000:], r.stderr[-3000:])
    assert "SUCCEEDED" in r.stdout
    for s in stages:
        marker = json.loads((run / "stages" / f"{s}.json").read_text())
        assert marker["summary"] is not None, s
    from diffing.store import open_store

    assert open_store(str(run / "store")).n_rows > 0
    if "analyze" in stages:
        assert (run / "latents.parquet").exists()


@pytest.mark.ray
@pytest.mark.slow
@pytest.mark.timeout(600)
def test_cluster_up_and_down_from_the_cli(tmp_path):
    """`crossdiff cluster up` starts a head whose job API the other commands find without --address;
    `cluster down` ends exactly its processes."""
    import psutil

    env = {"CROSSDIFF_CLUSTER_STATE": str(tmp_path), "RAY_API_SERVER_ADDRESS": ""}
    name = "cli" + uuid.uuid4().hex[:6]
    r = _cli("cluster", "up", "--name", name, env=env, timeout=400)
    state = json.loads(r.stdout.strip().splitlines()[-1]) if r.returncode == 0 else None
    try:
        assert r.returncode == 0, r.stderr
        assert state["dashboard"].startswith("http://127.0.0.1:")
        assert (tmp_path / f"{name}.json").exists()
        # the default cluster for submit/jobs is the one named "local"; name it explicitly here
        r = _cli("jobs", "list", "--address", state["dashboard"], env=env, timeout=120)
        assert r.returncode == 0 and json.loads(r.stdout) == []
        r = _cli("cluster", "up", "--name", name, env=env, timeout=120)
        assert r.returncode == 2 and "already up" in r.stderr
    finally:
        r = _cli("cluster", "down", "--name", name, env=env, timeout=300)
    assert json.loads(r.stdout)["stopped"] is True
    assert not (tmp_path / f"{name}.json").exists()
    left = [
        p.pid
        for p in psutil.process_iter(["cmdline"])
        if state and any(state["temp_dir"] in (a or "") for a in (p.info["cmdline"] or []))
    ]
    assert left == []
    assert not psutil.pid_exists(state["pid"]) or psutil.Process(state["pid"]).status() == "zombie"


def test_a_stale_state_never_touches_the_process_that_reused_its_pid(tmp_path):
    """The recorded `ray start` died and its pid went to another program: the cluster is not up,
    `down` leaves that program alone (and removes the stale file), and a corrupt state file is a
    one-line error, not a traceback."""
    import cluster.local as local

    other = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        for created in (None, 12.0):  # a state without, and one with the wrong, start time
            state = {
                "name": "x",
                "pid": other.pid,
                "temp_dir": str(tmp_path / "cdr-gone"),
                "dashboard": "http://127.0.0.1:1",
                "address": "127.0.0.1:1",
            }
            if created is not None:
                state["pid_create_time"] = created
            local.state_path("x", tmp_path).write_text(json.dumps(state))
            assert local.load_state("x", tmp_path) is None
            assert local.down("x", state_dir=tmp_path) is False
            assert other.poll() is None  # still running
            assert not local.state_path("x", tmp_path).exists()
        local.state_path("x", tmp_path).write_text('{"name": "x", "pid":')
        with pytest.raises(RuntimeError, match="corrupt or incomplete"):
            local.load_state("x", tmp_path)
        r = _cli("cluster", "down", "--name", "x", env={"CROSSDIFF_CLUSTER_STATE": str(tmp_path)}, timeout=60)
        assert r.returncode == 2 and "corrupt or incomplete" in r.stderr and "Traceback" not in r.stderr
    finally:
        other.kill()


def test_worker_port_range_avoids_the_ports_picked_for_other_components(monkeypatch):
    """A CI run failed once: Ray refused a worker-port range holding the dashboard agent's port.
    The probe of each port is stubbed: which real ports are busy depends on the machine."""
    import random

    import cluster.local as local

    busy = {40005}
    monkeypatch.setattr(local, "_port_free", lambda p: p not in busy)
    starts = iter([30000, 40000, 50000])
    monkeypatch.setattr(random, "randint", lambda a, b: next(starts))
    # 30000: holds a picked port; 40000: holds a busy port; 50000: free.
    assert local._free_range(200, avoid=[30150]) == 50000


def test_port_probe_sees_a_bound_port():
    import socket

    from cluster.local import _port_free

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        assert not _port_free(s.getsockname()[1])


@pytest.mark.timeout(60)  # Ray's own retries would run for minutes: the timeout is the check
def test_an_address_nothing_listens_at_fails_fast_naming_it():
    """Ray's own connect retries for a long time; a Ray address with nothing behind it fails at once."""
    import socket

    from cluster.connect import check_reachable

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        for form in (f"127.0.0.1:{port}", f"ray://127.0.0.1:{port}", f"http://127.0.0.1:{port}"):
            check_reachable(form)
    with pytest.raises(ConnectionError, match=f"cannot reach Ray at ray://127.0.0.1:{port}"):
        check_reachable(f"ray://127.0.0.1:{port}")
    check_reachable("auto")  # left to Ray
    with pytest.raises(sm.SubmitError, match="cannot reach") as e:
        sm.client(f"127.0.0.1:{port}")
    assert e.value.retryable  # `crossdiff submit` / `jobs` exit 3: try again once the cluster is up
    from typer.testing import CliRunner

    from jobs.cli import app

    r = CliRunner().invoke(app, ["jobs", "list", "--address", f"127.0.0.1:{port}"])
    assert r.exit_code == 3 and "cannot reach" in r.output, r.output


def test_a_credential_the_config_names_is_never_shipped_whatever_its_name(tmp_path):
    """label.token_env (and the judge's api_key_env) may name any variable: what it names is a
    credential even when its name does not look like one, and stays out of the job."""
    from cluster.runtime_env import configured_secret_names

    environ = {"CROSSDIFF_LABELLER_PHRASE": "s3cr3t-value", "CROSSDIFF_X": "1"}
    assert passthrough_env(environ) == environ  # the name alone does not give it away
    assert is_secret_name("CROSSDIFF_LABELLER_BEARER") and is_secret_name("GIT_CRED")
    assert not is_secret_name("PWD") and not is_secret_name("OLDPWD")  # the working directory's path
    args = ["--run", str(tmp_path / "run"), "--set", "token_env=CROSSDIFF_LABELLER_PHRASE"]
    sub = sm.build_submission("label", None, args, environ=environ)
    assert sub.runtime_env["env_vars"] == {
        "CROSSDIFF_LOG_JSON": "1",
        "CROSSDIFF_X": "1",
    }  # JSON logs by default
    quiet = sm.build_submission("label", None, args, environ={"CROSSDIFF_LOG_JSON": "0"})
    assert quiet.runtime_env["env_vars"]["CROSSDIFF_LOG_JSON"] == "0"  # the submitter's own choice stands
    assert "s3cr3t-value" not in json.dumps([sub.entrypoint, sub.runtime_env, sub.metadata])
    with pytest.raises(sm.SubmitError, match="CROSSDIFF_LABELLER_PHRASE"):
        sm.build_submission("label", None, args, env={"CROSSDIFF_LABELLER_PHRASE": "x"}, environ={})
    nested = {"label": {"service": {"judge": {"api_key_env": "JUDGE_K"}, "auth": {"token_env": "T"}}}}
    assert configured_secret_names(nested) == {"JUDGE_K", "T"}
    assert find_secrets({"env_vars": {"JUDGE_K": "v"}}, {}, {"JUDGE_K"}) == ["env_vars.JUDGE_K"]
