"""Shared pieces of the `crossdiff` commands: config options and one-line user errors."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

ConfigOpt = Annotated[Path | None, typer.Option("--config", help="YAML/JSON config file.")]
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


def _fail(msg: str) -> None:
    typer.secho(f"error: {msg}", fg=typer.colors.RED, err=True)
    raise typer.Exit(2)


def _user_errors():
    from diffing.config import ConfigError
    from diffing.store import StoreError
    from jobs.label import LabelJobError

    # OSError: a full or read-only disk, an unreachable host (ConnectionError), a missing file;
    # TimeoutError (an OSError) too: a service that did not come up
    errors: tuple = (ConfigError, StoreError, LabelJobError, ValueError, OSError)
    try:  # s3:// without credentials, or an endpoint that does not answer
        from botocore.exceptions import BotoCoreError

        errors += (BotoCoreError,)
    except ImportError:
        pass
    return errors


def _run(fn):
    import errno
    import os

    try:
        return fn()
    except _user_errors() as e:  # noqa: B030 - tuple built at call time
        if os.environ.get("CROSSDIFF_DEBUG"):
            raise
        hint = ""
        if type(e).__module__.startswith("botocore"):
            hint = (
                "\n(s3:// needs credentials: AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY, or AWS_PROFILE; "
                "AWS_ENDPOINT_URL for MinIO or another S3-compatible store)"
            )
        if isinstance(e, OSError) and e.errno in (errno.EROFS, errno.ENOSPC, errno.EACCES, errno.EDQUOT):
            hint = (
                "\n(models and runs need a writable disk with space; CROSSDIFF_CACHE moves the model cache, "
                "TMPDIR the temporary files)"
            )
        _fail(f"{e}{hint}\n(set CROSSDIFF_DEBUG=1 for a traceback)")
    except ImportError as e:  # an optional package a URL needs (fsspec: "Please install gcsfs ...")
        if "install" not in str(e).lower() or os.environ.get("CROSSDIFF_DEBUG"):
            raise
        fix = (
            "`pip install gcsfs` for gs://"
            if "gcsfs" in str(e)
            else "`make setup` installs what crossdiff needs"
        )
        _fail(f"{e} (into this environment and every Ray node's: {fix})")
