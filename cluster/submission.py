"""What a submission of a crossdiff stage to a Ray cluster sends, built and checked locally.

Every submission has a deterministic id, `crossdiff-<stage>-<name>-<hash>`, from the stage and the
run it writes (its `--out`/`--run`/`--store`, or the config's `out`/`store`, or `--name`). So:

* resubmitting while that job is PENDING/RUNNING is refused (two jobs would write one run);
* resubmitting after it FAILED or was STOPPED replaces the old record and the stage resumes
  (stages skip finished work); after SUCCEEDED it is refused unless `replace=True`.

The stage's config file is read on the submitting machine, validated there when its config class is
known, and travels in the runtime_env (`CROSSDIFF_JOB_CONFIG`); the entrypoint writes it to a temp
file on the cluster and runs the ordinary `crossdiff <stage> --config FILE ...` command.
"""

from __future__ import annotations

import hashlib
import os
import re
import shlex
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cluster.runtime_env import (
    CHECKOUT,
    SecretInRuntimeEnvError,
    build_runtime_env,
    configured_secret_names,
    find_secrets,
)

STAGES = ("harvest", "fit", "analyze", "label", "report", "pipeline")
CONFIG_ENV = "CROSSDIFF_JOB_CONFIG"
# Config classes validated before submitting ("module:attr"); a stage missing here is checked on the cluster.
CONFIG_CLASSES = {
    "harvest": "diffing.harvest:HarvestConfig",
    "fit": "diffing.config:FitConfig",
    "analyze": "diffing.config:AnalysisConfig",
    "label": "jobs.label:LabelConfig",
    "pipeline": "jobs.pipeline_config:PipelineConfig",
    "report": "jobs.report.config:ReportConfig",
}
# Where a stage's run lives, in order of preference: CLI options, then config fields.
_RUN_OPTIONS = ("--out", "--run", "--store")
_RUN_FIELDS = ("out", "run", "run_dir", "store")


class SubmitError(RuntimeError):
    """A submission problem with a message meant for the user. `retryable`: the cluster could not be
    reached or a wait ran out (a rerun later may succeed), not a submission that needs a fix."""

    def __init__(self, msg: str, *, retryable: bool = False):
        super().__init__(msg)
        self.retryable = retryable


@dataclass(frozen=True)
class Submission:
    """What `submit` sends: kept as data so tests can inspect it without a cluster."""

    submission_id: str
    stage: str
    entrypoint: str
    runtime_env: dict[str, Any]
    metadata: dict[str, str]
    entrypoint_num_cpus: float | None = None
    entrypoint_num_gpus: float | None = None
    extra: dict[str, Any] = field(default_factory=dict)


def _slug(text: str, n: int = 24) -> str:
    s = re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")
    return s[-n:].strip("-") or "run"


def _option_values(args: Sequence[str], opt: str) -> list[str]:
    """The values given to `opt` (`--opt VALUE` or `--opt=VALUE`), in order."""
    out, args = [], list(args)
    for i, a in enumerate(args):
        if a == opt and i + 1 < len(args):
            out.append(args[i + 1])
        elif a.startswith(opt + "="):
            out.append(a.split("=", 1)[1])
    return out


def _run_paths(config: Mapping[str, Any] | None, args: Sequence[str]) -> list[tuple[str, str]]:
    """(where, path) of the run's locations, most telling first: the CLI options, then the config."""
    found = [(opt, v) for opt in _RUN_OPTIONS for v in _option_values(args, opt)]
    return found + [(f, config[f]) for f in _RUN_FIELDS if config and isinstance(config.get(f), str)]


def run_key(stage: str, config: Mapping[str, Any] | None, args: Sequence[str], name: str | None) -> str:
    """The run a stage writes: `--name`, else its output option, else the config's output field."""
    if name:
        return name
    if found := _run_paths(config, args):
        return found[0][1]
    raise SubmitError(
        f"cannot tell which run this {stage} job writes: pass --name NAME (or an --out/--run/--store "
        "option, or a config with an `out`/`store` field) so the submission id is stable"
    )


def _is_relative_local(path: str) -> bool:
    # "~" too: the job's crossdiff expands it to the home of the node that runs it, not the submitter's
    return bool(path) and "://" not in path and not path.startswith("/")


def relative_outputs(stage: str, config: Mapping[str, Any] | None, args: Sequence[str]) -> list[str]:
    """Local relative paths among the run's outputs and inputs (`--out/--run/--store`, the config's
    `out`/`store`/`harvest.store`): on the cluster they resolve against the job's working directory,
    a temporary directory of Ray's, not the directory `submit` ran in."""
    found = _run_paths(config, args)
    harvest = (config or {}).get("harvest")
    if stage == "pipeline" and isinstance(harvest, Mapping) and isinstance(harvest.get("store"), str):
        found.append(("harvest.store", harvest["store"]))
    # the corpus is read where the job runs too (harvest: `corpus`; pipeline: `harvest.corpus`)
    hcfg = harvest if stage == "pipeline" else config if stage == "harvest" else None
    corpus = hcfg.get("corpus") if isinstance(hcfg, Mapping) else None
    if isinstance(corpus, Mapping) and isinstance(corpus.get("uri"), str):
        found.append(("corpus.uri" if stage == "harvest" else "harvest.corpus.uri", corpus["uri"]))
    return [f"{k} {v}" for k, v in found if _is_relative_local(v)]


def submission_id(stage: str, key: str) -> str:
    """Deterministic id per run and stage: resubmitting the same run gives the same id."""
    digest = hashlib.sha1(f"{stage}\0{key}".encode()).hexdigest()[:8]
    return f"crossdiff-{stage}-{_slug(Path(key.rstrip('/')).name or key)}-{digest}"


def _config_class(stage: str):
    """The config class a stage's --config and --set describe (None: the stage takes none)."""
    import importlib

    spec = CONFIG_CLASSES.get(stage)
    if spec is None:
        return None
    mod, attr = spec.split(":")
    return getattr(importlib.import_module(mod), attr)


def _validate_config(stage: str, data: dict[str, Any], sets: Sequence[str]) -> None:
    cls = _config_class(stage)
    if cls is None:
        return
    from diffing.config import ConfigError, format_validation_error, validate_with_overrides

    check = cls.model_validate
    if stage == "pipeline":  # harvest.store defaults to OUT/store, as `crossdiff pipeline` fills it
        from jobs.pipeline_config import with_defaults

        # a store only the cluster reaches: stand-ins here, the job reads the store there
        check = lambda d: cls.model_validate(with_defaults(d, stand_in=True))  # noqa: E731
    try:
        validate_with_overrides(check, dict(data), list(sets))
    except Exception as e:  # pydantic ValidationError or ValueError from overrides
        raise ConfigError(f"{stage} config: {format_validation_error(e)}") from None


def _unknown_set_keys(stage: str, sets: Sequence[str]) -> list[str]:
    """`--set` keys naming no field of the stage's config (checked without a config file, whose
    required fields the command line may supply another way)."""
    from diffing.config_io import unknown_override_keys

    cls = _config_class(stage)
    return [] if cls is None else unknown_override_keys(cls, sets)


def parse_cli(argv: Sequence[str]) -> str:
    """Parse `crossdiff ARGV...` with the real CLI without running anything. Returns the command
    name; raises SubmitError with the CLI's own message (unknown command or option, missing value)."""
    import typer

    from jobs.cli import app

    cmd = typer.main.get_command(app)
    ctx = cmd.context_class(cmd, info_name="crossdiff")
    args = list(argv)
    try:
        while hasattr(cmd, "list_commands"):  # a group: descend
            if not args:
                raise SubmitError("missing command")
            name, args = args[0], args[1:]
            sub = cmd.get_command(ctx, name)
            if sub is None:
                raise SubmitError(f"no such command {name!r}")
            if hasattr(sub, "list_commands"):
                ctx, cmd = sub.context_class(sub, info_name=name, parent=ctx), sub
                continue
            with sub.make_context(name, args, parent=ctx):
                return name
    except SubmitError:
        raise
    except Exception as e:  # typer's click UsageError / BadParameter
        if hasattr(e, "format_message"):
            raise SubmitError(e.format_message()) from None
        raise
    raise SubmitError("not a command")


def entrypoint_argv(entrypoint: str, config_path: str = "config.yaml") -> list[str]:
    """The `crossdiff ...` argv inside an entrypoint (after `exec`, with the config temp file named)."""
    import shlex

    cmd = entrypoint.split("&& exec ")[-1].replace('"$cfg"', shlex.quote(config_path))
    argv = shlex.split(cmd)
    if not argv or argv[0] != "crossdiff":
        raise SubmitError(f"entrypoint does not run crossdiff: {entrypoint!r}")
    return argv[1:]


def _sets(args: Sequence[str]) -> list[str]:
    return _option_values(args, "--set")


def _with_sets(data: dict[str, Any] | None, sets: Sequence[str]) -> dict[str, Any] | None:
    """The config as the stage will see it (`--set out=...` decides which run it writes)."""
    if not sets:
        return data
    from diffing.config_io import apply_overrides

    try:
        return apply_overrides(dict(data or {}), list(sets))
    except ValueError:  # a malformed --set: the CLI check names it
        return data


def build_submission(
    stage: str,
    config: str | Path | None = None,
    args: Sequence[str] = (),
    *,
    name: str | None = None,
    env: Mapping[str, str] | None = None,
    working_dir: str | Path | None = CHECKOUT,
    num_cpus: float | None = None,
    num_gpus: float | None = None,
    environ: Mapping[str, str] | None = None,
    pip: Sequence[str] = (),
) -> Submission:
    """Everything a submission sends, built and checked locally (no cluster needed). ``pip``:
    requirement specs the job's runtime_env installs on the cluster (e.g. crossdiff itself, from a
    wheel on shared storage or a package index, where the cluster image lacks it)."""
    if stage not in STAGES:
        raise SubmitError(f"unknown stage {stage!r}; choose one of {', '.join(STAGES)}")
    data: dict[str, Any] | None = None
    env_vars = dict(env or {})
    submitter = os.environ if environ is None else environ
    if "CROSSDIFF_LOG_JSON" not in env_vars and "CROSSDIFF_LOG_JSON" not in submitter:
        env_vars["CROSSDIFF_LOG_JSON"] = "1"  # JSON lines in jobs (as on Kubernetes), unless told otherwise
    cmd = ["crossdiff", stage]
    if config is None and (bad := _unknown_set_keys(stage, _sets(args))):
        from diffing.config import ConfigError

        raise ConfigError(
            f"{stage} config: --set {', '.join(bad)}: unknown field; check the spelling (docs/configuration.md)"
        )
    if config is not None:
        from diffing.config_io import read_config_file

        p = Path(config)
        data = read_config_file(p)  # missing, a directory, not UTF-8, a YAML error: one line each
        text = p.read_text()
        checked = dict(data)
        if stage == "pipeline" and (outs := _option_values(args, "--out")):
            checked["out"] = outs[-1]  # `crossdiff pipeline --out RUN` fills the config's out
        _validate_config(stage, checked, _sets(args))
        env_vars[CONFIG_ENV] = text
        cmd += ["--config", '"$cfg"']
    try:
        parse_cli([stage, *(["--config", str(config)] if config is not None else []), *args])
    except SubmitError as e:
        raise SubmitError(f"`crossdiff {stage}` would not accept these arguments: {e}") from None
    key = run_key(stage, _with_sets(data, _sets(args)), args, name)
    sid = submission_id(stage, key)
    cmd += [shlex.quote(a) for a in args]
    entry = " ".join(cmd)
    if config is not None:
        # the suffix tells YAML from JSON; anything else in a file name never reaches the shell
        suffix = Path(config).suffix if Path(config).suffix in (".json", ".yml") else ".yaml"
        entry = f'cfg="$(mktemp -d)/{stage}{suffix}" && printf "%s" "${CONFIG_ENV}" > "$cfg" && exec {entry}'
    # the variables this job's config names as credentials (label.token_env, ...)
    secret_names = configured_secret_names(_with_sets(data, _sets(args)))
    try:
        runtime_env = build_runtime_env(
            working_dir=working_dir, env_vars=env_vars, environ=environ, secret_names=secret_names
        )
    except SecretInRuntimeEnvError as e:
        raise SubmitError(str(e)) from None
    if pip:
        if bad := [p for p in pip if not p.strip() or p.lstrip().startswith("-")]:
            raise SubmitError(
                f"--pip {bad[0]!r}: give a requirement (crossdiff==0.1.0, a wheel's path or URL), "
                "one per --pip; pip options do not go here"
            )
        runtime_env["pip"] = [p.strip() for p in pip]
    metadata = {
        "crossdiff_stage": stage,
        "crossdiff_run": key,
        "crossdiff_config": Path(config).name if config else "",
        "crossdiff_config_sha256": hashlib.sha256(env_vars.get(CONFIG_ENV, "").encode()).hexdigest()[:16],
    }
    relative = relative_outputs(stage, _with_sets(data, _sets(args)), args)
    extra = {"relative_paths": relative} if relative else {}
    sub = Submission(sid, stage, entry, runtime_env, metadata, num_cpus, num_gpus, extra)
    leaked = find_secrets(
        {"entrypoint": sub.entrypoint, "runtime_env": sub.runtime_env, "metadata": sub.metadata},
        environ,
        secret_names,
    )
    if leaked:
        raise SubmitError(f"refusing to submit: a credential would be stored with the job at {leaked}")
    return sub
