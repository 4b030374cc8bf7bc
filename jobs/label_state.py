"""The state of a run's labels file: which settings decide a label (`label_settings`), the check
that a resume would not mix labels made with other ones, and the torn-line-tolerant read and the
fsynced append of RUN/labels.jsonl."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import TYPE_CHECKING

from diffing.config import ConfigError
from diffing.evidence import LABELS_FILE, LatentLabel
from diffing.logs import get_logger

if TYPE_CHECKING:
    from jobs.label import LabelConfig

log = get_logger("crossdiff.label")
CONFIG_FILE = "label_config.json"
SETTINGS_FILE = "label_settings.json"  # label_settings() of the run's labels: what a resume must match
# the endpoint's own settings fingerprint (LabelResponse.settings_fingerprint) when labels.jsonl was
# begun: a remote endpoint's taxonomy and method are not in this job's config
ENDPOINT_FILE = "label_endpoint.json"


class LabelSettingsChanged(ConfigError):
    """labels.jsonl was started with other label-deciding settings: resuming would mix labels."""


# settings that only bound, route or authorise requests: changing them between runs still resumes
_JOB_OPERATIONAL = {
    "groups", "batch_size", "concurrency", "max_attempts", "backoff_s", "max_backoff_s",
    "request_timeout_s", "token_env", "start_timeout_s",
}  # fmt: skip
_SERVICE_OPERATIONAL = {"limits", "auth", "cache_size", "cache_dir", "ingress_options"}
_JUDGE_OPERATIONAL = {"endpoint", "api_key_env", "cpu_reserved_cores", "deployment_config", "timeout_s"}


def label_settings(cfg: LabelConfig | dict) -> dict:
    """The settings that decide a latent's label besides its evidence, flattened: the judge, the
    taxonomy, the method, detection, and the calibration where channel scoring reads it. A dict is a
    saved config as written (an older crossdiff's lacks the fields added since: they count as changed)."""
    d = json.loads(json.dumps(cfg if isinstance(cfg, dict) else cfg.model_dump(mode="json")))
    for k in _JOB_OPERATIONAL:
        d.pop(k, None)
    service = d.get("service") if isinstance(d.get("service"), dict) else {}
    for k in _SERVICE_OPERATIONAL:
        service.pop(k, None)
    judge = service.get("judge")
    for k in _JUDGE_OPERATIONAL:
        if isinstance(judge, dict):
            judge.pop(k, None)
    method = service.get("method") or {}
    if not isinstance(method, dict):
        method = {}
    method.pop("max_concurrent_calls", None)
    if method.get("classify_mode", "json") != "channel":
        d.pop("calibration_group", None)
        d.pop("calibration_size", None)
    out = _flatten(d)
    if not isinstance(cfg, dict):  # what a path or a version name alone does not pin down
        from serve.prompts import PROMPT_VERSION
        from serve.taxonomy import load_taxonomy

        out["taxonomy_fingerprint"] = load_taxonomy(cfg.service.taxonomy).fingerprint
        out["prompt_version"] = PROMPT_VERSION
    return out


_DERIVED = ("taxonomy_fingerprint", "prompt_version")  # in label_settings.json, not label_config.json


def _read_json(path: Path) -> dict:
    try:
        d = json.loads(path.read_text())
    except (ValueError, FileNotFoundError):
        return {}
    return d if isinstance(d, dict) else {}


def settings_diff(before: dict, now: dict) -> list[str]:
    """The label-settings keys whose values differ (a key only one side has counts)."""
    return sorted(
        k for k in before.keys() | now.keys() if before.get(k, "<absent>") != now.get(k, "<absent>")
    )


def _check_resumable(run_dir: Path, now: dict, have: dict[int, LatentLabel]) -> None:
    """Refuse to append to labels made with other label-deciding settings (``now``, from
    ``label_settings``): compared with RUN/label_settings.json, or for runs from before it with
    RUN/label_config.json."""
    if not have:
        return
    if (path := run_dir / SETTINGS_FILE).exists():
        before = _read_json(path)
    elif (path := run_dir / CONFIG_FILE).exists():
        before = label_settings(_read_json(path))
        now = {k: v for k, v in now.items() if k not in _DERIVED}
    else:
        return
    changed = settings_diff(before, now)
    if changed:
        shown = "; ".join(
            f"{k}: {before.get(k, '<absent>')!r} -> {now.get(k, '<absent>')!r}" for k in changed[:5]
        )
        more = f" (and {len(changed) - 5} more)" if len(changed) > 5 else ""
        raise LabelSettingsChanged(
            f"{run_dir / LABELS_FILE} holds {len(have)} labels made with other label settings "
            f"({shown}{more}; saved in {path.name}); resuming would mix them. Rerun with --overwrite "
            f"to relabel every latent, or restore those settings to resume."
        )


def read_labels_tolerant(path: Path) -> dict[int, LatentLabel]:
    """Labels already written; a torn last line (killed mid-append) is dropped from the file."""
    if not path.exists():
        return {}
    good, out = [], {}
    raw = path.read_text()
    torn = bool(raw) and not raw.endswith("\n")  # killed before the newline: the next append would glue
    for line in raw.split("\n"):
        if not line.strip():
            continue
        try:
            lab = LatentLabel.model_validate_json(line)
        except ValueError:
            torn = True
            continue
        good.append(line)
        out[lab.latent] = lab
    if torn:
        log.warning("label.torn_line_dropped", path=str(path))
        tmp = path.with_name(f".{path.name}.tmp")
        tmp.write_text("".join(x + "\n" for x in good))
        tmp.replace(path)
    return out


def _append(path: Path, labels: list[LatentLabel]) -> None:
    data = "".join(lab.model_dump_json() + "\n" for lab in labels).encode()
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(fd, data)
        os.fsync(fd)
    finally:
        os.close(fd)


def _flatten(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict) and v:
            out.update(_flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def _read_endpoint_fingerprint(run_dir: Path) -> str | None:
    return _read_json(run_dir / ENDPOINT_FILE).get("settings_fingerprint") or None


def write_atomic(path: Path, text: str) -> None:
    """Whole or not at all: a state file cut short by a kill would refuse the resume it describes."""
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    tmp.replace(path)


def _write_endpoint_fingerprint(run_dir: Path, fp: str, **about) -> None:
    """The endpoint's settings fingerprint (what a resume must match) and, for the record, what it
    said of itself (its URL without credentials, judge, prompt version): with --endpoint the job's
    own `service` settings describe no judge that ran."""
    write_atomic(run_dir / ENDPOINT_FILE, json.dumps({"settings_fingerprint": fp, **about}, indent=1))
