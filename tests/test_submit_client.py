"""Submitting from a user's shell: which cluster a command talks to, which run a submission names,
what of the submitter's environment travels, and following a job (no cluster needed)."""

import os

import pytest
import typer

from cluster import submit as sm
from cluster.runtime_env import build_runtime_env, find_secrets, passthrough_env


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
