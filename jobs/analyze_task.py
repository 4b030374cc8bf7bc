"""The analyze stage as one Ray task placed by `pipeline.analyze_task` (e.g. on a GPU worker).

A cluster job's driver runs on the head pod, which has no GPU; at the Gemma-2-9b shape the latent
statistics and the splice need one (docs/gemma.md; with `analyze.evidence_workers > 0` the evidence
passes are CPU tasks Ray places on any node, else they run in the task too). The task reaches the
run the way any node can:

- a remote `out` (s3://, gs://): the task copies the run down to its node's cache
  ($CROSSDIFF_CACHE/runs/<hash of out>-analyze, kept for a resumed task on the same node), analyses
  every comparison there, uploads as it goes (`sync_every_s`) and at the end, also when it fails,
  so finished evidence ranges survive; the driver then copies the outputs down.
- a local `out`: the task works in it, so it must be on a filesystem the task's node sees (one
  machine, or a volume every node mounts); a node that does not see it fails with that fix.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from diffing.logs import get_logger
from jobs.rundir import default_work_dir, is_remote, local_copy


def analyze_pairs(run: Path, cfg, store: str, *, overwrite: bool, address: str | None = None) -> dict:
    """Every comparison of a pipeline config analysed in `run`: {"A-vs-B": summary}."""
    from jobs.analyze import run_analyze
    from jobs.compare import pair_dir

    return {
        "-vs-".join(pair): run_analyze(
            pair_dir(run, pair, len(cfg.pairs)),
            store,
            cfg.analyze,
            pair=pair,
            overwrite=overwrite,
            address=address,
            planted=bool(cfg.planted),
        )
        for pair in cfg.pairs
    }


def task_work_dir(out: str) -> Path:
    """The task's own working copy of a remote run (never the driver's, even on the same node)."""
    d = default_work_dir(out)
    return d.with_name(f"{d.name}-analyze")


def _rebase(obj: Any, old: str, new: str) -> Any:
    """Paths in a summary as the driver sees them."""
    if isinstance(obj, str):
        return new + obj[len(old) :] if obj.startswith(old) else obj
    if isinstance(obj, list):
        return [_rebase(v, old, new) for v in obj]
    if isinstance(obj, dict):
        return {k: _rebase(v, old, new) for k, v in obj.items()}
    return obj


def _node() -> dict:
    import ray

    return {
        "node_ip": ray.util.get_node_ip_address(),
        "pid": os.getpid(),
        "gpus": [str(g) for g in ray.get_gpu_ids()] if ray.is_initialized() else [],
    }


def in_task(cfg, run: str, store: str, overwrite: bool) -> dict:
    """The task's body: analyse every comparison of `cfg` (see the module docstring)."""
    node = _node()
    log = get_logger("analyze.task", **node)
    # a remote run: exactly the bucket's (nothing a killed attempt left unsynced), uploaded as it
    # goes and at the end, also on failure; a local one: in place, where this node must see it
    remote = (cfg.out, task_work_dir(cfg.out)) if cfg.remote else (run, None)
    # not held: the task works for the pipeline that holds the run
    with local_copy(*remote, prune=True, sync_every_s=cfg.sync_every_s, hold=False) as local:
        if not cfg.remote and not (local / "crosscoder").is_dir():
            raise FileNotFoundError(
                f"analyze_task: the run directory {run} (with its fitted crosscoder/) is not on the "
                f"node the task was placed on ({node['node_ip']}); give `out` as an object-storage URL "
                "(s3://, gs://) or a path on a volume every node mounts, or set analyze_task: null"
            )
        log.info("analyze.task_start", local=str(local))
        out = analyze_pairs(local, cfg, store, overwrite=overwrite)
    out = _rebase(out, str(local), run)
    for summary in out.values():
        summary["task"] = node
    return out


def unmet(p, nodes: list[dict]) -> list[str]:
    """Why no live node of `nodes` (ray.nodes()) can hold placement `p`: one line per node
    kind that falls short, empty when one can."""
    want = {"CPU": p.num_cpus, "GPU": p.num_gpus}
    if p.memory_gb is not None:
        want["memory"] = p.memory_gb * 2**30
    if p.accelerator_type is not None:
        want[f"accelerator_type:{p.accelerator_type}"] = 1e-3

    def say(k: str, have: float, v: float) -> str:
        if k == "memory":
            return f"memory {have / 2**30:.1f} GiB < {v / 2**30:g} GiB"
        return f"no {k}" if k.startswith("accelerator_type") else f"{k} {have:g} < {v:g}"

    short = []
    for n in (n for n in nodes if n.get("Alive", True)):
        have = n.get("Resources", {})
        lacks = [say(k, have.get(k, 0), v) for k, v in want.items() if v > 0 and have.get(k, 0) < v]
        if not lacks:
            return []
        short.append(", ".join(lacks))
    return sorted(set(short)) or ["no live node"]


def analyze_in_task(cfg, run: Path, *, overwrite: bool, address: str | None = None) -> dict:
    """Run `in_task` as a Ray task holding `cfg.analyze_task`'s resources; returns its summaries."""
    import ray

    from cluster import connect
    from cluster.connect import ensure_ray
    from jobs.cli import _user_errors

    ensure_ray(address)
    own_ray = connect.STARTED_LOCAL  # this process's Ray on this machine (the harvest may have begun it)
    p = cfg.analyze_task
    # a lost node (preempted GPU) restarts the task elsewhere, resuming at the ranges it uploaded
    opts: dict[str, Any] = {"num_gpus": p.num_gpus, "num_cpus": p.num_cpus, "max_retries": 2}
    if p.memory_gb is not None:
        opts["memory"] = int(p.memory_gb * 2**30)
    if p.accelerator_type is not None:
        opts["accelerator_type"] = p.accelerator_type
    store = cfg.harvest.store
    if not is_remote(store):  # the task's working directory is not the driver's
        store = str(Path(store).resolve())
    log = get_logger("analyze", run=cfg.out)
    if why := unmet(p, ray.nodes()):
        detail = f"no node can hold analyze_task {p.model_dump(exclude_none=True)} ({'; '.join(why)})"
        if own_ray:  # the Ray this process started on this machine: nothing will ever join it
            raise ValueError(f"{detail}; lower analyze_task's resources or set analyze_task: null")
        log.warning("analyze.task_waits", detail=f"{detail}; the task waits until one joins (an autoscaler)")
    log.info("analyze.task", **{k: v for k, v in opts.items() if k != "max_retries"})
    ref = ray.remote(**opts)(in_task).remote(cfg, str(run.resolve()), store, overwrite)
    try:
        return ray.get(ref)
    except ray.exceptions.RayTaskError as e:  # an expected condition keeps its own message
        cause = getattr(e, "cause", None)
        if isinstance(cause, _user_errors()) and not os.environ.get("CROSSDIFF_DEBUG"):
            raise cause from None
        raise
    except BaseException:  # Ctrl-C, a killed driver's exception: the task must not go on writing
        ray.cancel(ref, force=True)
        raise
