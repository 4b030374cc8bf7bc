"""`crossdiff report`, `crossdiff anchored` and `crossdiff status`: the commands that read runs."""

from __future__ import annotations

from typing import Annotated

import typer

from jobs import jsonsafe
from jobs.cli_common import ConfigOpt, SetOpt, _run, home_expanded, pipeline_owner, refuse_pipeline_stage


def report(
    run: Annotated[
        str,
        typer.Option(
            "--run",
            callback=home_expanded,
            help="Run directory (after analyze; labels optional; local, s3://, gs://).",
        ),
    ],
    config: ConfigOpt = None,
    set_: SetOpt = None,
) -> None:
    """Write RUN/report.html (self-contained), RUN/report.json and RUN/report.md."""
    from diffing.config import load_config
    from jobs.report import write_report
    from jobs.report.config import ReportConfig
    from jobs.rundir import WEIGHTS, local_copy, reader_dir

    def go():
        cfg = load_config(ReportConfig, config, set_ or [])
        if owner := pipeline_owner(run, "report"):  # its marker vouches for the report it made
            pipe = owner[1]
            if pipe.get("planted") or pipe.get("anchored"):
                refuse_pipeline_stage(
                    run, "report", "its report lacks the planted-truth and anchored sections"
                )
            if pipe.get("report") is not None and pipe["report"] != cfg.model_dump(mode="json"):
                refuse_pipeline_stage(run, "report", "other report settings than the pipeline's")
        # a private copy, not held: a report may be made of a run a pipeline is still labelling
        with local_copy(run, reader_dir(run), skip=WEIGHTS, hold=False) as local:
            typer.echo(jsonsafe.dumps(write_report(local, opts=cfg), indent=2))

    _run(go)


def anchored(
    s_run: Annotated[
        str,
        typer.Option(
            "--s",
            callback=home_expanded,
            help="Labelled pairwise run (A, S) whose S-specific latents are compared, e.g. pt vs SimPO.",
        ),
    ],
    i_run: Annotated[
        str,
        typer.Option(
            "--i",
            callback=home_expanded,
            help="Labelled pairwise run (A, I) of the same base A whose I-specific latents anchor it.",
        ),
    ],
    out: Annotated[
        str,
        typer.Option(
            "--out",
            callback=home_expanded,
            help="Directory for anchored.{json,md,html} (local, s3://, gs://).",
        ),
    ],
    config: ConfigOpt = None,
    set_: SetOpt = None,
) -> None:
    """Anchored category shift between two runs (two pairwise crosscoders of one base): S-specific vs
    I-specific latents, with the report's intervals (--config/--set: report fields, e.g. ci_method=score)."""
    from diffing.config import load_config
    from jobs.anchored import write_anchored
    from jobs.report.config import ReportConfig

    _run(
        lambda: typer.echo(
            jsonsafe.dumps(
                write_anchored(s_run, i_run, out, load_config(ReportConfig, config, set_ or [])), indent=2
            )
        )
    )


def status(
    run: Annotated[
        str | None,
        typer.Argument(
            callback=home_expanded, help="A pipeline's --out, a store or a fit run (local, s3://, gs://)."
        ),
    ] = None,
    run_opt: Annotated[
        str | None,
        typer.Option("--run", callback=home_expanded, help="The same, as the other commands name it."),
    ] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print the status as JSON.")] = False,
) -> None:
    """Where a run stands: each stage done, running, to redo or pending, and the running stage's
    progress (shards, fit step and ETA, labels) from the files it writes."""
    from jobs.status import format_status, run_status

    if (run is None) == (run_opt is None):
        raise typer.BadParameter("name the run once: `crossdiff status RUN` or `crossdiff status --run RUN`")
    where = run if run is not None else run_opt

    def go():
        st = run_status(where)
        typer.echo(jsonsafe.dumps(st, indent=2) if as_json else format_status(st))

    _run(go)


def register(app: typer.Typer) -> None:
    """Add the commands to the `crossdiff` app."""
    app.command("report")(report)
    app.command("anchored")(anchored)
    app.command("status")(status)
