"""One writer per run: a second pipeline (or a resubmitted job) on a run that another live process
holds is refused with the holder's name; a killed holder frees it at once (local) or when its lease
goes stale or its pid on this host is gone (remote)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import fsspec
import pytest

from jobs import runlock
from jobs.runlock import LEASE_FILE, LOCK_FILE, Lease, RunBusy, hold_run, holder

HOLD = """
import sys, time
from pathlib import Path
from jobs.runlock import hold_run
with hold_run(Path(sys.argv[1]), command="crossdiff pipeline (test holder)"):
    print("held", flush=True)
    time.sleep(120)
"""


def _holder_process(run):
    p = subprocess.Popen([sys.executable, "-c", HOLD, str(run)], stdout=subprocess.PIPE, text=True)
    assert p.stdout.readline().strip() == "held"
    return p


@pytest.mark.timeout(60)
def test_a_local_run_held_by_a_live_process_is_refused_and_freed_when_it_dies(tmp_path):
    run = tmp_path / "run"
    p = _holder_process(run)
    try:
        assert holder(run)["pid"] == p.pid
        with pytest.raises(RunBusy, match=rf"in use by crossdiff pipeline \(test holder\) \(pid {p.pid} on "):
            with hold_run(run):
                pass
    finally:
        p.send_signal(signal.SIGKILL)  # killed, as a driver can be: the kernel drops its lock
        p.wait()
    assert holder(run) is None
    with hold_run(run, command="crossdiff pipeline (second)"):
        assert holder(run)["command"] == "crossdiff pipeline (second)"
    assert holder(run) is None


@pytest.fixture
def remote():
    fs = fsspec.filesystem("memory")
    root = f"/lease-test/{time.time_ns()}"
    yield fs, root, f"memory://{root}"
    fs.rm(root, recursive=True) if fs.exists(root) else None


def _write_lease(fs, root, **owner):
    fs.pipe_file(
        f"{root}/{LEASE_FILE}",
        json.dumps({"lease": "other", "command": "crossdiff pipeline", **owner}).encode(),
    )


def test_a_remote_lease_is_refused_while_alive_and_taken_over_when_stale_or_its_pid_is_gone(
    remote, monkeypatch
):
    monkeypatch.setattr(runlock, "SETTLE_S", 0.0)
    monkeypatch.setattr(runlock, "object_age", lambda info: None)  # heartbeats alone (no store times)
    fs, root, uri = remote
    now = time.time()
    # another machine's live holder
    _write_lease(fs, root, host="node-7", pid=4242, heartbeat=now)
    with pytest.raises(RunBusy, match=r"pid 4242 on node-7.*heartbeat \d+ s ago.*--steal-lock"):
        Lease(uri, "crossdiff pipeline").acquire()
    # ... stale: no heartbeat for longer than stale_s
    _write_lease(fs, root, host="node-7", pid=4242, heartbeat=now - 3600)
    lease = Lease(uri, "crossdiff pipeline")
    lease.acquire()
    assert json.loads(fs.cat_file(f"{root}/{LEASE_FILE}"))["lease"] == lease.me["lease"]
    lease.release()
    assert json.loads(fs.cat_file(f"{root}/{LEASE_FILE}"))["released"]  # given back: free
    # this host's holder whose process is gone: at once, whatever its heartbeat
    dead = subprocess.run(
        [sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True
    )
    _write_lease(fs, root, **runlock._machine(), pid=int(dead.stdout), heartbeat=now)
    lease = Lease(uri, "crossdiff pipeline")
    lease.acquire()
    lease.release()
    # --steal-lock takes a live one
    _write_lease(fs, root, host="node-7", pid=4242, heartbeat=time.time())
    lease = Lease(uri, "crossdiff pipeline")
    lease.acquire(steal=True)
    lease.release()


def test_two_leases_on_one_run_and_the_heartbeat(remote, monkeypatch):
    monkeypatch.setattr(runlock, "SETTLE_S", 0.0)
    fs, root, uri = remote
    a = Lease(uri, "crossdiff pipeline (a)", heartbeat_s=0.05)
    a.acquire()
    first = json.loads(fs.cat_file(f"{root}/{LEASE_FILE}"))["heartbeat"]
    time.sleep(0.3)
    assert json.loads(fs.cat_file(f"{root}/{LEASE_FILE}"))["heartbeat"] > first  # kept alive
    with pytest.raises(RunBusy, match=r"crossdiff pipeline \(a\)"):
        Lease(uri, "crossdiff pipeline (b)").acquire()
    # two takers at once: the one whose lease was overwritten while it settled backs off
    a.release()
    b, c = Lease(uri, "b"), Lease(uri, "c")
    monkeypatch.setattr(runlock, "SETTLE_S", 0.01)
    real_sleep = time.sleep

    def c_writes_meanwhile(s):
        c._write()
        real_sleep(s)

    monkeypatch.setattr(runlock.time, "sleep", c_writes_meanwhile)
    with pytest.raises(RunBusy, match="at the same moment"):
        b.acquire()
    monkeypatch.setattr(runlock.time, "sleep", real_sleep)


@pytest.mark.timeout(60)
def test_a_second_pipeline_on_a_held_run_changes_nothing_and_exits_3(tmp_path, monkeypatch):
    from typer.testing import CliRunner

    from jobs.cli import app

    run = tmp_path / "run"
    p = _holder_process(run)
    try:
        r = CliRunner().invoke(app, ["pipeline", "--preset", "tiny", "--out", str(run)])
        assert r.exit_code == 3, r.output  # retryable: free once the holder finishes
        assert "in use by crossdiff pipeline (test holder)" in r.output and "crossdiff status" in r.output
        # nothing of the pipeline's own (the preset's corpus is written, atomically and only when
        # absent, as its config is loaded)
        assert set(os.listdir(run)) <= {LOCK_FILE, "corpus.jsonl"}
    finally:
        p.kill()
        p.wait()


def test_the_mirror_never_copies_the_lock_or_the_lease(remote, tmp_path):
    from jobs.rundir import RunMirror

    fs, root, uri = remote
    local = tmp_path / "copy"
    local.mkdir()
    (local / LOCK_FILE).write_text("{}")
    (local / "latents.parquet").write_bytes(b"x")
    _write_lease(fs, root, host="h", pid=1, heartbeat=time.time())
    m = RunMirror(uri, local)
    m.push()
    assert fs.exists(f"{root}/latents.parquet") and not fs.exists(f"{root}/{LOCK_FILE}")
    m.pull()
    assert not (local / LEASE_FILE).exists()
    assert fs.exists(f"{root}/{LEASE_FILE}")  # and a push never deletes it


@pytest.mark.timeout(60)
def test_standalone_commands_on_a_held_run_are_refused_and_change_nothing(tmp_path):
    """`crossdiff label RUN` by hand while the pipeline labels (or analyze, fit) would append a second
    judge's labels to the same file: refused, exit 3, the labels untouched."""
    from typer.testing import CliRunner

    from jobs.cli import app

    run = tmp_path / "run"
    run.mkdir()
    (run / "labels.jsonl").write_text('{"latent": 1}\n')
    p = _holder_process(run)
    try:
        runner = CliRunner()
        for args in (
            ["label", "--run", str(run), "--endpoint", "http://127.0.0.1:9"],
            ["analyze", "--run", str(run), "--store", str(tmp_path / "store")],
            ["fit", "--store", str(tmp_path / "store"), "--out", str(run)],
        ):
            r = runner.invoke(app, args)
            assert r.exit_code == 3 and "in use by crossdiff pipeline (test holder)" in r.output, (
                args,
                r.output,
            )
        assert (run / "labels.jsonl").read_text() == '{"latent": 1}\n'
    finally:
        p.kill()
        p.wait()


def test_a_lease_taken_over_stops_its_old_holder_before_its_next_write(remote, monkeypatch, tmp_path):
    """--steal-lock against a holder still alive (or one cut off from the bucket past the stale
    limit): the old holder's next marker or upload raises instead of writing beside the new one."""
    from jobs.rundir import RunMirror

    monkeypatch.setattr(runlock, "SETTLE_S", 0.0)
    fs, root, uri = remote
    local = tmp_path / "copy"
    with hold_run(local, uri, command="crossdiff pipeline (old)") as held:
        mirror = RunMirror(uri, local, guard=held.check)
        (local / "a.json").write_text("{}")
        mirror.push()  # still ours
        assert fs.exists(f"{root}/a.json")
        new = Lease(uri, "crossdiff pipeline (new)")
        new.acquire(steal=True)
        (local / "b.json").write_text("{}")
        with pytest.raises(RunBusy, match=r"taken over by crossdiff pipeline \(new\)"):
            mirror.push()
        with pytest.raises(RunBusy):
            held.check()
        assert not fs.exists(f"{root}/b.json")
    # the old holder's exit leaves the new one's lease alone
    assert json.loads(fs.cat_file(f"{root}/{LEASE_FILE}"))["lease"] == new.me["lease"]
    new.release()


def test_same_host_name_in_another_pid_namespace_is_not_taken_as_dead(remote, monkeypatch):
    """Containers with host networking share a host name but not pids: a pid that looks dead here
    may be alive there, so only the stale limit frees such a lease."""
    monkeypatch.setattr(runlock, "SETTLE_S", 0.0)
    fs, root, uri = remote
    me = runlock._machine()
    if len(me) < 3:
        pytest.skip("no /proc pid namespace here")
    _write_lease(fs, root, **{**me, "pid_ns": me["pid_ns"] + 1}, pid=2**22 + 12345, heartbeat=time.time())
    with pytest.raises(RunBusy):
        Lease(uri, "x").acquire()
    _write_lease(fs, root, **me, pid=2**22 + 12345, heartbeat=time.time())  # same namespace: dead
    lease = Lease(uri, "x")
    lease.acquire()
    lease.release()


def test_holding_again_in_one_process_is_a_no_op_and_a_missing_run_gets_no_lock_file(tmp_path):
    """A store that is its run's own directory is held by the harvest inside the pipeline's hold;
    `label` on a mistyped path reports the path, without leaving a lock file there."""
    from jobs.rundir import local_copy

    run = tmp_path / "run"
    with hold_run(run, command="outer"):
        with hold_run(run, command="inner"):
            assert holder(run)["command"] == "outer"
        assert holder(run)["command"] == "outer"  # the inner exit released nothing
    assert holder(run) is None
    with local_copy(tmp_path / "typo") as d:
        assert not d.exists()


@pytest.mark.timeout(60)
def test_a_comparison_of_a_held_pipeline_run_is_held_with_it(tmp_path):
    """`crossdiff label --run RUN/compare/A-vs-B` during the pipeline's label stage: refused, as the
    run itself would be."""
    from typer.testing import CliRunner

    from jobs.cli import app

    run = tmp_path / "run"
    (run / "compare" / "pt-vs-it").mkdir(parents=True)
    p = _holder_process(run)
    try:
        r = CliRunner().invoke(
            app, ["label", "--run", str(run / "compare" / "pt-vs-it"), "--endpoint", "http://127.0.0.1:9"]
        )
        assert r.exit_code == 3 and "in use by crossdiff pipeline (test holder)" in r.output, r.output
        assert not (run / "compare" / "pt-vs-it" / LOCK_FILE).exists()
    finally:
        p.kill()
        p.wait()


def test_a_holder_whose_clock_runs_behind_is_not_taken_for_stale(remote, monkeypatch):
    """Its heartbeat values look minutes old, but it rewrites the lease every heartbeat: the
    store's own modification time says so, and the lease is not taken over."""
    monkeypatch.setattr(runlock, "SETTLE_S", 0.0)
    fs, root, uri = remote
    _write_lease(fs, root, host="node-7", pid=4242, heartbeat=time.time() - 600)  # just written
    assert runlock.object_age(fs.info(f"{root}/{LEASE_FILE}")) < 60
    with pytest.raises(RunBusy, match="pid 4242 on node-7"):
        Lease(uri, "x").acquire()
    monkeypatch.setattr(runlock, "object_age", lambda info: 600.0)  # and not rewritten since: stale
    lease = Lease(uri, "x")
    lease.acquire()
    lease.release()
    monkeypatch.undo()
    assert runlock.object_age({"LastModified": "2026-01-01T00:00:00Z"}) > 0  # S3's, as GCS's "updated"
    assert runlock.object_age({"size": 1}) is None


def test_a_rerun_after_a_given_back_lease_takes_it_quietly(remote, monkeypatch):
    from structlog.testing import capture_logs

    from diffing.logs import get_logger

    monkeypatch.setattr(runlock, "SETTLE_S", 0.0)
    fs, root, uri = remote
    first = Lease(uri, "crossdiff pipeline")
    first.acquire()
    first.release()
    get_logger()  # configured before the capture, which a first configure() would undo
    with capture_logs() as logs:
        again = Lease(uri, "crossdiff pipeline")
        again.acquire()
        again.release()
    assert not [e for e in logs if e["event"] == "pipeline.lease_taken_over"]


def test_a_command_that_fails_before_writing_leaves_no_directory_of_only_its_lock(tmp_path):
    from jobs.runlock import hold_run

    fresh = tmp_path / "fresh" / "run"
    with pytest.raises(RuntimeError), hold_run(fresh):
        raise RuntimeError("a bad store")
    assert not fresh.exists() and (tmp_path / "fresh").exists()  # only the run's own directory goes
    with hold_run(fresh):
        (fresh / "metrics.json").write_text("{}")
    assert (fresh / "metrics.json").exists()  # something written: kept, lock and all
    existing = tmp_path / "existing"
    existing.mkdir()
    with hold_run(existing):
        pass
    assert existing.exists()  # not made by this command: left as it was (with its lock)


def test_a_stage_command_with_a_missing_store_leaves_no_out_directory(tmp_path):
    from typer.testing import CliRunner

    from jobs.cli import app

    r = CliRunner().invoke(app, ["fit", "--store", str(tmp_path / "nostore"), "--out", str(tmp_path / "f3")])
    assert r.exit_code == 2 and not (tmp_path / "f3").exists()


def test_a_lock_whose_holder_removed_its_directory_is_taken_on_the_file_that_is_there(tmp_path, monkeypatch):
    """A failed command removes the directory it made (and its lock) while another waits on the
    lock: the waiter must end up holding the lock file at the run's path, or a third process could
    take a new one beside it. Forced here: the waiter's flock succeeds just after the removal."""
    import fcntl
    import os

    from jobs import runlock

    run = tmp_path / "fresh"
    run.mkdir()
    (run / LOCK_FILE).write_text("{}")
    real = fcntl.flock
    calls = []

    def flock_after_removal(f, op):
        if not calls:  # the holder cleans up between the waiter's open and its flock
            (run / LOCK_FILE).unlink()
            run.rmdir()
        calls.append(op)
        return real(f, op)

    monkeypatch.setattr(fcntl, "flock", flock_after_removal)
    f = runlock._acquire(run, run / LOCK_FILE, str(run))
    try:
        assert len(calls) == 2  # the first lock was on the removed file: taken again on the new one
        assert os.fstat(f.fileno()).st_ino == os.stat(run / LOCK_FILE).st_ino
    finally:
        f.close()
