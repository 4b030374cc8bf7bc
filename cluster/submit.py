"""Submitting crossdiff stages to a Ray cluster through the job API (`JobSubmissionClient`): submit,
follow, stop, list. What a submission sends (its deterministic id, entrypoint and runtime_env) is
built and checked locally in `cluster.submission`, re-exported here.

Resubmitting while a run's job is PENDING/RUNNING is refused (two jobs would write one run); after it
FAILED or was STOPPED the old record is replaced and the stage resumes (stages skip finished work);
after SUCCEEDED it is refused unless `replace=True`.
"""

from __future__ import annotations

import asyncio
import json
import os
import sys
import time
from collections.abc import Callable
from typing import Any

from cluster.submission import (  # noqa: F401  (the public API of `cluster.submit`)
    CONFIG_CLASSES,
    CONFIG_ENV,
    STAGES,
    Submission,
    SubmitError,
    build_submission,
    entrypoint_argv,
    parse_cli,
    relative_outputs,
    run_key,
    submission_id,
)

TERMINAL = ("SUCCEEDED", "FAILED", "STOPPED")
ACTIVE = ("PENDING", "RUNNING")


def client(address: str | None = None):
    """A JobSubmissionClient for `address` (http://HOST:8265), RAY_API_SERVER_ADDRESS / RAY_ADDRESS, or
    the local cluster that `crossdiff cluster up` started."""
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    from ray.job_submission import JobSubmissionClient

    address = resolve_address(address)
    # Ray's client prefers these variables to its argument; the address chosen above already is
    # the variable's value where no address was given, so it goes in alone
    saved = {v: os.environ.pop(v) for v in ADDRESS_VARS if v in os.environ}
    try:
        from cluster.connect import check_reachable

        check_reachable(address)
        return JobSubmissionClient(address)
    except (ConnectionError, RuntimeError, ValueError) as e:
        raise SubmitError(
            f"cannot reach the Ray job API at {address}: {e}", retryable=isinstance(e, ConnectionError)
        ) from None
    finally:
        os.environ.update(saved)


ADDRESS_VARS = ("RAY_API_SERVER_ADDRESS", "RAY_ADDRESS")


def resolve_address(address: str | None) -> str:
    """`address` if given, else RAY_API_SERVER_ADDRESS, else RAY_ADDRESS (any form Ray takes:
    http://HOST:8265, ray://HOST:10001, HOST:6379), else the local `crossdiff cluster up` cluster."""
    if address:
        return address
    for var in ADDRESS_VARS:
        if os.environ.get(var, "").strip():
            return os.environ[var].strip()
    from cluster.local import load_state

    state = load_state()
    if state is not None:
        return state["dashboard"]
    raise SubmitError(
        "no cluster address: pass --address http://HOST:8265, set RAY_ADDRESS, or start a local "
        "cluster with `crossdiff cluster up`"
    )


def submit(sub: Submission, address: str | None = None, *, replace: bool = False, jc=None) -> str:
    """Submit; refuse a duplicate of a running job. Returns the submission id."""
    jc = jc or client(address)
    try:
        info = jc.get_job_info(sub.submission_id)
    except RuntimeError:
        info = None  # no such job
    if info is not None:
        status = str(getattr(info.status, "value", info.status))
        if status in ACTIVE:
            raise SubmitError(
                f"job {sub.submission_id} ({sub.stage} of {sub.metadata['crossdiff_run']}) is already "
                f"{status}; follow it with `crossdiff jobs logs {sub.submission_id} --follow` or stop "
                f"it with `crossdiff jobs stop {sub.submission_id}` before resubmitting"
            )
        if status == "SUCCEEDED" and not replace:
            raise SubmitError(
                f"job {sub.submission_id} already SUCCEEDED; pass --replace to run it again "
                "(add --overwrite to the stage's arguments to redo finished work)"
            )
        jc.delete_job(sub.submission_id)  # FAILED / STOPPED (or --replace): resubmit, the stage resumes
    return jc.submit_job(
        entrypoint=sub.entrypoint,
        submission_id=sub.submission_id,
        runtime_env=sub.runtime_env,
        metadata=sub.metadata,
        entrypoint_num_cpus=sub.entrypoint_num_cpus,
        entrypoint_num_gpus=sub.entrypoint_num_gpus,
    )


def status(job_id: str, address: str | None = None, jc=None) -> dict[str, Any]:
    jc = jc or client(address)
    try:
        info = jc.get_job_info(job_id)
    except RuntimeError as e:
        raise SubmitError(f"no job {job_id!r} on this cluster ({e})") from None
    return {
        "submission_id": info.submission_id,
        "status": str(getattr(info.status, "value", info.status)),
        "message": info.message,
        "error_type": info.error_type,
        "entrypoint": info.entrypoint,
        "metadata": info.metadata,
        "start_time": info.start_time,
        "end_time": info.end_time,
    }


def wait(
    job_id: str,
    address: str | None = None,
    *,
    timeout_s: float | None = 3600,
    follow: Callable[[str], None] | None = None,
    jc=None,
) -> dict[str, Any]:
    """Wait for a terminal status (at most `timeout_s`; None: no limit), streaming logs to `follow`
    when given. Returns `status(...)`."""
    jc = jc or client(address)
    deadline = None if timeout_s is None else time.monotonic() + timeout_s
    if follow is not None:

        async def tail():
            async for chunk in jc.tail_job_logs(job_id):
                follow(chunk)

        try:
            asyncio.run(asyncio.wait_for(tail(), timeout=timeout_s))
        except Exception:  # a timeout or a dropped stream: the status poll below decides
            pass
    while True:
        st = status(job_id, jc=jc)
        if st["status"] in TERMINAL:
            return st
        if deadline is not None and time.monotonic() > deadline:
            raise SubmitError(f"job {job_id} still {st['status']} after {timeout_s:.0f} s", retryable=True)
        time.sleep(1.0)


def failure_report(job_id: str, address: str | None = None, *, tail_lines: int = 30, jc=None) -> str:
    """The job's status message plus the last log lines (where the stage's `error: ...` lands)."""
    jc = jc or client(address)
    st = status(job_id, jc=jc)
    lines = jc.get_job_logs(job_id).rstrip().splitlines()[-tail_lines:]
    return f"job {job_id} {st['status']}: {st['message']}\n--- last log lines ---\n" + "\n".join(lines)


def list_jobs(address: str | None = None, *, all_jobs: bool = False, jc=None) -> list[dict[str, Any]]:
    jc = jc or client(address)
    rows = []
    for j in jc.list_jobs():
        meta = j.metadata or {}
        if not all_jobs and "crossdiff_stage" not in meta:
            continue
        rows.append(
            {
                "submission_id": j.submission_id,
                "status": str(getattr(j.status, "value", j.status)),
                "stage": meta.get("crossdiff_stage", ""),
                "run": meta.get("crossdiff_run", ""),
                "start_time": j.start_time,
            }
        )
    return sorted(rows, key=lambda r: r["start_time"] or 0)


def stop(job_id: str, address: str | None = None, jc=None) -> bool:
    jc = jc or client(address)
    try:
        return jc.stop_job(job_id)
    except RuntimeError as e:
        raise SubmitError(f"cannot stop {job_id!r}: {e}") from None


def logs(job_id: str, address: str | None = None, jc=None) -> str:
    jc = jc or client(address)
    try:
        return jc.get_job_logs(job_id)
    except RuntimeError as e:
        raise SubmitError(f"no logs for {job_id!r}: {e}") from None


def print_chunk(chunk: str) -> None:
    sys.stdout.write(chunk)
    sys.stdout.flush()


def as_json(obj: Any) -> str:
    return json.dumps(obj, indent=2, default=str)
