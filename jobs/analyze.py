"""`crossdiff analyze`: latents.parquet (Δnorm, Latent Scaling, classes, groups), then the latent
evidence (RUN/examples/, a Ray Data pass over the held-out shards when analysis.evidence_workers
> 0, in-process otherwise), then optionally the splice evaluation (RUN/splice.json).

Every step skips finished work: latents.parquet when present, evidence per latent range,
splice.json when present; `overwrite` redoes all three.
"""

from __future__ import annotations

import pickle
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

from diffing.config import AnalysisConfig
from diffing.logs import get_logger

# The task function of the current pass, per worker process: unpickled once, so the encoder it
# carries and the store it opens (diffing.collect.ScanTask) serve every shard the process gets.
_TASK_FN: dict[str, Callable] = {}


def _drop_task(row: dict) -> dict:
    _TASK_FN.clear()
    return row


def _task_fn(key: str, ref) -> Callable:
    if key not in _TASK_FN:
        import ray

        _TASK_FN.clear()  # one pass at a time: the last pass's crosscoder goes
        _TASK_FN[key] = pickle.loads(ray.get(ref))
    return _TASK_FN[key]


def ray_data_map(concurrency: int, *, num_cpus: float = 0.5, address: str | None = None) -> Callable:
    """A `map_fn(fn, items) -> iterator` running fn over items as Ray Data tasks, yielding the
    results in item order as they arrive, so the caller merges each before the next. Results that
    arrive before an earlier item's wait for it (all of them, at worst, when the first item is the
    slowest: as before, when every result was collected first).

    fn goes to the object store once and is unpickled once per worker process; items travel
    pickled in the rows; results come back pickled too, so any Python object works.
    """

    def map_fn(fn: Callable, items: Sequence) -> Iterator:
        if not items:
            return
        import uuid

        import ray

        from cluster.connect import ensure_ray

        ensure_ray(address)
        ref = ray.put(pickle.dumps(fn))
        key = uuid.uuid4().hex

        def task(row: dict) -> dict:
            f = _task_fn(key, ref)
            return {"i": row["i"], "out": pickle.dumps(f(pickle.loads(row["item"])))}

        rows = [{"i": i, "item": pickle.dumps(it)} for i, it in enumerate(items)]
        ray.data.DataContext.get_current().raise_original_map_exception = True  # a task's error as itself
        ds = ray.data.from_items(rows, override_num_blocks=len(rows))
        ahead: dict[int, bytes] = {}  # results that arrived before an earlier item's
        nxt = 0
        for r in ds.map(task, concurrency=concurrency, num_cpus=num_cpus).iter_rows():
            ahead[int(r["i"])] = r["out"]
            while nxt in ahead:
                yield pickle.loads(ahead.pop(nxt))
                nxt += 1
        # best effort: idle workers would hold the pass's encoder (all of W_enc for the source
        # mass) until the next pass; a pass of no-ops reaches the same reused worker processes
        n = 2 * concurrency
        ray.data.range(n, override_num_blocks=n).map(_drop_task, num_cpus=num_cpus).take_all()

    return map_fn


def clear_outputs(run: Path) -> None:
    """Remove an analysis: latents, evidence, source masses, splice (a redo with splice or evidence
    off must not leave the old ones for the report and the label stage to read), and the labels of
    its latents (they describe the old evidence: `crossdiff label` would skip those latent ids and
    the report would count them in the new groups)."""
    import shutil

    from diffing.evidence import EXAMPLES_DIR, LABELS_FILE
    from jobs.label import CONFIG_FILE, ENDPOINT_FILE, SETTINGS_FILE

    if (run / LABELS_FILE).exists():
        get_logger("analyze", run=str(run)).warning(
            "analyze.labels_removed", detail=f"{LABELS_FILE} described the old analysis; relabel the new one"
        )
    for name in ("latents.parquet", "analysis_config.json", "source_mass.parquet", "splice.json"):
        (run / name).unlink(missing_ok=True)
    for name in (LABELS_FILE, CONFIG_FILE, SETTINGS_FILE, ENDPOINT_FILE):
        (run / name).unlink(missing_ok=True)
    shutil.rmtree(run / EXAMPLES_DIR, ignore_errors=True)


def run_analyze(
    run: str | Path,
    store: str,
    cfg: AnalysisConfig,
    *,
    pair: tuple[str, str] | None = None,
    overwrite: bool = False,
    address: str | None = None,
    planted: bool = False,
) -> dict:
    """latents.parquet + evidence (+ source_mass.parquet where `cfg.source_mass` asks, `planted`:
    the pipeline has a planted-truth check) (+ splice when cfg.splice); a JSON-able summary."""
    import numpy as np

    from diffing.analysis import analyze_run
    from diffing.collect import collect_evidence, collect_source_mass, token_decoder
    from diffing.store import open_store

    run = Path(run)
    st = open_store(store) if isinstance(store, str) else store
    log = get_logger("analyze", run=str(run))
    if overwrite:  # every output of an earlier analysis goes, also those this one does not write
        clear_outputs(run)
    # the evidence's tokenizer is loaded and checked against the store before the statistics pass,
    # so a wrong analyze.tokenizer fails in seconds, not after a pass over the whole store
    decode = token_decoder(st, cfg.tokenizer) if cfg.evidence else None
    table = analyze_run(run, st, cfg, pair=pair, overwrite=overwrite)
    classes = table.column("class").to_pylist()
    groups = table.column("group").to_pylist() if "group" in table.column_names else []
    summary: dict = {
        "latents": table.num_rows,
        "classes": {c: classes.count(c) for c in sorted(set(classes))},
        "groups": {g: groups.count(g) for g in sorted(set(groups)) if g},
        "robust": int(np.sum(table.column("robust").to_numpy(zero_copy_only=False))),
        "out": str(run / "latents.parquet"),
    }
    if "group" not in table.column_names:
        raise ValueError(
            f"{run}/latents.parquet predates latent selection (no `group` column); pass --overwrite"
        )
    if cfg.evidence:
        map_fn = ray_data_map(cfg.evidence_workers, address=address) if cfg.evidence_workers > 0 else None
        files = collect_evidence(run, st, cfg, map_fn=map_fn, overwrite=overwrite, decode=decode)
        summary["examples"] = [str(p) for p in files]
        if cfg.source_mass == "always" or (cfg.source_mass == "auto" and planted):
            mass = collect_source_mass(run, st, cfg, map_fn=map_fn, overwrite=overwrite)
            summary["source_mass"] = str(mass) if mass else None
    if cfg.splice:
        from diffing.splice import splice_run

        res = splice_run(run, st, cfg, overwrite=overwrite)
        summary["splice"] = {
            n: {k: r["full"][k] for k in ("delta_ce", "kl", "ce_recovered")} for n, r in res["models"].items()
        }
    log.info("analyze.summary", **{k: v for k, v in summary.items() if k != "examples"})
    return summary
