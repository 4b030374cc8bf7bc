"""What each pipeline stage writes, and clearing it.

A stage that is redone from scratch (its config changed, `--overwrite`, or an earlier stage ran
again) is cleared by the pipeline before it runs and only then marked as a fresh start: from
that point every output present is this attempt's own, so a kill resumes it (a refit at its
last checkpoint, a re-harvest at its shard) instead of starting it over once more.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import fsspec

if TYPE_CHECKING:
    from jobs.pipeline import Pipeline

HARVEST_OUTPUTS = ("manifest.json", "shards", "harvest_config.json")
FIT_OUTPUTS = ("checkpoints", "ray", "metrics.json", "metrics.jsonl", "crosscoder", "run_config.json")


def _rm(uri: str, names: tuple[str, ...]) -> None:
    fs, root = fsspec.core.url_to_fs(uri)
    root = root.rstrip("/")
    for name in names:
        path = f"{root}/{name}"
        if fs.exists(path):
            fs.rm(path, recursive=True)


def clear(stage: str, p: Pipeline) -> None:
    """Remove what `stage` of the pipeline `p` wrote (the report is rewritten whole: nothing)."""
    if stage == "harvest":  # run_harvest clears its store itself, after its checks: a (maybe shared)
        return  # store goes only for a harvest that can run; it then calls the pipeline's on_cleared
    if stage == "fit":
        _rm(str(p.run), FIT_OUTPUTS)
        if p.cfg.remote:  # a Ray Train fit writes the bucket; weights this machine never synced stay there
            _rm(p.cfg.out, FIT_OUTPUTS if p.cfg.fit.distributed.workers > 0 else ("crosscoder",))
    elif stage == "analyze":
        import shutil

        from diffing.logs import get_logger
        from jobs.analyze import clear_outputs
        from jobs.compare import stale_dirs

        for d in stale_dirs(p.run, p.cfg.pairs):  # a changed `comparisons` (or pair vs comparisons)
            get_logger("pipeline", run=str(p.run)).warning(
                "pipeline.stale_comparison", removed=str(d), detail="not one of this config's comparisons"
            )
            if d == p.run:
                clear_outputs(d)
            else:
                shutil.rmtree(d)
        for d in p.dirs().values():
            clear_outputs(d)
    elif stage == "label":
        from diffing.evidence import LABELS_FILE
        from jobs.label import CONFIG_FILE, ENDPOINT_FILE, SETTINGS_FILE

        for d in p.dirs().values():
            for name in (LABELS_FILE, CONFIG_FILE, SETTINGS_FILE, ENDPOINT_FILE):
                (d / name).unlink(missing_ok=True)


def missing(stage: str, p: Pipeline) -> list[str]:
    """Outputs a `done` stage must still have (a marker vouches for files someone may have deleted
    since): the crosscoder's weights (in the bucket for a remote run) and metrics, each comparison's
    latents table, its labels, and its report. Not the store: it may be deleted to save space once
    fit and analyze are done (`store_gone` refuses a stage that needs it), and is not re-harvested
    over a fitted crosscoder."""
    from diffing.evidence import EXAMPLES_DIR, LABELS_FILE
    from jobs.compare import comparison_dir
    from jobs.report import REPORT_HTML, REPORT_JSON
    from jobs.rundir import join

    pairs = p.cfg.pairs
    dirs = [comparison_dir(p.run, pair, len(pairs)) for pair in pairs]
    if stage == "store":  # the harvest's output, checked only where a stage that reads it runs
        uri = join(p.cfg.harvest.store, "manifest.json")
        fs, path = fsspec.core.url_to_fs(uri)
        return [] if fs.exists(path) else [uri]
    if stage == "fit":
        out = [str(p.run / "metrics.json")] if not (p.run / "metrics.json").exists() else []
        weights = join(p.cfg.out, "crosscoder/model.safetensors") if p.cfg.remote else None
        if weights is None:
            local = p.run / "crosscoder" / "model.safetensors"
            return out + ([] if local.exists() else [str(local)])
        fs, path = fsspec.core.url_to_fs(weights)
        fs.invalidate_cache(path.rsplit("/", 1)[0])  # another process wrote it (Ray Train workers)
        return out + ([] if fs.exists(path) else [weights])
    if stage == "analyze":
        return [str(d / "latents.parquet") for d in dirs if not (d / "latents.parquet").exists()]
    if stage == "label":  # a comparison with nothing selected has no evidence and no labels
        return [
            str(d / LABELS_FILE)
            for d in dirs
            if any((d / EXAMPLES_DIR).glob("*.jsonl")) and not (d / LABELS_FILE).exists()
        ]
    if stage == "report":
        roots = dirs if len(dirs) == 1 else [*dirs, p.run]
        return [str(d / n) for d in roots for n in (REPORT_JSON, REPORT_HTML) if not (d / n).exists()]
    return []


def store_gone(p: Pipeline, to_run: list[str]) -> str | None:
    """Why the stages about to run cannot: fit or analyze reads a store deleted since its harvest
    (None: the store is there, the harvest redoes it, or no stage that runs reads it)."""
    if "harvest" in to_run or not {"fit", "analyze"} & set(to_run):
        return None
    if not p.missing_outputs("store"):
        return _store_replaced(p, to_run)
    return (
        f"{p.run}: stages {[s for s in to_run if s in ('fit', 'analyze')]} read the store "
        f"{p.cfg.harvest.store}, which is gone (no manifest.json) although the harvest finished; restore it, "
        "or write it again with `crossdiff harvest` and this run's harvest config to the same URI (the shards "
        "come out the same), or pass --overwrite to redo the whole run"
    )


def _store_replaced(p: Pipeline, to_run: list[str]) -> str | None:
    """The store is there but holds other data than this run's harvest wrote (a run sharing it
    redid it since): fit or analyze would use that data under this run's name. Harvest markers
    from before 2026-12-07 carry no fingerprint: not checked."""
    from diffing.fit_identity import manifest_fingerprint
    from diffing.store import open_store

    want = ((p._saved("harvest") or {}).get("summary") or {}).get("fingerprint")
    if not want:
        return None
    have = manifest_fingerprint(open_store(p.cfg.harvest.store).manifest)
    if have == want:
        return None
    return (
        f"{p.run}: the store {p.cfg.harvest.store} holds other data than this run's harvest wrote (content "
        f"{have}, harvested as {want}): another run sharing it redid it since. Stages "
        f"{[s for s in to_run if s in ('fit', 'analyze')]} would read that data under this run's name; "
        "give this run a store of its own (harvest.store) and rerun with --redo-changed, or --overwrite"
    )


def store_stamp(p: Pipeline) -> bytes | None:
    """The harvest store's stamp as it is now (None: none, or unreadable): a harvest writes it
    only once its checks passed, and removes it when it clears the store."""
    try:
        fs, root = fsspec.core.url_to_fs(p.cfg.harvest.store)
        fs.invalidate_cache(root)
        return fs.cat_file(f"{root.rstrip('/')}/harvest_config.json")
    except Exception:  # noqa: BLE001 - missing or unreachable: nothing to compare, as none
        return None


def marker_snapshot(p: Pipeline, stages) -> dict[str, str | None]:
    """The markers of `stages` as they are, raw (None: no marker)."""
    return {s: (p.marker(s).read_text() if p.marker(s).exists() else None) for s in stages}


def restore_markers(p: Pipeline, snapshot: dict[str, str | None], config: str | None = None) -> None:
    """Put back the markers of a snapshot, and the run's pipeline.json as it was (`config`; None:
    there was none), locally and on a remote run's bucket: what a harvest that stopped before
    writing anything found, so its refused config does not stand in the run."""
    if config is not None:
        tmp = p.run / "pipeline.json.tmp"
        tmp.write_text(config)
        tmp.replace(p.run / "pipeline.json")
        if p.mirror is not None:
            p.mirror.put("pipeline.json")
    for stage, text in snapshot.items():
        m = p.marker(stage)
        if text is None:
            m.unlink(missing_ok=True)
            if p.mirror is not None:
                p.mirror.delete(f"stages/{stage}.json")
            continue
        tmp = m.with_suffix(".tmp")
        tmp.write_text(text)
        tmp.replace(m)
        if p.mirror is not None:
            p.mirror.put(f"stages/{stage}.json")
