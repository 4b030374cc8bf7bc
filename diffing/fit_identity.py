"""What makes two crosscoder fits the same fit: the settings a checkpoint must match to resume
(config_hash), those a finished fit must match to stand for a config (fit_changes), and the data
(store_fingerprint). Logging, checkpointing, the device and Ray Train's restarts and read-ahead
never count; a Ray Train fit's workers and shuffle buffer do (which rows each rank sees)."""

from __future__ import annotations

import hashlib

from diffing.config import FitConfig
from diffing.store import ActivationStore

NO_EFFECT_TRAIN = {"log_every", "checkpoint_every", "device"}  # the weights do not depend on them


# Ray Train settings without an effect on the weights: restarts, CPUs per worker, checkpoints kept,
# read-ahead (workers and the shuffle buffer decide which rows a rank sees: they count)
NO_EFFECT_DISTRIBUTED = {"max_failures", "cpus_per_worker", "num_to_keep", "prefetch_batches"}


def config_hash(cfg: FitConfig, *, distributed: bool = False, _ignore: set | None = None) -> str:
    """What a checkpoint must match to be resumed: every setting with an effect on the weights.
    Logging, checkpointing and the device are left out (a GPU fit resumes on a CPU), and so is the
    ``distributed`` section unless ``distributed`` (Ray Train: workers shard the data), and then
    its settings without an effect (NO_EFFECT_DISTRIBUTED)."""
    exclude: dict = {"train": NO_EFFECT_TRAIN}
    exclude["distributed"] = (NO_EFFECT_DISTRIBUTED if _ignore is None else _ignore) if distributed else True
    return hashlib.sha256(cfg.model_dump_json(exclude=exclude).encode()).hexdigest()[:16]


def accepted_hashes(cfg: FitConfig, *, distributed: bool = False) -> tuple[str, ...]:
    """Checkpoint hashes a resume accepts: today's, and those of checkpoints written before
    2026-12-06 (every setting) and on that day (only max_failures left out of `distributed`)."""
    older = config_hash(cfg, distributed=True, _ignore={"max_failures"}) if distributed else None
    legacy = cfg
    if distributed:  # the stamp of a Ray fit hashed its config with max_failures set to 0
        legacy = cfg.model_copy(
            update={"distributed": cfg.distributed.model_copy(update={"max_failures": 0})}
        )
    return tuple(
        h for h in (config_hash(cfg, distributed=distributed), older, legacy_config_hash(legacy)) if h
    )


def store_fingerprint(store: ActivationStore) -> str:
    """The store's content (its shards' sha256 in order): a fit resumes only on the data it began
    on (another store of the same shape and size would otherwise be mixed in silently)."""
    return manifest_fingerprint(store.manifest)


def manifest_fingerprint(manifest) -> str:
    """store_fingerprint from a store's manifest alone."""
    return hashlib.sha256("\n".join(s.sha256 for s in manifest.shards).encode()).hexdigest()[:16]


def legacy_config_hash(cfg: FitConfig) -> str:
    """The hash of every setting, as checkpoints before 2026-12-06 carry."""
    return hashlib.sha256(cfg.model_dump_json().encode()).hexdigest()[:16]


def effective_distributed(cfg: FitConfig) -> dict | None:
    """The Ray Train settings that decide which rows each rank sees, in what order (the workers
    and their shuffle buffer): None for an in-process fit (workers 0), whose weights none of them
    touch. GPUs or CPUs count as the in-process device does: not at all (a finished fit stands on
    either; they change float detail, as metrics.json records), though a checkpoint resumes only
    on its own kind (config_hash)."""
    d = cfg.distributed
    return d.model_dump(mode="json", exclude=NO_EFFECT_DISTRIBUTED | {"use_gpu"}) if d.workers > 0 else None


def fit_changes(old: dict, cfg: FitConfig, store_rows: int | None) -> list[str]:
    """What differs between a run's run_config.json (``old``) and the resolved ``cfg`` on a store
    of ``store_rows`` rows (None: not compared); settings without effect on the result (logging,
    checkpointing, device, Ray Train's restarts and read-ahead; every Ray Train setting of an
    in-process fit, and the in-process shuffle buffer of a Ray Train one) do not count. The DDP
    workers do: they decide which rows each rank sees. A stamp this crossdiff cannot read gives no
    changes."""
    try:
        was_cfg = FitConfig.model_validate(old["fit"])
    except (KeyError, TypeError, ValueError):
        return []
    train_skip = set(NO_EFFECT_TRAIN)
    if was_cfg.distributed.workers > 0 and cfg.distributed.workers > 0:
        train_skip.add("shuffle_buffer_rows")  # the in-process reader's: Ray Train uses its own
    skip = {"distributed": True, "train": train_skip}
    was_d, now_d = effective_distributed(was_cfg), effective_distributed(cfg)
    if was_d is None or now_d is None:
        dist = [] if was_d == now_d else ["distributed.workers"]
    else:
        dist = [f"distributed.{k}" for k in now_d if was_d.get(k) != now_d[k]]
    was = was_cfg.model_dump(exclude=skip)
    now = cfg.model_dump(exclude=skip)
    changed = (
        sorted(
            f"{sec}.{k}"
            for sec in now
            if isinstance(now[sec], dict)
            for k in now[sec]
            if was[sec].get(k) != now[sec][k]
        )
        + dist
    )
    if store_rows is not None and old.get("store_rows") not in (None, store_rows):
        changed.append(f"store rows {old['store_rows']} -> {store_rows}")
    return changed


def finished_fit_error(where: str, changed: list[str]) -> ValueError:
    return ValueError(
        f"{where} holds a finished fit with other settings or data ({', '.join(changed)}); "
        "use a new --out or pass --overwrite"
    )
