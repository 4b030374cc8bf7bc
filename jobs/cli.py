"""The `crossdiff` command line. Each command parses a config and calls one library function.

Expected problems (bad config, missing store, wrong shapes) print one clear message and exit 2;
a service or connection that failed where a rerun may succeed exits 3; tracebacks are for bugs.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated

import typer

from jobs import jsonsafe
from jobs.cli_common import (  # noqa: F401
    ConfigOpt,
    OverwriteOpt,
    SetOpt,
    _fail,
    _run,
    _user_errors,
    endpoint_url,
    home_expanded,
    refuse_pipeline_stage,
)

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    help="crossdiff: what did fine-tuning change inside this model?",
)


@app.command()
def fit(
    store: Annotated[
        str,
        typer.Option(
            "--store", callback=home_expanded, help="Activation store URI (local path or s3://...)."
        ),
    ],
    out: Annotated[
        str,
        typer.Option("--out", callback=home_expanded, help="Run directory (local; s3:// with --workers)."),
    ],
    config: ConfigOpt = None,
    set_: SetOpt = None,
    workers: Annotated[
        int | None, typer.Option("--workers", help="Ray Train DDP workers (0: in-process).")
    ] = None,
    use_gpu: Annotated[bool, typer.Option("--use-gpu", help="One GPU per worker (NCCL).")] = False,
    address: Annotated[
        str | None, typer.Option("--address", help="Ray cluster address (default: RAY_ADDRESS or local).")
    ] = None,
    overwrite: OverwriteOpt = False,
) -> None:
    """Fit a crosscoder on an activation store (in-process, or Ray Train DDP with --workers)."""
    from diffing.config import FitConfig, load_config
    from jobs.fit import in_process_or_ray

    def go():
        if overwrite:  # without it, the fit itself refuses other settings (the same ones: skipped)
            refuse_pipeline_stage(out, "fit")
        sets = list(set_ or [])
        if workers is not None:
            sets.append(f"distributed.workers={workers}")
        if use_gpu:
            sets.append("distributed.use_gpu=true")
        cfg = load_config(FitConfig, config, sets)
        from jobs.rundir import default_work_dir, is_remote
        from jobs.runlock import hold_run

        # held: a second fit (or a pipeline) on the same out would resume from, and write, the
        # same checkpoints; a bucket out is flocked on this machine's copy's folder and leased
        where = (default_work_dir(out), out) if is_remote(out) else (Path(out), None)
        with hold_run(*where):
            metrics = in_process_or_ray(store, cfg, out, overwrite=overwrite, address=address)
        typer.echo(jsonsafe.dumps(metrics, indent=2))

    _run(go)


@app.command()
def harvest(
    config: Annotated[
        Path,
        typer.Option(
            "--config",
            callback=home_expanded,
            help="Harvest config (YAML/JSON): models, layer, corpus, store.",
        ),
    ],
    set_: SetOpt = None,
    overwrite: OverwriteOpt = False,
    address: Annotated[
        str | None,
        typer.Option("--address", help="Ray cluster address (default: RAY_ADDRESS or a local Ray)."),
    ] = None,
) -> None:
    """Harvest paired activations with Ray Data into an activation store (resumable)."""
    from diffing.config import load_config
    from diffing.harvest import HarvestConfig
    from diffing.models import HarvestInputError
    from jobs.harvest import run_harvest

    def go():
        cfg = load_config(HarvestConfig, config, set_ or [])
        try:
            m = run_harvest(cfg, overwrite=overwrite, address=address)
        except HarvestInputError as e:
            raise ValueError(str(e)) from None
        typer.echo(
            jsonsafe.dumps(
                {"store": cfg.store, "rows": m.n_rows, "shards": len(m.shards), "models": m.model_names}
            )
        )

    _run(go)


@app.command()
def analyze(
    run: Annotated[
        str,
        typer.Option(
            "--run", callback=home_expanded, help="A finished fit run directory (local, s3://, gs://)."
        ),
    ],
    store: Annotated[
        str, typer.Option("--store", callback=home_expanded, help="Activation store URI to analyse over.")
    ],
    config: ConfigOpt = None,
    set_: SetOpt = None,
    pair: Annotated[
        str | None, typer.Option("--pair", help="Models compared by Δnorm, as 'A,B' (default: first two).")
    ] = None,
    evidence: Annotated[
        bool | None, typer.Option("--evidence/--no-evidence", help="Collect contexts per selected latent.")
    ] = None,
    splice: Annotated[
        bool, typer.Option("--splice", help="Also run the splice evaluation (needs the harvest models).")
    ] = False,
    workers: Annotated[
        int | None,
        typer.Option("--workers", help="Ray Data concurrency for the evidence pass (0: in-process)."),
    ] = None,
    address: Annotated[
        str | None, typer.Option("--address", help="Ray cluster address (default: RAY_ADDRESS or local).")
    ] = None,
    overwrite: OverwriteOpt = False,
) -> None:
    """Δnorm, Latent Scaling, classes, model-specific groups -> RUN/latents.parquet; contexts per
    selected latent -> RUN/examples/; optional splice evaluation -> RUN/splice.json."""
    from diffing.config import AnalysisConfig, load_config
    from jobs.analyze import run_analyze
    from jobs.rundir import local_copy

    def go():
        if overwrite:  # without it, analyze refuses other settings; the same ones add what is missing
            refuse_pipeline_stage(run, "analyze")
        sets = list(set_ or [])
        if evidence is not None:
            sets.append(f"evidence={str(evidence).lower()}")
        if splice:
            sets.append("splice=true")
        if workers is not None:
            sets.append(f"evidence_workers={workers}")
        cfg = load_config(AnalysisConfig, config, sets)
        names = tuple(n.strip() for n in pair.split(",")) if pair else None
        if names is not None and len(names) != 2:
            raise ValueError(f"--pair expects two model names separated by a comma, got {pair!r}")
        with local_copy(run) as local:
            summary = run_analyze(local, store, cfg, pair=names, overwrite=overwrite, address=address)
        summary["examples"] = len(summary.get("examples", []))
        typer.echo(jsonsafe.dumps(summary, indent=2))

    _run(go)


@app.command("planted-store")
def planted_store(
    out: Annotated[str, typer.Option("--out", callback=home_expanded, help="Store URI to write.")],
    tokens: Annotated[int, typer.Option(help="Tokens to sample.")] = 200_000,
    d_model: Annotated[int, typer.Option(help="Activation width.")] = 64,
    seed: Annotated[int, typer.Option(help="Seed.")] = 0,
    overwrite: OverwriteOpt = False,
) -> None:
    """Write a synthetic store with a planted dictionary (shared, A-only and B-only features)."""
    import numpy as np

    from diffing.store import write_arrays
    from diffing.synthetic import make_planted

    def go():
        planted = make_planted(d_model, seed=seed)
        st = write_arrays(
            out,
            planted.sample(tokens, seed=seed + 1),
            model_names=list(planted.model_names),
            doc_ids=np.arange(tokens),  # i.i.d. tokens: each its own document
            overwrite=overwrite,
        )
        typer.echo(jsonsafe.dumps({"store": out, "rows": st.n_rows, "features": planted.n_features}))

    _run(go)


@app.command()
def demo(
    out: Annotated[
        Path | None,
        typer.Option(
            "--out",
            callback=home_expanded,
            help="Where the demo run goes (runs/demo; runs/planted-dictionary for that check).",
        ),
    ] = None,
    planted_dictionary: Annotated[
        bool,
        typer.Option(
            "--planted-dictionary",
            help="Instead: the seconds-long synthetic check (planted dictionary -> fit -> analyze).",
        ),
    ] = False,
    set_: SetOpt = None,
) -> None:
    """The mission end to end: SmolLM2-135M-Instruct vs its planted fine-tune (builds cached models,
    harvest, fit, analyze, label with the vLLM judge on Ray Serve, report with planted-truth checks)."""
    if planted_dictionary:
        from jobs.demo import run_planted_demo

        if set_:
            _fail("--set configures the embedded demo's pipeline; --planted-dictionary takes no settings")

        _run(lambda: run_planted_demo(out or Path("runs/planted-dictionary")))
        return
    from jobs.demo import run_demo

    _run(lambda: run_demo(out or Path("runs/demo"), overrides=set_ or []))


@app.command("config-docs")
def config_docs() -> None:
    """Print the configuration reference (Markdown) generated from the typed configs."""
    from jobs.pipeline_config import reference

    typer.echo(reference())


@app.command()
def pipeline(
    config: ConfigOpt = None,
    preset: Annotated[
        str | None,
        typer.Option("--preset", help="A built-in config: 'tiny' (tests) or 'embedded' (the demo)."),
    ] = None,
    out: Annotated[
        str | None,
        typer.Option("--out", callback=home_expanded, help="Run directory (overrides the config's `out`)."),
    ] = None,
    set_: SetOpt = None,
    address: Annotated[
        str | None, typer.Option("--address", help="Ray cluster address (default: RAY_ADDRESS or local).")
    ] = None,
    endpoint: Annotated[
        str | None,
        typer.Option(
            "--endpoint", help="Labelling endpoint URL (default: start a local one).", callback=endpoint_url
        ),
    ] = None,
    overwrite: OverwriteOpt = False,
    redo_changed: Annotated[
        bool,
        typer.Option(
            "--redo-changed",
            help="Redo the first stage whose config changed and the stages after it (keep the rest).",
        ),
    ] = False,
    redo: Annotated[
        str | None,
        typer.Option(
            "--redo",
            metavar="STAGE",
            help="Redo STAGE and the stages after it, changed or not (e.g. `--redo report` after "
            "upgrading crossdiff); finished earlier stages are kept.",
        ),
    ] = None,
    steal_lock: Annotated[
        bool,
        typer.Option(
            "--steal-lock",
            help="Take a remote run whose lease another process still holds (one known to be gone, "
            "before its lease goes stale).",
        ),
    ] = False,
) -> None:
    """harvest -> fit -> analyze -> label -> report in one run directory; finished stages are skipped."""
    from jobs.pipeline import run_pipeline

    def go():
        res = run_pipeline(
            config=config,
            preset=preset,
            out=out,
            overrides=set_ or [],
            address=address,
            endpoint=endpoint,
            overwrite=overwrite,
            redo_changed=redo_changed,
            steal_lock=steal_lock,
            redo=redo,
        )
        typer.echo(jsonsafe.dumps(res, indent=2, default=str))

    _run(go)


# Ray jobs on a cluster: `crossdiff submit`, `crossdiff jobs`, `crossdiff cluster` (jobs/submit.py).
from jobs.cli_label import register as _register_label_commands  # noqa: E402
from jobs.cli_report import register as _register_report_commands  # noqa: E402
from jobs.submit import register as _register_cluster_commands  # noqa: E402

_register_report_commands(app)
_register_cluster_commands(app)
_register_label_commands(app)


def main() -> None:
    try:
        app()
    except KeyboardInterrupt:
        typer.secho("interrupted; rerun the same command to resume", err=True)
        sys.exit(130)


if __name__ == "__main__":
    main()
