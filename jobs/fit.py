"""Ray Train DDP fit: the library's training step on N workers reading the store with Ray Data.

The glue supplies only rank, device, data shard, reductions and checkpoints; `train_step`,
`TrainerState`, `init_model` and `evaluate` are the in-process fit's. Resume follows Ray Train
V2: rerun with the same run directory (= RunConfig name + storage_path) and the latest
checkpoint is restored; a crashed worker group restarts from it (FailureConfig.max_failures).
"""

from __future__ import annotations

import gc
import json
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import fsspec
import torch

from diffing.config import FitConfig
from diffing.fit import (
    RunDir,
    accepted_hashes,
    config_hash,
    final_metrics,
    finished_fit_error,
    fit_changes,
    init_model,
    load_checkpoint,
    resolve_config,
    store_fingerprint,
    total_steps,
)
from diffing.logs import configure, get_logger
from diffing.store import check_writable, open_store
from diffing.train import FitDiverged, TrainerState, train_step
from jobs.fit_dist import dist_reduce
from jobs.fit_io import (
    DATA_ORDER,
    DIVERGED,
    _absolute,
    _shuffle_seed,
    _store_dataset,
    _write_diverged,
    _write_history,
    _write_outputs,
)
from jobs.rundir import ray_train_storage_problem

# rank 0 rewrites RUN/metrics.jsonl at a logged step once this long has passed since it last did
# (and at every checkpoint), so a fit of hours can be followed (`crossdiff status`, a notebook)
# before it ends; one small atomic PUT each time
METRICS_FLUSH_S = 60.0


def _train_loop(config: dict[str, Any]) -> None:
    """Runs on every Ray Train worker."""
    import ray.train as train
    from ray.train.torch import get_device, prepare_model

    # Ray Train wraps a worker's sys.stderr so that writes also reach its logger, whose console
    # handler writes them to stderr again: every line twice. The process's own stderr, once.
    configure(file=sys.__stderr__)
    cfg = FitConfig.model_validate_json(config["fit"])
    store = open_store(config["store"])
    ctx = train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    tcfg = cfg.train
    per_rank = tcfg.batch_size // world
    steps = config["steps"]
    device = get_device()
    torch.manual_seed(tcfg.seed)

    model = init_model(cfg.crosscoder, store, tcfg.seed, device)  # identical on every rank
    module = prepare_model(model)
    state = TrainerState(model, tcfg, steps, module=module)
    history: list[dict] = []
    ckpt = train.get_checkpoint()
    if ckpt:
        with ckpt.as_directory() as d:
            # weights-only: the bucket's file runs no code; mapped only where the state goes to a GPU
            blob = load_checkpoint(Path(d) / "state.pt", mmap=device.type == "cuda")
            state.load_state_dict(blob["state"])  # while the memory-mapped file is there
            history = blob.get("history", [])
        # the loaded copy (weights and Adam moments: 28 GiB at the Gemma-2-9b shape) must not stay
        # beside the device's for the rest of the run: rank 0 snapshots another at its next checkpoint
        del blob
        gc.collect()
    log = get_logger("fit.ray", rank=rank, world=world)
    if rank == 0:
        log.info(
            "fit.ray.start",
            step=state.step,
            steps=steps,
            per_rank_batch=per_rank,
            device=str(device),
            torch_threads=torch.get_num_threads(),
        )

    def report(final: bool, metrics: dict | None = None) -> None:
        with tempfile.TemporaryDirectory() as tmp:
            checkpoint = None
            # the final report needs none (the weights and metrics.json are written): at the Gemma
            # shape one is 28 GiB uploaded, and it would push a useful one out of num_to_keep
            if rank == 0 and not final:
                torch.save({"state": state.state_dict(), "history": history}, Path(tmp) / "state.pt")
                checkpoint = train.Checkpoint.from_directory(tmp)
            train.report({"final": final, **(metrics or {}), "step": state.step}, checkpoint=checkpoint)

    fs, root = fsspec.core.url_to_fs(config["out"])
    flushed = [time.perf_counter()]

    def flush_metrics(force: bool = False) -> None:
        """The history so far -> metrics.jsonl (rank 0). A resumed run rewrites it from the
        checkpoint's history: lines past the checkpoint's step go, as in the in-process fit."""
        if rank == 0 and (force or time.perf_counter() - flushed[0] >= METRICS_FLUSH_S):
            flushed[0] = time.perf_counter()
            try:  # a file to follow the fit by: a failed upload must not cost a restart of the group
                _write_history(fs, root, history)
            except Exception as e:
                log.warning("fit.metrics_write_failed", error=f"{type(e).__name__}: {e}"[:300])

    # a resume drops the lines of the steps it will redo; a start over, a killed attempt's lines
    flush_metrics(force=True)
    shard = train.get_dataset_shard("train")
    t0, start, data_wait = time.perf_counter(), state.step, 0.0
    epoch = int(state.data_position.get("epoch", 0))
    skip = int(state.data_position.get("batch", 0))
    while state.step < steps:
        it = iter(
            shard.iter_batches(
                batch_size=per_rank,
                batch_format="pyarrow",
                prefetch_batches=cfg.distributed.prefetch_batches,
                drop_last=True,
                local_shuffle_buffer_size=cfg.distributed.shuffle_buffer_rows or None,
                local_shuffle_seed=_shuffle_seed(tcfg.seed, epoch, rank, config.get("data_order", 1))
                if cfg.distributed.shuffle_buffer_rows
                else None,
            )
        )
        for _ in range(skip):  # data position of a resumed run
            next(it, None)
        b = skip
        while state.step < steps:
            tw = time.perf_counter()
            batch = next(it, None)
            data_wait += time.perf_counter() - tw
            # every rank must have a batch, or none steps: no all-reduce waits on a finished rank
            have = dist_reduce(torch.tensor(0.0 if batch is None else 1.0, device=device), "min")
            if have.item() == 0:
                break
            # Arrow batch -> [B, M, D] with the store's own zero-copy reader (Ray's numpy/torch batch
            # formats turn fixed-size lists into object arrays row by row: as slow as the step itself)
            x = torch.from_numpy(store.acts_of(batch)).to(device)
            try:
                metrics = train_step(state, x, reduce=dist_reduce)
            except FitDiverged as e:  # at this step on every rank (its metrics are all-reduced)
                # deterministic: a group restart would diverge again (max_failures times; -1: forever).
                # Ray Train's result keeps only checkpointed reports: the driver reads it from here
                if rank == 0:
                    _write_diverged(fs, f"{root}/{DIVERGED}", str(e), log)
                return
            b += 1
            state.data_position = {"epoch": epoch, "batch": b}
            if state.step % tcfg.log_every == 0 or state.step == steps:
                elapsed = time.perf_counter() - t0
                tps = (state.step - start) * tcfg.batch_size / max(elapsed, 1e-9)
                metrics["tokens_per_s"] = tps
                metrics["elapsed_s"] = round(elapsed, 3)  # since this (re)start's training began
                metrics["data_wait_s"] = round(data_wait, 3)  # of which waiting for the next batch
                history.append(metrics)
                if rank == 0:
                    log.info(
                        "fit.progress",
                        step=f"{state.step}/{steps}",
                        loss=round(metrics["loss"], 4),
                        fve={k[4:]: round(v, 3) for k, v in metrics.items() if k.startswith("fve/")},
                        eta_s=round((steps - state.step) * tcfg.batch_size / max(tps, 1e-9)),
                        l0=round(metrics["l0"], 1),
                        dead=round(metrics["dead_fraction"], 3),
                        tokens_per_s=round(tps),
                        # share of wall time spent waiting for data: near 1 means the input pipeline bounds the fit
                        data_wait=round(data_wait / max(time.perf_counter() - t0, 1e-9), 3),
                    )
                    flush_metrics()
            if state.step % tcfg.checkpoint_every == 0 and state.step < steps:
                flush_metrics(force=True)
                report(final=False, metrics=metrics)
        epoch, skip = epoch + 1, 0
        state.data_position = {"epoch": epoch, "batch": 0}
    train_s = time.perf_counter() - t0

    if rank == 0:
        tps = (state.step - start) * tcfg.batch_size / max(train_s, 1e-9)
        final = final_metrics(model, store, state, tps, history[-1]["loss"] if history else None)
        final["workers"] = world
        final["resumed_from_step"] = start  # 0: trained in one go; else the checkpoint it resumed
        final["device"] = str(device)
        final["autocast"] = "bfloat16" if device.type == "cuda" and tcfg.bf16_autocast else None
        _write_outputs(config["out"], model, final, history)
        log.info("fit.ray.done", **final)
    report(final=True)


def run_fit_ray(
    store_uri: str, cfg: FitConfig, out: str, *, overwrite: bool = False, address: str | None = None
) -> dict:
    """Fit with Ray Train (cfg.distributed.workers >= 1). Same outputs as diffing.fit.fit."""
    import ray.train
    from ray.train.torch import TorchConfig, TorchTrainer

    from cluster.connect import ensure_ray

    # Ray Train runs each worker in its own session directory: relative paths would resolve there
    store_uri, out = _absolute(store_uri), _absolute(out)
    if problem := ray_train_storage_problem(out):
        raise ValueError(f"--out {out}: {problem}")
    log = get_logger("fit.ray", run=out)
    fs, root = fsspec.core.url_to_fs(out)
    store = open_store(store_uri)
    cfg = resolve_config(cfg, store)
    stamp = f"{root}/run_config.json"
    finished = fs.exists(f"{root}/metrics.json") and fs.exists(f"{root}/crosscoder/model.safetensors")
    if not finished and not overwrite and fs.exists(f"{root}/metrics.json"):
        fs.rm(f"{root}/metrics.json")  # weights deleted since: refitted below, and this must be the new one's
    if finished and not overwrite:
        if fs.exists(stamp):  # a finished fit stands only for the settings and data it was made with
            changed = fit_changes(json.loads(fs.cat_file(stamp)), cfg, store.n_rows)
            if changed:
                raise finished_fit_error(out, changed)
        log.info("fit.skip", reason="run already finished; pass --overwrite to redo")
        return json.loads(fs.cat_file(f"{root}/metrics.json"))
    d = cfg.distributed
    if cfg.train.batch_size // max(1, d.workers) > store.n_rows // max(1, d.workers):
        raise ValueError(f"train.batch_size={cfg.train.batch_size} leaves no full batch per worker; lower it")
    check_writable(fs, root, f"run location {out}")  # before any worker starts
    if overwrite:
        for rel in ("ray", "metrics.json", "metrics.jsonl", "crosscoder", "run_config.json"):
            if fs.exists(f"{root}/{rel}"):
                fs.rm(f"{root}/{rel}", recursive=True)
    steps = total_steps(cfg.train, store.n_rows)
    per_epoch = (store.n_rows // d.workers) // (cfg.train.batch_size // d.workers)
    h = config_hash(cfg, distributed=True)
    fp = store_fingerprint(store)
    data_order = DATA_ORDER
    if fs.exists(stamp):
        old = json.loads(fs.cat_file(stamp))
        # a run begun before the data order changed resumes in its own order (it skips the batches
        # it used by position: in another order it would see some rows twice and others never)
        data_order = int(old.get("data_order", 1))
        if old.get("config_hash") not in accepted_hashes(cfg, distributed=True):
            raise ValueError(
                f"{out} holds a run with a different config; use a new --out or pass --overwrite"
            )
        if old.get("store_fingerprint") not in (None, fp):
            raise ValueError(
                f"{out} holds a run fitted on another store ({store_uri} has other shards); use a new "
                "--out or pass --overwrite"
            )
    fs.pipe_file(
        stamp,
        json.dumps(
            {
                "fit": cfg.model_dump(mode="json"),
                "store": store_uri,
                "store_rows": store.n_rows,
                "total_steps": steps,
                "config_hash": h,
                "store_fingerprint": fp,
                "data_order": data_order,
            },
            indent=2,
        ).encode(),
    )
    ensure_ray(address)
    gpus = ray.cluster_resources().get("GPU", 0)
    if d.use_gpu and gpus < d.workers:  # Ray Train waits (and retries) for GPUs an autoscaler may add
        log.warning(
            "fit.ray.waiting_for_gpus",
            want=d.workers,
            cluster_gpus=gpus,
            fix="add GPU nodes (or let the autoscaler), lower distributed.workers, or set distributed.use_gpu=false",
        )
    trainer = TorchTrainer(
        _train_loop,
        train_loop_config={
            "fit": cfg.model_dump_json(),
            "store": store_uri,
            "out": out,
            "steps": steps,
            "data_order": data_order,
        },
        scaling_config=ray.train.ScalingConfig(
            num_workers=d.workers, use_gpu=d.use_gpu, resources_per_worker={"CPU": d.cpus_per_worker}
        ),
        torch_config=TorchConfig(backend="nccl" if d.use_gpu else "gloo"),
        datasets={"train": _store_dataset(store, seed=cfg.train.seed if data_order >= 2 else None)},
        run_config=ray.train.RunConfig(
            name="ray",
            storage_path=out,
            checkpoint_config=ray.train.CheckpointConfig(num_to_keep=d.num_to_keep),
            failure_config=ray.train.FailureConfig(max_failures=d.max_failures),
        ),
    )
    nodes = sum(1 for n in ray.nodes() if n.get("Alive"))
    if "://" not in out and nodes > 1:
        log.warning(
            "fit.ray.local_out",
            out=out,
            nodes=nodes,
            why="rank 0 writes the crosscoder and Ray Train its checkpoints on whichever node it runs",
            fix="use an s3:// (or gs://) --out, or a path every node mounts",
        )
    log.info("fit.ray.submit", workers=d.workers, use_gpu=d.use_gpu, steps=steps, per_epoch=per_epoch)
    if fs.exists(f"{root}/{DIVERGED}"):
        fs.rm(f"{root}/{DIVERGED}")  # an earlier attempt's; this one writes its own
    trainer.fit()
    fs.invalidate_cache(root)  # the workers wrote there: a listing cached before must not answer
    if fs.exists(f"{root}/{DIVERGED}"):
        message = fs.cat_file(f"{root}/{DIVERGED}").decode()
        fs.rm(f"{root}/{DIVERGED}")
        raise FitDiverged(message)
    for rel in ("metrics.json", "crosscoder/model.safetensors"):
        if not fs.exists(f"{root}/{rel}"):
            raise FileNotFoundError(
                f"the fit finished but {out}/{rel} is not here: rank 0 wrote it on its own node. "
                "Give an --out every node reaches (s3://..., gs://..., or a shared mount) and rerun"
            )
    return json.loads(fs.cat_file(f"{root}/metrics.json"))


def in_process_or_ray(
    store_uri: str, cfg: FitConfig, out: str, *, overwrite: bool = False, address: str | None = None
) -> dict:
    """`crossdiff fit`: in-process when distributed.workers == 0, else Ray Train."""
    if cfg.distributed.workers == 0:
        from diffing.fit import fit

        if "://" in out:
            raise ValueError(
                "in-process fit writes a local --out; use distributed.workers >= 1 for object storage"
            )
        return fit(open_store(store_uri), cfg, out, overwrite=overwrite)
    os.environ.setdefault("RAY_TRAIN_V2_ENABLED", "1")
    return run_fit_ray(store_uri, cfg, out, overwrite=overwrite, address=address)


__all__ = ["RunDir", "dist_reduce", "in_process_or_ray", "run_fit_ray"]
