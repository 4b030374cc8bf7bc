"""Which analysis a finished latents.parquet is: the operational settings left out of its
identity, the digest of the weights it read, and the check a rerun makes before it skips the file."""

from __future__ import annotations

import functools

from diffing.config import AnalysisConfig

_OPERATIONAL = {"batch_size", "evidence_workers", "latents_per_pass", "device", "tokenizer", "source_mass"}


def fit_digest(run) -> str | None:
    """Which weights a run's analysis read: the sha256 of crosscoder/model.safetensors (a refit
    to the same weights gives the same digest, and the same latents.parquet). None: no weights.
    Hashed once per file version in a process (GBs at the Gemma shape; comparison directories
    link the same file); a file written in the last 2 s is hashed again (where timestamps are
    coarse, a refit's file of the same size could carry the old one's)."""
    import time
    from pathlib import Path

    p = Path(run) / "crosscoder" / "model.safetensors"
    try:
        st = p.stat()
    except OSError:
        return None
    key = (str(p.resolve()), st.st_size, st.st_mtime_ns)
    if time.time_ns() - st.st_mtime_ns < 2_000_000_000:
        return _weights_digest.__wrapped__(*key)
    return _weights_digest(*key)


@functools.lru_cache(maxsize=16)
def _weights_digest(path: str, size: int, mtime_ns: int) -> str:
    import hashlib

    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 24):
            h.update(chunk)
    return "w" + h.hexdigest()[:15]


def _legacy_fit_digest(run) -> str | None:
    """fit_digest until 2026-12-07: the sha256 of metrics.json (timings included, so it changed
    with every refit); still accepted for analyses made then."""
    import hashlib
    from pathlib import Path

    p = Path(run) / "metrics.json"
    return hashlib.sha256(p.read_bytes()).hexdigest()[:16] if p.exists() else None


def _weights_newer(run, path) -> bool:
    """crosscoder/model.safetensors written more than 2 s after the analysis file `path`."""
    from pathlib import Path

    try:
        return (Path(run) / "crosscoder" / "model.safetensors").stat().st_mtime_ns > Path(
            path
        ).stat().st_mtime_ns + 2_000_000_000
    except OSError:
        return False


def check_same_analysis(
    path, cfg: AnalysisConfig, pair: tuple[str, str] | None, fit: str | None = None, run=None
) -> None:
    """A rerun may skip a finished latents.parquet only if it asks for the same pair and analysis
    of the same fit (`fit`: fit_digest of the run now, or given `run`, the digest of the kind the
    file holds); else it would report the old results as the new ones. A file without the fit's
    digest (before 2026-12-06) passes unless the weights are newer than it."""
    import pyarrow.parquet as pq

    meta = pq.read_schema(path).metadata or {}
    old_fit = meta.get(b"fit", b"").decode()
    if fit is None and old_fit and run is not None:  # written before the weights were its digest: legacy
        fit = fit_digest(run) if old_fit.startswith("w") else _legacy_fit_digest(run)
    if not old_fit and run is not None and _weights_newer(run, path):
        raise ValueError(
            f"{path} is older than the crosscoder's weights (refitted since?) and was made by a crossdiff "
            "that did not record which weights it read; pass --overwrite to analyse the crosscoder as it is"
        )
    if fit and old_fit and old_fit != fit:
        raise ValueError(
            f"{path} was made from another fit of this run (its crosscoder was refitted since, to other "
            "weights); pass --overwrite to analyse the new crosscoder"
        )
    old_pair = meta.get(b"pair", b"").decode().split(",")
    if pair is not None and old_pair != [""] and list(pair) != old_pair:
        raise ValueError(
            f"{path} was made for the pair {old_pair}, not {list(pair)}; pass --overwrite to redo the analysis "
            "(or analyze into another run directory)"
        )
    if b"config" not in meta:
        return
    import json

    try:
        raw = json.loads(meta[b"config"])
    except ValueError:
        return
    if not isinstance(raw, dict) or set(raw) - set(AnalysisConfig.model_fields):
        return  # written by a crossdiff whose fields this one does not know
    # not validated: settings valid then may fail a check added since (and still differ from these)
    old = AnalysisConfig.model_construct(**raw).model_dump(exclude=_OPERATIONAL)
    new = cfg.model_dump(exclude=_OPERATIONAL)
    changed = {k: (old[k], new[k]) for k in new if old.get(k) != new[k]}
    if changed:
        diff = ", ".join(f"{k}: {a!r} -> {b!r}" for k, (a, b) in sorted(changed.items()))
        raise ValueError(
            f"{path} was made with other analysis settings ({diff}); pass --overwrite to redo it"
        )
