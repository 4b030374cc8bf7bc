"""In-process crosscoder fitting over an activation store (the Ray Train path reuses these pieces).

RUN/crosscoder/{model.safetensors,cfg.json}   the fitted crosscoder
RUN/run_config.json                           resolved FitConfig + store provenance
RUN/metrics.jsonl                             one line per logged step
RUN/metrics.json                              final evaluation (written last: marks the run done)
RUN/checkpoints/step_*.pt                     resumable TrainerState (rerun the same command)
"""

from __future__ import annotations

import importlib
import json
import math
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from diffing.config import CrosscoderConfig, FitConfig, TrainConfig
from diffing.crosscoder import Crosscoder, norm_scale_from_mean_norms
from diffing.fit_identity import (  # noqa: F401  (re-exported: jobs/ and tests import them from here)
    NO_EFFECT_DISTRIBUTED,
    NO_EFFECT_TRAIN,
    accepted_hashes,
    config_hash,
    effective_distributed,
    finished_fit_error,
    fit_changes,
    legacy_config_hash,
    manifest_fingerprint,
    store_fingerprint,
)
from diffing.logs import get_logger
from diffing.models import resolve_device
from diffing.prefetch import prefetch
from diffing.store import ActivationStore, StoreError
from diffing.train import TrainerState, evaluate, train_step


def resolve_config(cfg: FitConfig, store: ActivationStore) -> FitConfig:
    """Fill data-dependent fields from the store; clear errors when they disagree."""
    m = store.manifest
    cc = cfg.crosscoder.resolve(n_models=m.n_models, d_model=m.d_model, model_names=tuple(m.model_names))
    if cfg.train.batch_size > m.n_rows:
        raise ValueError(
            f"train.batch_size={cfg.train.batch_size} exceeds the store's {m.n_rows} rows; lower train.batch_size"
        )
    return cfg.model_copy(update={"crosscoder": cc})


def total_steps(tcfg: TrainConfig, n_rows: int) -> int:
    return tcfg.steps or max(1, int(math.floor(tcfg.epochs * (n_rows // tcfg.batch_size))))


def init_model(cc: CrosscoderConfig, store: ActivationStore, seed: int, device: torch.device) -> Crosscoder:
    """Seeded init, normalisation scales from the manifest, b_dec at the geometric median of a sample."""
    model = Crosscoder(cc, seed=seed)
    model.norm_scale.copy_(norm_scale_from_mean_norms(store.manifest.mean_norms, cc.d_model))
    sample, _ = store.load(max_rows=8192)
    model.init_b_dec(model.normalise(sample))
    return model.to(device)


def pick_device(tcfg: TrainConfig) -> torch.device:
    return resolve_device(tcfg.device, "train.device")


class RunDir:
    """Paths and atomic writes of a fit run."""

    def __init__(self, path: str | Path):
        self.path = Path(path)

    def __truediv__(self, rel: str) -> Path:
        return self.path / rel

    @property
    def done(self) -> bool:
        cc = self.path / "crosscoder"
        return all(
            q.exists() for q in (self.path / "metrics.json", cc / "cfg.json", cc / "model.safetensors")
        )

    def write_json(self, rel: str, obj: Any) -> None:
        p = self.path / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        tmp = p.with_suffix(p.suffix + ".tmp")
        tmp.write_text(json.dumps(obj, indent=2, default=str))
        tmp.replace(p)

    def checkpoints(self) -> list[Path]:
        return sorted((self.path / "checkpoints").glob("step_*.pt"))

    def save_checkpoint(self, state: TrainerState, cfg_hash: str, keep: int = 2, store: str = "") -> None:
        d = self.path / "checkpoints"
        d.mkdir(parents=True, exist_ok=True)
        p = d / f"step_{state.step:09d}.pt"
        tmp = p.with_suffix(".tmp")
        torch.save({"state": state.state_dict(), "config_hash": cfg_hash, "store": store}, tmp)
        tmp.replace(p)
        for old in self.checkpoints()[:-keep]:
            old.unlink(missing_ok=True)


def _check_same_fit(run: RunDir, cfg: FitConfig, store: ActivationStore) -> None:
    """A finished run is returned as is only for the config and store it was fitted with (else the
    old results would pass for the new ones). Runs without run_config.json, or written by a
    crossdiff whose fields this one does not know, pass."""
    p = run / "run_config.json"
    if not p.exists():
        return
    changed = fit_changes(json.loads(p.read_text()), cfg, store.n_rows)
    if changed:
        raise finished_fit_error(str(run.path), changed)


def load_checkpoint(path: str | Path, *, mmap: bool = True) -> dict:
    """A training checkpoint (tensors, numbers, strings, numpy's RNG state) read with torch's
    weights-only unpickler: one written into the run's bucket by someone else cannot run code. Onto
    the CPU. `mmap`: mapped, for a state copied to a GPU (apply it before the file goes); not for a
    CPU fit, whose optimiser would keep the mapped Adam moments (and a rotated-out file's blocks)."""
    import numpy as np

    allowed = [np.ndarray, np.dtype, type(np.dtype(np.uint32))]  # np.random.get_state()'s key array
    for mod in ("numpy._core.multiarray", "numpy.core.multiarray"):
        try:
            allowed.append(importlib.import_module(mod)._reconstruct)
        except (ImportError, AttributeError):
            pass
    with torch.serialization.safe_globals(allowed):
        if not mmap:
            return torch.load(path, weights_only=True, map_location="cpu")
        try:  # memory-mapped: tensors are read as they are copied into the model and optimiser,
            # not all at once (a Gemma-shape checkpoint is ~30 GB, and every rank of a node loads one)
            return torch.load(path, weights_only=True, map_location="cpu", mmap=True)
        except RuntimeError as e:
            if "mmap" not in str(e) and "zip" not in str(e):
                raise
            return torch.load(path, weights_only=True, map_location="cpu")  # a legacy (non-zip) file


def _latest_checkpoint(run: RunDir, log, *, mmap: bool = False) -> dict | None:
    """The newest checkpoint that loads; one that does not (cut short, corrupted) is reported and
    the one before it used. None: no checkpoints."""
    ckpts = run.checkpoints()
    for path in reversed(ckpts):
        try:
            return load_checkpoint(path, mmap=mmap)
        except Exception as e:  # torch raises RuntimeError, EOFError, pickle or zip errors
            log.warning("fit.checkpoint_unreadable", file=str(path), error=f"{type(e).__name__}: {e}"[:200])
    if ckpts:
        raise StoreError(
            f"no checkpoint in {run.path / 'checkpoints'} can be read ({', '.join(p.name for p in ckpts)}); "
            "delete that folder to refit from the start, or pass --overwrite"
        )
    return None


def _trim_metrics_log(path: Path, step: int) -> None:
    """Keep the training log's lines up to `step` (where the fit resumes); a torn last line goes."""
    if not path.exists():
        return
    kept = []
    for line in path.read_text().splitlines():
        try:
            rec = json.loads(line)
        except ValueError:
            continue
        if isinstance(rec, dict) and rec.get("step", 0) <= step:
            kept.append(line + "\n")
    tmp = path.with_suffix(".jsonl.tmp")
    tmp.write_text("".join(kept))
    tmp.replace(path)


def fit(
    store: ActivationStore, cfg: FitConfig, out: str | Path, *, overwrite: bool = False
) -> dict[str, Any]:
    """Train a crosscoder on `store` and write the run to `out`. Idempotent: a finished run is
    returned as is (pass overwrite=True to redo); an interrupted one resumes from its checkpoint."""
    run = RunDir(out)
    log = get_logger("fit", run=str(run.path))
    if run.done and not overwrite:
        _check_same_fit(run, resolve_config(cfg, store), store)
        log.info("fit.skip", reason="run already finished; pass --overwrite to redo")
        return json.loads((run / "metrics.json").read_text())
    if overwrite:
        for p in [*run.checkpoints(), run / "metrics.json", run / "metrics.jsonl"]:
            p.unlink(missing_ok=True)
    try:
        run.path.mkdir(parents=True, exist_ok=True)
        probe = run / ".write-test"
        probe.write_text("ok")
        probe.unlink()
    except OSError as e:
        raise StoreError(f"cannot write to run directory {run.path}: {e}") from None

    cfg = resolve_config(cfg, store)
    tcfg = cfg.train
    torch.manual_seed(tcfg.seed)
    np.random.seed(tcfg.seed)
    device = pick_device(tcfg)
    model = init_model(cfg.crosscoder, store, tcfg.seed, device)
    steps = total_steps(tcfg, store.n_rows)
    state = TrainerState(model, tcfg, steps)
    h, fp = config_hash(cfg), store_fingerprint(store)
    for tmp in (run / "checkpoints").glob("*.tmp"):  # a save a kill cut short
        tmp.unlink(missing_ok=True)
    blob = _latest_checkpoint(run, log, mmap=device.type == "cuda")
    if blob is not None:
        if blob["config_hash"] not in accepted_hashes(cfg):
            raise ValueError(
                f"{run.path} holds checkpoints of a different config; use a new --out or pass --overwrite"
            )
        if blob.get("store") not in (None, "", fp):
            raise ValueError(
                f"{run.path} holds checkpoints of a fit on another store ({store.uri} has other shards); "
                "use a new --out or pass --overwrite"
            )
        state.load_state_dict(blob["state"])
        del blob  # the loaded copy must not stay beside the model's for the rest of the run
        log.info("fit.resume", step=state.step, of=steps)
    _trim_metrics_log(run / "metrics.jsonl", state.step)  # lines past the resumed step come again
    run.write_json(
        "run_config.json",
        {
            "fit": cfg.model_dump(mode="json"),
            "store": store.uri,
            "store_rows": store.n_rows,
            "total_steps": steps,
        },
    )
    log.info(
        "fit.start",
        n_latents=cfg.crosscoder.n_latents,
        kind=cfg.crosscoder.kind,
        k=cfg.crosscoder.k,
        steps=steps,
        batch_size=tcfg.batch_size,
        device=str(device),
    )

    per_epoch = store.batches_per_epoch(tcfg.batch_size)
    t0 = time.perf_counter()
    start_step = state.step
    metrics: dict[str, Any] = {}
    with open(run / "metrics.jsonl", "a") as mlog:
        while state.step < steps:
            epoch, skip = divmod(state.step, per_epoch)
            batches = store.iter_batches(
                tcfg.batch_size,
                seed=tcfg.seed,
                epoch=epoch,
                buffer_rows=tcfg.shuffle_buffer_rows,
                skip_batches=skip,
            )
            read_ahead = prefetch(batches, cfg.distributed.prefetch_batches, pin=device.type == "cuda")
            try:
                for xb in read_ahead:
                    metrics = train_step(state, xb)
                    state.data_position = {"epoch": epoch, "batch": state.step - epoch * per_epoch}
                    if state.step % tcfg.log_every == 0 or state.step == steps:
                        elapsed = time.perf_counter() - t0
                        tps = (state.step - start_step) * tcfg.batch_size / max(elapsed, 1e-9)
                        eta = (steps - state.step) * tcfg.batch_size / max(tps, 1e-9)
                        metrics["elapsed_s"] = round(elapsed, 3)  # since this (re)start's training began
                        mlog.write(json.dumps(metrics) + "\n")
                        mlog.flush()
                        log.info(
                            "fit.progress",
                            step=f"{state.step}/{steps}",
                            loss=round(metrics["loss"], 4),
                            fve={k[4:]: round(v, 3) for k, v in metrics.items() if k.startswith("fve/")},
                            l0=round(metrics["l0"], 1),
                            dead=round(metrics["dead_fraction"], 3),
                            tokens_per_s=round(tps),
                            eta_s=round(eta),
                        )
                    if state.step % tcfg.checkpoint_every == 0 and state.step < steps:
                        run.save_checkpoint(state, h, keep=cfg.distributed.num_to_keep, store=fp)
                    if state.step >= steps:
                        break
            finally:  # the reader thread stops now (also on an error), not when collected
                read_ahead.close()
    train_s = time.perf_counter() - t0
    trained_tokens = (state.step - start_step) * tcfg.batch_size

    model.save(run / "crosscoder")
    final = final_metrics(model, store, state, trained_tokens / max(train_s, 1e-9), metrics.get("loss"))
    final["resumed_from_step"] = start_step  # 0: trained in one go; else the checkpoint it resumed
    final["device"] = str(device)  # not in the fit's identity, so recorded: it changes float detail
    final["autocast"] = "bfloat16" if device.type == "cuda" and tcfg.bf16_autocast else None
    run.write_json("metrics.json", final)
    for p in run.checkpoints():  # the finished run is its own checkpoint now
        p.unlink(missing_ok=True)
    log.info("fit.done", **final)
    return final


def final_metrics(
    model: Crosscoder, store: ActivationStore, state: TrainerState, tokens_per_s: float, last_loss
) -> dict:
    """Batch-independent evaluation plus run totals: the content of RUN/metrics.json."""
    model.eval()
    ev = evaluate(
        model,
        store.iter_batches(
            min(4096, state.cfg.batch_size * 4),
            shuffle=False,
            drop_last=False,
            shard_indices=store.shards_for_sample(state.cfg.eval_tokens),
        ),
        max_tokens=state.cfg.eval_tokens or None,
    )
    log = get_logger("fit")
    if flat := [m for m, v in ev["fve"].items() if v != v]:  # NaN: no variance to explain
        log.warning(
            "fit.constant_model", models=flat, note="these models' activations do not vary in the store"
        )
    if ev["dead_fraction"] >= 1.0:
        log.warning("fit.all_dead", note="no latent fired on the evaluation tokens; check the activations")
    if poor := {m: round(v, 4) for m, v in ev["fve"].items() if v < 0}:  # worse than the mean vector
        log.warning(
            "fit.negative_fve",
            fve=poor,
            note="the reconstruction is worse than predicting each model's mean activation: the fit "
            "failed (train.lr too high? too few steps?); its latents mean nothing",
        )
    return {
        "fve": ev["fve"],
        "l0": ev["l0"],
        "dead_fraction": ev["dead_fraction"],
        "eval_tokens": ev["eval_tokens"],
        "tokens_seen": state.tokens_seen,
        "tokens_per_s": tokens_per_s,
        "steps": state.step,
        "threshold": float(model.threshold),
        "final_train_loss": last_loss,
    }
