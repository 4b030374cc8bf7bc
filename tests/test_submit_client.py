"""Submitting from a user's shell: which cluster a command talks to, which run a submission names,
what of the submitter's environment travels, and following a job (no cluster needed)."""

import os

import pytest
import typer

from cluster import submit as sm
from cluster.runtime_env import build_runtime_env, find_secrets, is_secret_name, passthrough_env


class _FakeClient:
    seen: list = []

    def __init__(self, address):
        # what Ray's client would use: its argument unless one of these variables is set
        env = os.environ.get("RAY_API_SERVER_ADDRESS") or os.environ.get("RAY_ADDRESS")
        _FakeClient.seen.append(env or address)


@pytest.fixture
def fake_client(monkeypatch):
    import ray.job_submission

    monkeypatch.setattr(ray.job_submission, "JobSubmissionClient", _FakeClient)
    # the hosts here are names only: nothing listens there (tests/test_submit.py covers the check)
    monkeypatch.setattr("cluster.connect.check_reachable", lambda address, timeout_s=5.0: None)
    _FakeClient.seen = []
    return _FakeClient


def test_an_explicit_address_wins_over_ray_address(monkeypatch, fake_client):
    monkeypatch.setenv("RAY_ADDRESS", "http://dev-head:8265")
    sm.client("http://prod-head:8265")
    assert fake_client.seen == ["http://prod-head:8265"]
    assert os.environ["RAY_ADDRESS"] == "http://dev-head:8265"  # the user's environment is left as it was
    sm.client(None)
    assert fake_client.seen[-1] == "http://dev-head:8265"


@pytest.mark.parametrize("value", ["ray://head:10001", "head:6379", "https://head.example:443"])
def test_every_address_form_ray_takes_is_used(monkeypatch, value):
    monkeypatch.delenv("RAY_API_SERVER_ADDRESS", raising=False)
    monkeypatch.setenv("RAY_ADDRESS", value)
    assert sm.resolve_address(None) == value
    monkeypatch.setenv("RAY_API_SERVER_ADDRESS", "http://api:8265")
    assert sm.resolve_address(None) == "http://api:8265"


def test_set_overrides_decide_the_run_a_submission_names(tmp_path):
    cfg = tmp_path / "p.yaml"
    cfg.write_text(
        "out: s3://b/runs/default\nharvest:\n  models: [{name: a, path: /m/a}, {name: b, path: /m/b}]\n"
        "  layer: 1\n  corpus: {uri: s3://b/c.jsonl}\n"
    )
    a = sm.build_submission("pipeline", cfg, ["--set", "out=s3://b/runs/a"], working_dir=None, environ={})
    b = sm.build_submission("pipeline", cfg, ["--set=out=s3://b/runs/b"], working_dir=None, environ={})
    assert a.metadata["crossdiff_run"] == "s3://b/runs/a" and b.metadata["crossdiff_run"] == "s3://b/runs/b"
    assert a.submission_id != b.submission_id
    c = sm.build_submission("pipeline", None, ["--preset", "tiny", "--set", "out=/x/t"], working_dir=None)
    assert c.metadata["crossdiff_run"] == "/x/t"


def test_pipeline_and_label_configs_are_checked_before_they_are_sent(tmp_path):
    from diffing.config import ConfigError

    cfg = tmp_path / "p.yaml"
    cfg.write_text(
        "harvest:\n  models: [{name: a, path: /m/a}, {name: b, path: /m/b}]\n  layer: 1\n"
        "  corpus: {uri: s3://b/c.jsonl}\nfit: {crosscoder: {kk: 3}}\n"
    )
    with pytest.raises(ConfigError, match=r"fit\.crosscoder\.kk"):
        sm.build_submission("pipeline", cfg, ["--out", "s3://b/r"], working_dir=None, environ={})
    cfg.write_text(cfg.read_text().replace("kk: 3", "k: 3"))
    ok = sm.build_submission("pipeline", cfg, ["--out", "s3://b/r"], working_dir=None, environ={})
    assert ok.metadata["crossdiff_run"] == "s3://b/r"  # out from the command line, as the CLI takes it
    with pytest.raises(ConfigError, match="label config"):  # a pipeline config handed to `label`
        sm.build_submission("label", cfg, ["--run", "s3://b/r"], working_dir=None, environ={})


def test_a_store_only_the_cluster_reaches_is_not_read_here_but_the_rest_is_checked(tmp_path):
    """A pipeline without its harvest stage names only its store: where the submitting machine
    cannot read it, the models are stood in for (named after the pair) and the rest is checked."""
    from diffing.config import ConfigError

    cfg = tmp_path / "p.yaml"
    body = "stages: [fit, analyze, report]\nharvest: {store: /only/on/the/cluster}\npair: [pt, it]\n"
    cfg.write_text(body)
    out = ["--out", str(tmp_path / "r")]
    sm.build_submission("pipeline", cfg, out, working_dir=None, environ={})
    cfg.write_text(body + "fit: {crosscoder: {kk: 3}}\n")
    with pytest.raises(ConfigError, match=r"fit\.crosscoder\.kk"):
        sm.build_submission("pipeline", cfg, out, working_dir=None, environ={})
    from jobs.pipeline_config import load_pipeline_config

    cfg.write_text(body)
    with pytest.raises(ConfigError, match=r"harvest\.models: not given.*harvest\.store /only/on/the/cluster"):
        load_pipeline_config(cfg, out=str(tmp_path / "r"))  # on the machine that runs it: read, or refused


def test_machine_local_settings_stay_home_and_desktop_sessions_are_not_secrets(tmp_path):
    environ = {
        "CROSSDIFF_CACHE": "/Users/me/.cache/crossdiff",
        "CROSSDIFF_CLUSTER_STATE": "/Users/me/state",
        "CROSSDIFF_JUDGE_MODEL": "/Users/me/judge",
        "CROSSDIFF_LOG_JSON": "1",
        "DESKTOP_SESSION": "ubuntu",
        "XDG_SESSION_TYPE": "x11",
        "AWS_SESSION_TOKEN": "a-real-session-token",
    }
    assert passthrough_env(environ) == {"CROSSDIFF_LOG_JSON": "1"}
    env = build_runtime_env(
        working_dir="/home/ubuntu/crossdiff", env_vars={"CROSSDIFF_CACHE": "/cluster/cache"}, environ=environ
    )
    assert env["env_vars"]["CROSSDIFF_CACHE"] == "/cluster/cache"  # explicit --env travels
    assert find_secrets(env, environ) == []  # "ubuntu" in the path is no credential
    env["env_vars"]["X"] = "a-real-session-token"
    assert find_secrets(env, environ) == ["env_vars.X"]


class _Jobs:
    def __init__(self, statuses):
        self.statuses = list(statuses)

    def get_job_info(self, job_id):
        s = self.statuses.pop(0) if len(self.statuses) > 1 else self.statuses[0]
        return type(
            "Info",
            (),
            {"status": s, "message": "", "metadata": {}, "entrypoint": "", "start_time": 0, "end_time": 0},
        )()


def test_wait_without_a_limit_waits_for_the_end(monkeypatch):
    monkeypatch.setattr(sm.time, "sleep", lambda s: None)
    monkeypatch.setattr(sm, "status", lambda job_id, jc=None: {"status": jc.get_job_info(job_id).status})
    jc = _Jobs(["RUNNING"] * 50 + ["SUCCEEDED"])
    assert sm.wait("j", timeout_s=None, jc=jc)["status"] == "SUCCEEDED"


def test_ctrl_c_while_following_leaves_the_job_running(capsys):
    from jobs.submit import _watch

    def interrupted():
        raise KeyboardInterrupt

    with pytest.raises(typer.Exit) as e:
        _watch(interrupted, "crossdiff-fit-r1-abc")
    assert e.value.exit_code == 130
    err = capsys.readouterr().err
    assert "goes on" in err and "crossdiff jobs stop crossdiff-fit-r1-abc" in err


def test_a_home_that_cannot_hold_caches_sends_them_to_the_crossdiff_cache(tmp_path, monkeypatch):
    """HOME=/dev/null (or a read-only one) with CROSSDIFF_CACHE set: torch, vLLM and Ray's model
    loader cache under CROSSDIFF_CACHE/xdg (the judge's replica failed to deploy with
    NotADirectoryError '/dev/null/.cache'); a usable HOME, or XDG_CACHE_HOME set, is left alone."""
    import tempfile

    from cluster.connect import writable_cache_home

    (tmp_path / "file").write_text("x")
    env = {"HOME": str(tmp_path / "file"), "CROSSDIFF_CACHE": str(tmp_path / "c")}
    assert writable_cache_home(env) == str(tmp_path / "c" / "xdg") == env["XDG_CACHE_HOME"]
    # a read-only HOME whose image holds HF models: those stay found (HF would follow XDG)
    (tmp_path / "ro" / ".cache" / "huggingface").mkdir(parents=True)
    env = {"HOME": str(tmp_path / "ro"), "CROSSDIFF_CACHE": str(tmp_path / "c")}
    with monkeypatch.context() as m:
        m.setattr(tempfile, "TemporaryFile", lambda **kw: (_ for _ in ()).throw(PermissionError(13, "ro")))
        assert writable_cache_home(env) == str(tmp_path / "c" / "xdg")
    assert env["HF_HOME"] == str(tmp_path / "ro" / ".cache" / "huggingface")
    for ok in (
        {"HOME": str(tmp_path / "home"), "CROSSDIFF_CACHE": "/c"},  # made if missing
        {"HOME": str(tmp_path / "file"), "CROSSDIFF_CACHE": "/c", "XDG_CACHE_HOME": "/x"},
        {"HOME": str(tmp_path / "file")},  # no other place named: as before
    ):
        before = dict(ok)
        assert writable_cache_home(ok) is None and ok == before


def test_a_temporary_directory_ray_cannot_use_is_replaced_for_it(tmp_path):
    """TMPDIR with a space or an "é" (Ray's core worker failed on it): the Ray started here gets
    /tmp; a plain one is left alone."""
    from cluster.connect import plain_tmpdir

    for odd in ("/data/tmp dir", "/data/tmp é"):
        env = {"TMPDIR": odd}
        assert plain_tmpdir(env, tmp=odd) == "/tmp" == env["TMPDIR"] == env["RAY_TMPDIR"]
    env = {"TMPDIR": "/data/tmp"}
    assert plain_tmpdir(env, tmp="/data/tmp") is None and env == {"TMPDIR": "/data/tmp"}


def test_caches_placed_under_the_odd_temporary_directory_move_with_it():
    """torch's inductor names its cache (under TMPDIR) in TORCHINDUCTOR_CACHE_DIR as soon as
    transformers loads a tokenizer, before the harvest starts Ray: the judge's replica inherited the
    spaced path and its kernel compile failed (g++ split the path). Caches elsewhere stay."""
    from cluster.connect import plain_tmpdir

    odd = "/data/tmp dir"
    env = {
        "TMPDIR": odd,
        "TORCHINDUCTOR_CACHE_DIR": f"{odd}/torchinductor_me",
        "TRITON_CACHE_DIR": f"{odd}/",
        "VLLM_CACHE_ROOT": "/data/tmp dirt/vllm",  # only a prefix of the name: not under it
        "HF_HOME": "/data/hf",
        "MY_NOTES": f"{odd}/notes.txt",  # not a cache: left as it is
    }
    assert plain_tmpdir(env, tmp=odd) == "/tmp"
    assert env["TORCHINDUCTOR_CACHE_DIR"] == "/tmp/torchinductor_me"
    assert env["TRITON_CACHE_DIR"] == "/tmp/"
    assert env["VLLM_CACHE_ROOT"] == "/data/tmp dirt/vllm" and env["HF_HOME"] == "/data/hf"
    assert env["MY_NOTES"] == f"{odd}/notes.txt"


def test_a_ray_started_here_passes_settings_not_credentials():
    """Ray's runtime-env agent logs the env_vars it is given; the workers of a Ray started by this
    process inherit its credentials without them."""
    from cluster.connect import local_env

    env = {
        "AWS_ACCESS_KEY_ID": "a",
        "AWS_SECRET_ACCESS_KEY": "s",
        "AWS_SESSION_TOKEN": "t",
        "HF_TOKEN": "h",
        "CROSSDIFF_API_TOKEN": "x",
        "AWS_ENDPOINT_URL": "http://s3",
        "AWS_DEFAULT_REGION": "r",
        "HF_HUB_OFFLINE": "1",
        "CROSSDIFF_CACHE": "/c",
        "PATH": "/bin",
    }
    assert local_env(env) == {
        "AWS_ENDPOINT_URL": "http://s3",
        "AWS_DEFAULT_REGION": "r",
        "HF_HUB_OFFLINE": "1",
        "CROSSDIFF_CACHE": "/c",
    }


class _Recorder:
    """A job client that records what is sent: one existing job of the given status (None: none)."""

    def __init__(self, status=None, logs="", jobs=()):
        self.status, self.calls, self._logs, self._jobs = status, [], logs, list(jobs)

    def get_job_info(self, job_id):
        if self.status is None:
            raise RuntimeError("no such job")
        return type(
            "Info",
            (),
            {"submission_id": job_id, "status": self.status, "message": "m", "error_type": None,
             "metadata": {}, "entrypoint": "", "start_time": 0, "end_time": 0},
        )()  # fmt: skip

    def delete_job(self, job_id):
        self.calls.append(("delete", job_id))

    def submit_job(self, **kw):
        self.calls.append(("submit", kw))
        return kw["submission_id"]

    def get_job_logs(self, job_id):
        return self._logs

    def list_jobs(self):
        return self._jobs


def test_submit_sends_the_resources_asked_for_and_resubmits_only_what_may_be(tmp_path):
    """From the cluster-side mutation review: --num-cpus and --num-gpus reach the driver's request
    as given; an active job is never resubmitted, a finished one only with --replace, a failed or
    stopped one is deleted first (the stage resumes); the failure report shows the last log lines."""
    sub = sm.build_submission("report", None, ["--run", "s3://b/run"], environ={}, num_cpus=2, num_gpus=1)
    assert (sub.entrypoint_num_cpus, sub.entrypoint_num_gpus) == (2, 1)
    jc = _Recorder()
    sm.submit(sub, jc=jc)
    (kind, kw), = jc.calls  # fmt: skip
    assert kind == "submit" and (kw["entrypoint_num_cpus"], kw["entrypoint_num_gpus"]) == (2, 1)
    for status in ("PENDING", "RUNNING"):
        jc = _Recorder(status)
        for replace in (False, True):
            with pytest.raises(sm.SubmitError, match=f"already {status}"):
                sm.submit(sub, replace=replace, jc=jc)
        assert jc.calls == []
    jc = _Recorder("SUCCEEDED")
    with pytest.raises(sm.SubmitError, match="--replace"):
        sm.submit(sub, jc=jc)
    assert jc.calls == []
    for status, replace in (("SUCCEEDED", True), ("FAILED", False), ("STOPPED", False)):
        jc = _Recorder(status)
        sm.submit(sub, replace=replace, jc=jc)
        assert [c[0] for c in jc.calls] == ["delete", "submit"], status
    logs = "\n".join(f"line {i}" for i in range(100)) + "\nerror: the fix\n"
    report = sm.failure_report("j", tail_lines=3, jc=_Recorder("FAILED", logs=logs))
    assert report.endswith("line 98\nline 99\nerror: the fix") and "line 0\n" not in report


def test_jobs_list_shows_crossdiffs_jobs_unless_asked_for_all():
    def job(sid, meta, t):
        return type("J", (), {"submission_id": sid, "status": "RUNNING", "metadata": meta, "start_time": t})()

    jc = _Recorder(jobs=[job("b", {"crossdiff_stage": "fit", "crossdiff_run": "r"}, 2), job("x", {}, 1),
                         job("a", {"crossdiff_stage": "harvest", "crossdiff_run": "r"}, 1)])  # fmt: skip
    assert [r["submission_id"] for r in sm.list_jobs(jc=jc)] == ["a", "b"]
    assert [r["submission_id"] for r in sm.list_jobs(jc=jc, all_jobs=True)] == ["x", "a", "b"]


def test_credentials_a_config_names_or_key_names_never_travel(tmp_path):
    """A label config's token_env names a credential whatever its name: its value in a config text
    is refused; a *_KEY variable is never passed through with the CROSSDIFF_ prefix; RAY_AUTH_MODE is."""
    assert is_secret_name("CROSSDIFF_SIGNING_KEY") and not is_secret_name("RAY_AUTH_MODE")
    env = {"CROSSDIFF_SIGNING_KEY": "k" * 12, "RAY_AUTH_MODE": "token", "CROSSDIFF_LOG_JSON": "1"}
    assert passthrough_env(env) == {"CROSSDIFF_LOG_JSON": "1", "RAY_AUTH_MODE": "token"}
    cfg = tmp_path / "label.yaml"
    phrase = "correct-horse-battery-staple"
    cfg.write_text(f"token_env: CROSSDIFF_LABELLER_PHRASE\n# {phrase}\n")
    with pytest.raises(sm.SubmitError, match="credential"):
        sm.build_submission(
            "label",
            cfg,
            ["--run", "s3://b/run"],
            environ={"CROSSDIFF_LABELLER_PHRASE": phrase},
            working_dir=None,
        )


def test_a_local_ray_on_two_cores_gets_four_cpus(monkeypatch):
    """1-CPU actors starve Ray Data's read tasks on 2 cores (a hang without an error): a local
    cluster started here always declares at least 4 CPUs."""
    import ray

    from cluster import connect

    seen = {}
    monkeypatch.setattr(ray, "is_initialized", lambda: False)
    monkeypatch.setattr(ray, "init", lambda **kw: seen.update(kw))
    monkeypatch.setattr(os, "cpu_count", lambda: 2)
    monkeypatch.setattr(connect, "prepare_local_ray", lambda: None)
    monkeypatch.setattr(connect, "STARTED_LOCAL", connect.STARTED_LOCAL)
    monkeypatch.setenv("RAY_AUTH_MODE", "disabled")
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    connect.ensure_ray(None)
    assert seen["num_cpus"] == 4 and seen["address"] == "local"
    for job_api in ("http://head:8265", "https://head:8265"):  # the job API, not the cluster
        with pytest.raises(ValueError, match="is the job API"):
            connect.ensure_ray(job_api)


def test_the_submit_command_sends_what_it_is_given_and_a_stopped_job_fails(monkeypatch, tmp_path):
    """`crossdiff submit` end to end against a recording client: --env values keep their "=",
    --pip and --num-gpus reach the job, and --wait exits 1 with the log tail for a job that ends
    STOPPED or FAILED, 0 for SUCCEEDED."""
    import json

    from typer.testing import CliRunner

    from jobs.cli import app

    jc = _Recorder()
    monkeypatch.setattr(sm, "client", lambda address=None: jc)
    args = [
        "submit",
        "report",
        "--run",
        "s3://b/run",
        "--env",
        "CROSSDIFF_X=a=b",
        "--pip",
        "crossdiff==0.1.0",
    ]
    r = CliRunner().invoke(app, [*args, "--num-gpus", "1"])
    assert r.exit_code == 0, r.output
    (_, kw), = jc.calls  # fmt: skip
    assert kw["runtime_env"]["env_vars"]["CROSSDIFF_X"] == "a=b" and kw["runtime_env"]["pip"] == [
        "crossdiff==0.1.0"
    ]
    assert kw["entrypoint_num_gpus"] == 1 and json.loads(r.output.splitlines()[-1])["stage"] == "report"
    for end, code in (("STOPPED", 1), ("FAILED", 1), ("SUCCEEDED", 0)):
        jc = _Recorder(logs="error: what went wrong\n")
        monkeypatch.setattr(sm, "wait", lambda sid, end=end, **kw: {"status": end})
        monkeypatch.setattr(sm, "status", lambda sid, end=end, **kw: {"status": end, "message": "m"})
        r = CliRunner().invoke(app, [*args, "--wait", "--replace"])
        assert r.exit_code == code, (end, r.output)
        assert ("error: what went wrong" in r.output) == (code == 1)
