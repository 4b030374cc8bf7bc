"""`crossdiff submit`, `crossdiff jobs` and `crossdiff cluster`: stages as Ray jobs on a cluster.

crossdiff cluster up                                   # local head, prints its job API address
crossdiff submit harvest --config harvest.yaml --wait  # stage args after the options pass through
crossdiff submit fit --config fit.yaml --store s3://b/acts --out s3://b/runs/r1
crossdiff jobs list | status ID | logs ID [--follow] | stop ID
crossdiff cluster down
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer

from jobs.cli_common import _fail, home_expanded

AddressOpt = Annotated[
    str | None,
    typer.Option(
        "--address",
        help="Ray job API, http://HOST:8265 (or ray://HOST:10001, HOST:6379); overrides RAY_ADDRESS "
        "(default: RAY_API_SERVER_ADDRESS, RAY_ADDRESS, else the `crossdiff cluster up` cluster).",
    ),
]
NameOpt = Annotated[str, typer.Option("--name", help="Local cluster name (one state file per name).")]

jobs_app = typer.Typer(no_args_is_help=True, help="Inspect and control submitted jobs.")
cluster_app = typer.Typer(no_args_is_help=True, help="A local Ray cluster for job submission.")


def _guard(fn):
    """2: the submission needs a fix; 3: the cluster could not be reached (a rerun later may do)."""
    from cluster.submit import SubmitError
    from diffing.config import ConfigError
    from jobs.cli_common import EXIT_FIX, EXIT_RETRY, _retryable

    try:
        return fn()
    except typer.Exit:
        raise
    except (SubmitError, ConfigError, RuntimeError, OSError) as e:  # OSError: a connection dropped
        _fail(str(e), EXIT_RETRY if _retryable(e) else EXIT_FIX)


def _watch(wait, job_id: str) -> dict:
    """Ctrl-C while following a job stops following, not the job: say so, and how to stop it."""
    try:
        return wait()
    except KeyboardInterrupt:
        typer.secho(
            f"\nstopped following; job {job_id} goes on (`crossdiff jobs logs {job_id} --follow` to "
            f"watch again, `crossdiff jobs stop {job_id}` to stop it)",
            err=True,
        )
        raise typer.Exit(130) from None


def submit(
    ctx: typer.Context,
    stage: Annotated[str, typer.Argument(help="harvest | fit | analyze | label | report | pipeline")],
    config: Annotated[
        Path | None,
        typer.Option(
            "--config", callback=home_expanded, help="The stage's config file (read and checked here)."
        ),
    ] = None,
    address: AddressOpt = None,
    wait: Annotated[bool, typer.Option("--wait", help="Follow the logs until the job ends.")] = False,
    name: Annotated[
        str | None, typer.Option("--name", help="Run name for the submission id (default: the output).")
    ] = None,
    env: Annotated[
        list[str] | None, typer.Option("--env", help="Extra env var for the job, KEY=VALUE (no secrets).")
    ] = None,
    replace: Annotated[
        bool, typer.Option("--replace", help="Resubmit even if this run's job already SUCCEEDED.")
    ] = False,
    num_cpus: Annotated[float | None, typer.Option("--num-cpus", help="CPUs for the driver.")] = None,
    num_gpus: Annotated[float | None, typer.Option("--num-gpus", help="GPUs for the driver.")] = None,
    timeout: Annotated[float, typer.Option("--timeout", help="Seconds --wait waits.")] = 24 * 3600,
    pip: Annotated[
        list[str] | None,
        typer.Option(
            "--pip",
            help="A requirement the job's runtime env installs (repeatable), e.g. a crossdiff wheel where "
            "the cluster image lacks crossdiff.",
        ),
    ] = None,
) -> None:
    """Submit a stage as a Ray job. Options the submit command does not know (e.g. --out, --set,
    --overwrite) are passed to the stage: `crossdiff submit fit --config f.yaml --store S --out R`."""
    from cluster import submit as sm

    def go():
        pairs = {}
        for kv in env or []:
            if "=" not in kv:
                raise sm.SubmitError(f"--env expects KEY=VALUE, got {kv!r}")
            k, v = kv.split("=", 1)
            pairs[k] = v
        sub = sm.build_submission(
            stage,
            config,
            list(ctx.args),
            name=name,
            env=pairs,
            num_cpus=num_cpus,
            num_gpus=num_gpus,
            pip=pip or (),
        )
        if rel := sub.extra.get("relative_paths"):
            typer.echo(
                f"warning: relative path(s) {'; '.join(rel)}: on the cluster they resolve against the "
                "job's working directory (a temporary directory of Ray's), not this one; pass an "
                "absolute path on the cluster's shared disk or a URI (s3://, gs://) to find the run later",
                err=True,
            )
        jc = sm.client(address)
        sid = sm.submit(sub, replace=replace, jc=jc)
        typer.echo(json.dumps({"submission_id": sid, "stage": stage, "run": sub.metadata["crossdiff_run"]}))
        if wait:
            st = _watch(lambda: sm.wait(sid, timeout_s=timeout, follow=sm.print_chunk, jc=jc), sid)
            if st["status"] != "SUCCEEDED":
                _fail(sm.failure_report(sid, jc=jc), code=1)
            typer.echo(f"job {sid} SUCCEEDED")

    _guard(go)


@jobs_app.command("status")
def jobs_status(job_id: str, address: AddressOpt = None) -> None:
    """Status, message and metadata of one job."""
    from cluster import submit as sm

    _guard(lambda: typer.echo(sm.as_json(sm.status(job_id, address))))


@jobs_app.command("logs")
def jobs_logs(
    job_id: str,
    address: AddressOpt = None,
    follow: Annotated[bool, typer.Option("--follow", "-f", help="Stream until the job ends.")] = False,
    timeout: Annotated[
        float | None, typer.Option("--timeout", help="With --follow: give up after this many seconds.")
    ] = None,
) -> None:
    """The job's driver logs."""
    from cluster import submit as sm

    def go():
        if follow:
            st = _watch(lambda: sm.wait(job_id, address, timeout_s=timeout, follow=sm.print_chunk), job_id)
            if st["status"] != "SUCCEEDED":
                _fail(f"job {job_id} {st['status']}: {st['message']}", code=1)
        else:
            typer.echo(sm.logs(job_id, address), nl=False)

    _guard(go)


@jobs_app.command("stop")
def jobs_stop(job_id: str, address: AddressOpt = None) -> None:
    """Ask a running job to stop."""
    from cluster import submit as sm

    _guard(lambda: typer.echo(json.dumps({"submission_id": job_id, "stopped": sm.stop(job_id, address)})))


@jobs_app.command("list")
def jobs_list(
    address: AddressOpt = None,
    all_jobs: Annotated[bool, typer.Option("--all", help="Include jobs not submitted by crossdiff.")] = False,
) -> None:
    """Jobs on the cluster, oldest first (crossdiff's only, unless --all)."""
    from cluster import submit as sm

    _guard(lambda: typer.echo(sm.as_json(sm.list_jobs(address, all_jobs=all_jobs))))


@cluster_app.command("up")
def cluster_up(
    name: NameOpt = "local",
    num_cpus: Annotated[int, typer.Option("--num-cpus", help="Logical CPUs (>= 4 on small boxes).")] = 4,
    num_gpus: Annotated[int, typer.Option("--num-gpus", help="GPUs to advertise.")] = 0,
) -> None:
    """Start a local Ray head (`ray start --head`, free ports, dashboard on 127.0.0.1)."""
    from cluster.local import up

    def go():
        st = up(name, num_cpus=num_cpus, num_gpus=num_gpus)
        typer.echo(json.dumps({k: st[k] for k in ("name", "dashboard", "address", "temp_dir", "pid")}))
        typer.echo(f"submit with: crossdiff submit STAGE --address {st['dashboard']} --config FILE", err=True)

    _guard(go)


@cluster_app.command("down")
def cluster_down(name: NameOpt = "local") -> None:
    """Stop the local cluster `cluster up` started (only its own processes)."""
    from cluster.local import down

    _guard(lambda: typer.echo(json.dumps({"name": name, "stopped": down(name)})))


def register(app: typer.Typer) -> None:
    """Add the commands to the `crossdiff` app."""
    app.command(
        "submit",
        context_settings={"allow_extra_args": True, "ignore_unknown_options": True},
    )(submit)
    app.add_typer(jobs_app, name="jobs")
    app.add_typer(cluster_app, name="cluster")
