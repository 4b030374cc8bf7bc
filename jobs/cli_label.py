"""`crossdiff serve` and `crossdiff label`: the labelling service and the label stage's command."""

from __future__ import annotations

from typing import Annotated

import typer

from jobs import jsonsafe
from jobs.cli_common import (
    ConfigOpt,
    OverwriteOpt,
    SetOpt,
    _run,
    endpoint_url,
    home_expanded,
    refuse_pipeline_stage,
)


def serve_cmd(
    config: ConfigOpt = None,
    set_: SetOpt = None,
    host: Annotated[
        str, typer.Option("--host", help="Bind address (non-loopback needs a token).")
    ] = "127.0.0.1",
    port: Annotated[int, typer.Option("--port", min=1, max=65535, help="HTTP port.")] = 8000,
    judge_model: Annotated[
        str | None,
        typer.Option(
            "--judge-model", help="Judge model dir or id (default: $CROSSDIFF_JUDGE_MODEL or SmolLM2)."
        ),
    ] = None,
) -> None:
    """Start the labelling service (Ray Serve + vLLM judge) locally; Ctrl-C stops it."""
    import time

    from diffing.config import load_config
    from serve.local import LocalService
    from serve.settings import DEFAULT_JUDGE_ID, ServiceSettings, name_from_source

    def go():
        sets = list(set_ or [])
        if judge_model:
            sets.append(f"judge.model_source={judge_model}")
        settings = load_config(ServiceSettings, config, sets)
        name = name_from_source(judge_model)
        named = any(x.split("=", 1)[0].strip() == "judge.model_id" for x in sets)
        if name and not named and settings.judge.model_id == DEFAULT_JUDGE_ID:
            # a config that names the embedded judge (serve/config/cpu.yaml) would label another
            # model's answers with its name; a config's own name (model_id: judge) stays
            settings = settings.model_copy(
                update={"judge": settings.judge.model_copy(update={"model_id": name})}
            )
        svc = LocalService(settings, host=host, port=port, generate_token=False).start()
        typer.echo(jsonsafe.dumps({"url": svc.url, "docs": f"{svc.url}/docs", "auth": bool(svc.token)}))
        try:
            while True:
                time.sleep(3600)
        finally:
            svc.stop()

    _run(go)


def label(
    run: Annotated[
        str,
        typer.Option(
            "--run",
            callback=home_expanded,
            help="Run directory with examples/ (after analyze; local, s3://, gs://).",
        ),
    ],
    endpoint: Annotated[
        str | None,
        typer.Option(
            "--endpoint",
            help="Labelling service URL (default: start a local one for this run).",
            callback=endpoint_url,
        ),
    ] = None,
    config: ConfigOpt = None,
    set_: SetOpt = None,
    overwrite: OverwriteOpt = False,
) -> None:
    """Label every latent with evidence in RUN through the judge -> RUN/labels.jsonl (resumable)."""
    from diffing.config import load_config
    from jobs.label import LabelConfig, label_run
    from jobs.rundir import WEIGHTS, local_copy

    def go():
        if overwrite:  # without it, label refuses other settings and resumes under the same ones
            refuse_pipeline_stage(run, "label")
        cfg = load_config(LabelConfig, config, set_ or [])
        with local_copy(run, skip=WEIGHTS) as local:
            res = label_run(local, cfg, endpoint=endpoint, overwrite=overwrite)
        typer.echo(jsonsafe.dumps(res, indent=2))

    _run(go)


def register(app: typer.Typer) -> None:
    """Add the commands to the `crossdiff` app."""
    app.command("serve")(serve_cmd)
    app.command("label")(label)
