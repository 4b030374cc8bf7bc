"""The Ray fit's data order and its writes to the run directory (local or object storage): the
store as one Ray dataset, each rank's shuffle seed, the crosscoder and metrics files, and rank 0's
divergence message for the driver. Used by jobs/fit.py (driver and Ray Train workers)."""

from __future__ import annotations

import json
import os
import tempfile
import time
from pathlib import Path

import fsspec
import numpy as np

from diffing.store import ActivationStore, atomic_write

# How a Ray fit orders its data: 1 = shards in manifest order, buffer seed seed*1000 + epoch*10 + rank
# (collides from 10 ranks on); 2 (2026-12-06) = shards in a seeded permutation, SeedSequence seeds.
DATA_ORDER = 2


def _shuffle_seed(seed: int, epoch: int, rank: int, data_order: int) -> int:
    if data_order < 2:
        return seed * 1000 + epoch * 10 + rank
    return int(np.random.SeedSequence([seed, epoch, rank]).generate_state(1)[0])


def _store_dataset(store: ActivationStore, datasource_v2: bool = False, seed: int | None = None):
    """The store's shards as one Ray dataset; `seed`: in a seeded random order (the same every epoch
    and on a resume), so a corpus sorted by source or topic is not trained on in that order (the
    local shuffle buffer only mixes about one shard's rows); None: manifest order."""
    import pyarrow.fs as pafs
    import ray.data

    # deterministic block order: a rerun (or a restarted worker group) sees the same data order
    ray.data.DataContext.get_current().execution_options.preserve_order = True
    fs = pafs.PyFileSystem(pafs.FSSpecHandler(store.fs))
    paths = [f"{store.root}/{s.path}" for s in store.manifest.shards]
    if seed is not None:
        paths = [paths[i] for i in np.random.default_rng([seed, 7]).permutation(len(paths))]
    cols = [f"act_{m}" for m in range(store.n_models)]
    # Ray Data's DataSourceV2 parquet read (its default in Ray 2.60) lists files by starting 32
    # footer-reading actors on every execution, i.e. every epoch: 7-15 s per epoch on a 2-core box
    # against 0.5-1.3 s for the V1 read of the same 6 shards (docs/benchmarks.md). The manifest
    # already names every shard and its rows, so there is nothing to discover: read with V1.
    ctx = ray.data.DataContext.get_current()
    v2 = getattr(ctx, "use_datasource_v2", None)
    if v2 is not None:
        ctx.use_datasource_v2 = datasource_v2
    try:
        return ray.data.read_parquet(paths, filesystem=fs).select_columns(cols)
    finally:
        if v2 is not None:
            ctx.use_datasource_v2 = v2


DIVERGED = "diverged.txt"  # rank 0's message when the fit diverged; the driver raises it


def _write_diverged(fs, path: str, message: str, log) -> None:
    """Rank 0's message for the driver; a failed write must not become a worker error (a restart)."""
    for attempt in range(3):
        try:
            fs.pipe_file(path, message.encode())
            return
        except Exception as e:  # noqa: BLE001 - a transient store error: try again, then only log
            time.sleep(2**attempt)
            err = e
    log.error("fit.diverged_unsaved", error=f"{type(err).__name__}: {err}"[:300], message=message)


def _write_history(fs, root: str, history: list[dict]) -> None:
    """RUN/metrics.jsonl, whole: one line per logged step (object stores cannot append)."""
    atomic_write(fs, f"{root}/metrics.jsonl", "".join(json.dumps(h) + "\n" for h in history).encode())


def _write_outputs(out: str, model, final: dict, history: list[dict]) -> None:
    """crosscoder/, metrics.jsonl and, last, metrics.json (marks the run finished) to local or object storage."""
    fs, root = fsspec.core.url_to_fs(out)
    with tempfile.TemporaryDirectory() as tmp:
        model.save(Path(tmp) / "crosscoder")
        fs.makedirs(f"{root}/crosscoder", exist_ok=True)
        local = "file" in (fs.protocol if isinstance(fs.protocol, tuple) else (fs.protocol,))
        for name in ("model.safetensors", "cfg.json"):
            dst = f"{root}/crosscoder/{name}"
            if local:  # a new file renamed over the old: a loaded crosscoder maps the old one's pages
                fs.put_file(str(Path(tmp) / "crosscoder" / name), f"{dst}.tmp")
                os.replace(f"{dst}.tmp", dst)
            else:  # one PUT replaces the object
                fs.put_file(str(Path(tmp) / "crosscoder" / name), dst)
    _write_history(fs, root, history)
    atomic_write(fs, f"{root}/metrics.json", json.dumps(final, indent=2).encode())


def _absolute(uri: str) -> str:
    return uri if "://" in uri else str(Path(uri).expanduser().resolve())
