"""Shared pieces of the `crossdiff` commands: config options and one-line user errors."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer


def home_expanded(value):
    """A path option's `~`, expanded as the shell does (it does not after `--out=`)."""
    from diffing.config import expand_home

    return Path(expand_home(str(value))) if isinstance(value, Path) else expand_home(value)


ConfigOpt = Annotated[
    Path | None, typer.Option("--config", callback=home_expanded, help="YAML/JSON config file.")
]
SetOpt = Annotated[
    list[str] | None,
    typer.Option(
        "--set",
        help="Override a config field by its dotted path in this command's config (repeatable), e.g. "
        "train.lr=1e-3 for fit, fit.train.lr=1e-3 for pipeline (docs/configuration.md).",
    ),
]
OverwriteOpt = Annotated[
    bool, typer.Option("--overwrite", help="Redo the stage even if its output is complete.")
]


# Exit codes: 2 = the input or setup needs a fix (config, store, paths, permissions); 3 = a service
# or connection failed and retrying later may succeed (an endpoint, the cluster, object storage);
# 130 = interrupted. Tracebacks (exit 1) are bugs.
EXIT_FIX, EXIT_RETRY = 2, 3


def _fail(msg: str, code: int = EXIT_FIX) -> None:
    typer.secho(f"error: {msg}", fg=typer.colors.RED, err=True)
    raise typer.Exit(code)


def _retryable(err: BaseException) -> bool:
    """A failure of something outside the input that a rerun later may get past: a connection
    refused, reset or timed out (also inside a botocore / aiohttp error), object storage busy
    (s3fs turns S3's SlowDown and 5xx into EBUSY / EREMOTEIO), a service that kept failing. An
    error that says (`retryable`) is believed: a local judge that never became healthy says no."""
    import errno

    for e in _causes(err):  # also what it was raised `from` (s3fs: the botocore error)
        if hasattr(e, "retryable"):
            return bool(e.retryable)
        if isinstance(e, BrokenPipeError):  # our own output closed (`| head`): nothing to retry
            return False
        if isinstance(e, (ConnectionError, TimeoutError)):
            return True
        if isinstance(e, OSError) and e.errno in (
            errno.EBUSY,
            errno.EREMOTEIO,
            errno.EAGAIN,
            errno.ETIMEDOUT,
        ):
            return True
        # botocore: EndpointConnectionError, ConnectTimeoutError, ReadTimeoutError, ConnectionClosedError
        if _connection_error_of(e, "botocore.exceptions", ("ConnectionError", "HTTPClientError")):
            return True
        if _connection_error_of(e, "aiohttp", ("ClientConnectionError", "ServerTimeoutError")):
            return True  # gcsfs
    return False


def _connection_error_of(e: BaseException, module: str, names: tuple[str, ...]) -> bool:
    import importlib

    try:
        mod = importlib.import_module(module)
    except ImportError:
        return False
    return isinstance(e, tuple(getattr(mod, n) for n in names if hasattr(mod, n)))


def _user_errors():
    from diffing.config import ConfigError
    from diffing.store import StoreError
    from jobs.label import LabelJobError
    from jobs.runlock import RunBusy

    # OSError: a full or read-only disk, an unreachable host (ConnectionError), a missing file;
    # TimeoutError (an OSError) too: a service that did not come up
    errors: tuple = (ConfigError, StoreError, LabelJobError, RunBusy, ValueError, OSError)
    try:  # s3:// without credentials, or an endpoint that does not answer
        from botocore.exceptions import BotoCoreError

        errors += (BotoCoreError,)
    except ImportError:
        pass
    return errors


def _causes(e: BaseException):
    """`e`, then what it explicitly wraps: Ray's task errors (`.cause`), Ray Train's worker
    failures (the lowest rank's), Ray Data's UserCodeException and others raised `from` an error
    (`__cause__`). Not `__context__`: an error
    handled on the way to a bug is not the bug."""
    seen: set[int] = set()
    while e is not None and id(e) not in seen and len(seen) < 20:
        seen.add(id(e))
        cause = getattr(e, "cause", None)
        if isinstance(cause, BaseException):  # a Ray task error is also an instance of its cause's
            e = cause  # class (with the remote traceback as its message): report the cause itself
            continue
        yield e
        failures = getattr(e, "worker_failures", None)  # Ray Train's WorkerGroupError: rank -> error
        if isinstance(failures, dict) and failures:
            e = failures[min(failures)]
            continue
        e = e.__cause__


def _out_of_memory(e: BaseException) -> str | None:
    """The fix for an out-of-memory error, or None: torch's (GPU) and Ray's (the node's RAM)."""
    module = type(e).__module__ or ""
    if (module.startswith("torch") and type(e).__name__ == "OutOfMemoryError") or "CUDA out of memory" in str(
        e
    ):
        return (
            "out of GPU memory: lower harvest.batch_prompts, fit.train.batch_size or analyze.batch_size, "
            "or use a GPU with more memory"
        )
    if module.startswith("ray") and type(e).__name__ == "OutOfMemoryError":
        return (
            "a node ran out of RAM: give its pods more memory, lower harvest.ray.num_actors or "
            "analyze.evidence_workers, or raise analyze_task.memory_gb"
        )
    return None


def _run(fn):
    """Run a command: an expected condition is one line naming the fix and exit code 2 (3 where a
    retry may succeed), also when it was raised in a Ray worker and arrives wrapped; Ctrl-C says
    how to resume (exit 130)."""
    import os

    try:
        return fn()
    except KeyboardInterrupt:
        typer.secho("interrupted; rerun the same command (without --overwrite) to resume", err=True)
        raise typer.Exit(130) from None
    except Exception as e:
        if os.environ.get("CROSSDIFF_DEBUG"):
            raise
        for cause in _causes(e):
            if fix := _out_of_memory(cause):
                first = (str(cause).strip().splitlines() or [type(cause).__name__])[0][:300]
                _fail(f"{first}\n({fix}; set CROSSDIFF_DEBUG=1 for a traceback)")
            if isinstance(cause, _user_errors()):
                _report(cause)
            if isinstance(cause, ImportError) and "install" in str(cause).lower():
                _missing_package(cause)
        raise


def _report(e: BaseException) -> None:
    import errno

    hint = ""
    if type(e).__module__.startswith("botocore") and _retryable(e):  # the endpoint did not answer
        hint = (
            "\n(the S3 endpoint did not answer: check AWS_ENDPOINT_URL (MinIO or another S3-compatible "
            "store) and the network; rerun once it is reachable)"
        )
    elif type(e).__module__.startswith("botocore"):
        hint = (
            "\n(s3:// needs credentials: AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY, or AWS_PROFILE; "
            "AWS_ENDPOINT_URL for MinIO or another S3-compatible store)"
        )
    if isinstance(e, OSError) and e.errno in (errno.EEXIST, errno.ENOTDIR) and (file := _file_in_the_way(e)):
        hint = (
            f"\n({file} is a file where a directory is needed: --out, --run and store paths name "
            "directories; give another path, or move the file)"
        )
    if isinstance(e, OSError) and e.errno in (
        errno.EROFS,
        errno.ENOSPC,
        errno.EACCES,
        errno.EDQUOT,
        errno.EPERM,
    ):
        hint = (
            "\n(models and runs need a writable disk with space; CROSSDIFF_CACHE moves the model cache, "
            "TMPDIR the temporary files)"
        )
    _fail(f"{e}{hint}\n(set CROSSDIFF_DEBUG=1 for a traceback)", EXIT_RETRY if _retryable(e) else EXIT_FIX)


def _file_in_the_way(e: OSError) -> str | None:
    """The file that stands where a directory was to be made or read (the path itself, or one of
    the directories above it)."""
    from pathlib import Path

    if not isinstance(e.filename, str) or "://" in e.filename:
        return None
    for p in (Path(e.filename), *Path(e.filename).parents):
        if p.is_file():
            return str(p)
    return None


def _missing_package(e: ImportError) -> None:
    """An optional package a URL needs (fsspec: "Please install gcsfs ...")."""
    fix = (
        "`pip install 'crossdiff[gcs]'` (gcsfs) for gs://"
        if "gcsfs" in str(e)
        else "`make setup` in a checkout, or `pip install 'crossdiff[cpu]'` (or [gpu]), installs what crossdiff needs"
    )
    _fail(f"{e} (into this environment and every Ray node's: {fix})")


def endpoint_url(value: str | None) -> str | None:
    """--endpoint: checked before any work (a URL without its scheme failed only at the label stage)."""
    from jobs.label import check_endpoint

    try:
        return check_endpoint(value)
    except ValueError as e:
        raise typer.BadParameter(str(e)) from None


def pipeline_owner(run: str, stage: str) -> tuple[str, dict] | None:
    """(root, pipeline.json) of the pipeline run that `run` (or `run`/.. for RUN/compare/<A>-vs-<B>)
    belongs to, where that pipeline's stages include `stage`; else None."""
    import fsspec

    from jobs.rundir import is_remote

    base = run.rstrip("/") if is_remote(run) else str(Path(run).resolve())
    parts = base.rsplit("/", 2)
    roots = [base] + ([parts[0]] if len(parts) == 3 and parts[1] == "compare" else [])
    for root in roots:
        fs, path = fsspec.core.url_to_fs(f"{root}/pipeline.json")
        try:
            pipe = json.loads(fs.cat_file(path))
        except (FileNotFoundError, NotADirectoryError, ValueError):
            continue
        if not isinstance(pipe, dict) or stage not in (pipe.get("stages") or [stage]):
            return None
        return root, pipe
    return None


def refuse_pipeline_stage(run: str, stage: str, why: str = "with --overwrite") -> None:
    """A stage command that would rewrite, on a pipeline's run (or one of its comparisons), what
    the pipeline's marker for that stage vouches for: the pipeline would then skip the stage as done
    while its files say otherwise (or, for analyze --overwrite, find its labels gone under a `done`
    label marker). Refused, naming the pipeline command that redoes the stage and the ones after it.
    The callers call it only where the command would rewrite (fit/analyze/label: --overwrite;
    without it their own checks refuse other settings, and the same settings resume or add)."""
    if (owner := pipeline_owner(run, stage)) is None:
        return
    root = owner[0]
    _fail(
        f"{run} belongs to the pipeline run {root}; this command ({why}) would redo its {stage} stage "
        "behind the pipeline's back (the pipeline would skip the stage as done, or find later stages' "
        f"outputs gone); redo it through the pipeline: `crossdiff pipeline --config {root}/pipeline.json "
        f"--out {root} --set {stage}.FIELD=VALUE --redo-changed` (that stage and the ones after it "
        f"rerun; with the same settings, `--redo {stage}` instead of --set and --redo-changed), or give "
        "this command another --out/--run"
    )
