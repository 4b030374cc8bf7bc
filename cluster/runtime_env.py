"""Runtime environments for jobs submitted to a Ray cluster.

`working_dir` is the project (so a job runs the submitter's code), minus what never belongs in an
upload: virtualenvs, run outputs, git history, caches, model weights. Environment variables that
configure where data lives (S3 endpoint, region, offline flags, crossdiff settings) are passed
through; credentials never are: they would be stored in the job's metadata on the cluster, visible to
anyone who can list jobs. The cluster gets credentials from its own environment (Kubernetes Secrets,
instance roles, or the shell that started `crossdiff cluster up`).
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

PROJECT_ROOT = Path(__file__).resolve().parent.parent
# The upload a job runs: the project of a source checkout. An installed crossdiff (the images'
# `pip install .`, a wheel) has none: PROJECT_ROOT is then site-packages, gigabytes of other
# packages, and the cluster's image already holds the code, so nothing is uploaded.


def checkout(root: Path = PROJECT_ROOT) -> Path | None:
    return root if (root / "pyproject.toml").is_file() else None


CHECKOUT = checkout()

# Ray also honours the project's .gitignore and a .rayignore; these are excluded on top of them.
WORKING_DIR_EXCLUDES: tuple[str, ...] = (
    ".venv",
    "venv",
    ".git",
    "runs",
    "**/__pycache__",
    "*.pyc",
    ".pytest_cache",
    ".ruff_cache",
    ".mypy_cache",
    ".cache",
    "*.egg-info",
    "build",
    "dist",
    "node_modules",
    "*.safetensors",
    "*.bin",
    "*.pt",
    "*.parquet",
    "*.gguf",
)

# Exact names passed through when set in the submitter's environment.
PASSTHROUGH_ENV: tuple[str, ...] = (
    "AWS_ENDPOINT_URL",
    "AWS_ENDPOINT_URL_S3",
    "AWS_DEFAULT_REGION",
    "AWS_REGION",
    "AWS_S3_ADDRESSING_STYLE",
    "FSSPEC_S3_ENDPOINT_URL",
    "HF_HUB_OFFLINE",
    "TRANSFORMERS_OFFLINE",
    "HF_DATASETS_OFFLINE",
    "RAY_AUTH_MODE",
)
# Prefixes passed through (minus anything that looks like a secret).
PASSTHROUGH_PREFIXES: tuple[str, ...] = ("CROSSDIFF_",)
# Settings of the submitting machine itself (local paths): the cluster has its own, so these are not
# passed through (give one explicitly with `--env NAME=VALUE` where the cluster should use it).
MACHINE_LOCAL_ENV: tuple[str, ...] = ("CROSSDIFF_CACHE", "CROSSDIFF_CLUSTER_STATE", "CROSSDIFF_JUDGE_MODEL")
# Desktop-session variables: not credentials, although their names say SESSION.
_NOT_SECRET = re.compile(
    r"^(DESKTOP_SESSION|GDMSESSION|XDG_SESSION_\w+|DBUS_SESSION_BUS_ADDRESS|RAY_AUTH_MODE)$"
)

_SECRET = re.compile(
    r"(SECRET|TOKEN|PASSWORD|PASSWD|CREDENTIAL|CRED$|PRIVATE|SESSION|API_?KEY|ACCESS_KEY|"
    r"_KEY$|_KEY_ID$|AUTH|BEARER|SIGNATURE)",
    re.IGNORECASE,
)
# Config fields that name the environment variable holding a credential (label.token_env,
# service.auth.token_env, judge.api_key_env): whatever variable they name is a secret, however named.
_SECRET_NAME_FIELDS = ("token_env", "api_key_env")


class SecretInRuntimeEnvError(ValueError):
    """Someone asked to ship a credential in a job's runtime_env."""


def is_secret_name(name: str) -> bool:
    """True for environment variable names that hold credentials (never shipped with a job)."""
    return bool(_SECRET.search(name)) and not _NOT_SECRET.match(name)


def configured_secret_names(config: Any) -> set[str]:
    """The variables a config names as holding credentials (`*token_env`, `*api_key_env` fields at
    any depth), e.g. `label.token_env: CROSSDIFF_LABELLER_BEARER`."""
    names: set[str] = set()

    def walk(x: Any) -> None:
        if isinstance(x, Mapping):
            for k, v in x.items():
                if isinstance(v, str) and str(k).endswith(_SECRET_NAME_FIELDS):
                    names.add(v)
                walk(v)
        elif isinstance(x, list | tuple):
            for v in x:
                walk(v)

    walk(config)
    return names


def passthrough_env(
    environ: Mapping[str, str] | None = None, secret_names: Iterable[str] = ()
) -> dict[str, str]:
    """The submitter's non-secret settings that a job needs to find its data (S3 endpoint, region...).
    `secret_names`: variables the job's config names as credentials (never passed, whatever their name)."""
    environ = os.environ if environ is None else environ
    secret = set(secret_names)
    out = {}
    for name, value in environ.items():
        if name in MACHINE_LOCAL_ENV or name in secret:
            continue
        if name in PASSTHROUGH_ENV or name.startswith(PASSTHROUGH_PREFIXES):
            if not is_secret_name(name):
                out[name] = value
    return dict(sorted(out.items()))


def build_runtime_env(
    *,
    working_dir: str | Path | None = CHECKOUT,
    env_vars: Mapping[str, str] | None = None,
    environ: Mapping[str, str] | None = None,
    extra_excludes: tuple[str, ...] = (),
    secret_names: Iterable[str] = (),
) -> dict[str, Any]:
    """A runtime_env for `JobSubmissionClient.submit_job`.

    `env_vars` are explicit additions (e.g. `--env KEY=VALUE`); a secret-looking name there is refused
    with an error that says where credentials belong instead, as is any of `secret_names` (the
    variables the job's config names as holding credentials).
    """
    secret = set(secret_names)
    env = passthrough_env(environ, secret)
    for name, value in (env_vars or {}).items():
        if is_secret_name(name) or name in secret:
            raise SecretInRuntimeEnvError(
                f"refusing to put {name} in the job's runtime_env: it would be stored in the job's "
                "metadata on the cluster. Give the cluster its credentials instead (a Kubernetes Secret, "
                "an instance role, or the environment of the shell that runs `crossdiff cluster up`)."
            )
        env[name] = value
    runtime_env: dict[str, Any] = {"env_vars": env}
    if working_dir is not None:
        runtime_env["working_dir"] = str(working_dir)
        runtime_env["excludes"] = [*WORKING_DIR_EXCLUDES, *extra_excludes]
    return runtime_env


def find_secrets(
    obj: Any, environ: Mapping[str, str] | None = None, secret_names: Iterable[str] = ()
) -> list[str]:
    """Paths inside `obj` (nested dicts/lists/strings) that hold a secret: a secret-named env var key,
    or the value of any secret-named variable of `environ` (default: os.environ) or of `secret_names`.
    Used by tests and as a last check before submitting."""
    environ = os.environ if environ is None else environ
    secret = set(secret_names)
    values = {v for k, v in environ.items() if (is_secret_name(k) or k in secret) and len(v) >= 6}
    hits: list[str] = []

    def walk(x: Any, path: str) -> None:
        if isinstance(x, Mapping):
            for k, v in x.items():
                if path.endswith("env_vars") and (is_secret_name(str(k)) or k in secret):
                    hits.append(f"{path}.{k}" if path else str(k))
                walk(v, f"{path}.{k}" if path else str(k))
        elif isinstance(x, list | tuple):
            for i, v in enumerate(x):
                walk(v, f"{path}[{i}]")
        elif isinstance(x, str) and any(s in x for s in values):
            hits.append(path)

    walk(obj, "")
    return hits
