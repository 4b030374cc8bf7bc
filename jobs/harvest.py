"""Ray Data harvest: shard a prompt corpus over an actor pool that writes paired activations.

Each actor loads every model once (`Harvester`), takes whole shards (deterministic prompt
ranges), writes each shard to the store itself (atomically) and returns only small metadata.
Finished shards are skipped, so a killed run resumes where it stopped; the manifest is written
at the end, with normalisation statistics gathered from the shard sidecars.
"""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import fsspec

from diffing.corpus import read_corpus
from diffing.harvest import HarvestConfig, shard_ranges, unpinned_as_before
from diffing.logs import get_logger
from diffing.models import HarvestInputError, load_hint, load_tokenizer
from diffing.store import Manifest, StoreError, check_writable
from diffing.store.format import atomic_write
from diffing.tokens import check_tokenizers_agree, check_vocab, render, share_chat_template
from jobs.harvest_actor import HarvestActor, _writer, check_assigned_gpu, shards_per_call  # noqa: F401 (re-exported)
from jobs.harvest_shards import (
    models_changed,
    outlier_totals,
    resolved_dtypes,
    resolved_model_stamps,
    resolved_revisions,
    resolved_tokenizers,
)
from jobs.harvest_stamp import _config_hash, _finished_as_stamped, _records_hash, _stamp_changes  # noqa: F401


def preflight(cfg: HarvestConfig, records: list[dict[str, Any]]) -> int:
    """Checks that need no model weights: layer range, widths, every record through the chat template,
    tokenizers agree, store writable. -> d_model."""
    from transformers import AutoConfig

    widths, names, vocab = set(), [m.name for m in cfg.models], {}
    for spec in cfg.models:
        try:
            mc = AutoConfig.from_pretrained(
                spec.path,
                trust_remote_code=spec.trust_remote_code,
                **({"revision": spec.revision} if spec.revision else {}),
            )
        except (OSError, ValueError) as e:
            raise HarvestInputError(
                f"models: cannot load {spec.path!r} ({spec.name}): {e}{load_hint(spec.path, e)}"
            ) from None
        mc = getattr(mc, "text_config", mc)
        if str(getattr(mc, "model_type", "")).startswith("gemma3n"):  # see residual_after_layer
            raise HarvestInputError(
                f"models: {spec.name!r} is a Gemma 3n ({spec.path}), whose layers carry 4 stacked AltUp "
                "streams, not one residual stream; crossdiff cannot harvest it"
            )
        n = mc.num_hidden_layers
        if cfg.layer >= n:
            raise HarvestInputError(
                f"layer={cfg.layer} is out of range: model {spec.name!r} has {n} decoder layers (0..{n - 1})"
            )
        widths.add(mc.hidden_size)
        vocab[spec.name] = getattr(mc, "vocab_size", None)
        positions = getattr(mc, "max_position_embeddings", None) or getattr(mc, "n_positions", None)
        if positions and cfg.context_length > positions:
            raise HarvestInputError(
                f"context_length={cfg.context_length} exceeds model {spec.name!r}'s {positions} positions; "
                f"set context_length <= {positions}"
            )
    if len(widths) != 1:
        raise HarvestInputError(
            f"models have different hidden sizes {sorted(widths)}; a crosscoder needs one d_model"
        )
    tokenizers = [load_tokenizer(m.path, m.revision, m.trust_remote_code) for m in cfg.models]
    share_chat_template(tokenizers, names)  # chats are rendered once, by the first model's template
    for record in records:  # every chat through that template, before any shard runs
        render(record, tokenizers[0])
    sample = agreement_sample(records)
    check_tokenizers_agree(tokenizers, sample, names, cfg.context_length)
    check_vocab(tokenizers[0], sample, vocab, cfg.context_length)
    d_model = widths.pop()
    w = _writer(cfg, d_model)
    check_writable(w.fs, w.root, f"store={cfg.store}")
    return d_model


def agreement_sample(records: list[dict[str, Any]], n: int = 4096) -> list[dict[str, Any]]:
    """The records whose tokens every model must agree on before any shard runs: all of a corpus of
    up to ``n``, else ``n`` spread evenly over it (each shard checks its own records again)."""
    if len(records) <= n:
        return records
    step = len(records) / n
    return [records[int(i * step)] for i in range(n)]


def _absolute(cfg: HarvestConfig) -> HarvestConfig:
    """Local store and model paths made absolute: Ray workers need not share the driver's cwd."""
    models = [
        m.model_copy(update={"path": str(Path(m.path).resolve())})
        if "://" not in m.path and Path(m.path).exists()
        else m
        for m in cfg.models
    ]
    store = cfg.store if "://" in cfg.store else str(Path(cfg.store).resolve())
    return cfg.model_copy(update={"models": type(cfg.models)(models), "store": store})


def run_harvest(
    cfg: HarvestConfig,
    *,
    overwrite: bool = False,
    address: str | None = None,
    on_cleared: Callable[[], None] | None = None,
) -> Manifest:
    """Harvest the corpus into cfg.store with Ray Data; resumable and idempotent. `on_cleared`: called
    once an overwrite has removed the old store (after every check passed). The store is held
    meanwhile (jobs.runlock): two pipelines sharing it would clear, or remove the temp files of,
    each other's shards; the second is refused and, rerun later, finds the store complete."""
    from jobs.rundir import default_work_dir
    from jobs.runlock import hold_run

    cfg = _absolute(cfg)
    fs, root = fsspec.core.url_to_fs(cfg.store)
    check_writable(fs, root.rstrip("/"), f"store={cfg.store}")  # before its lease: the clear message
    where = (default_work_dir(cfg.store), cfg.store) if "://" in cfg.store else (Path(cfg.store), None)
    with hold_run(*where, command="crossdiff harvest"):
        return _run_harvest(cfg, overwrite=overwrite, address=address, on_cleared=on_cleared)


def _run_harvest(
    cfg: HarvestConfig, *, overwrite: bool, address: str | None, on_cleared: Callable[[], None] | None
) -> Manifest:
    import ray

    from cluster.connect import ensure_ray
    from jobs.stamps import corpus_stamp

    cfg = _absolute(cfg)
    log = get_logger("harvest", store=cfg.store)
    version = corpus_stamp(cfg.corpus.uri, cfg.corpus.format)  # before the read: the version it reads
    if not overwrite and version and (finished := _finished_as_stamped(cfg, version)) is not None:
        log.info(
            "harvest.skip", reason="store complete from this corpus and config; pass --overwrite to redo"
        )
        return finished
    records = read_corpus(cfg.corpus)
    d_model = preflight(cfg, records)
    writer = _writer(cfg, d_model)
    stamp = f"{writer.root}/harvest_config.json"
    records_hash = _records_hash(records)
    h = _config_hash(cfg, records_hash)
    if overwrite:
        if writer.fs.exists(stamp):  # first: a clear cut short must not look like an untouched store
            writer.fs.rm(stamp)
        writer.clear()
        if on_cleared is not None:
            on_cleared()
    elif writer.fs.exists(stamp):
        try:
            old = json.loads(writer.fs.cat_file(stamp))
        except ValueError:
            raise StoreError(
                f"{stamp} is unreadable (cut short by a kill?); it names the config the store's shards were "
                "made with: rerun with --overwrite to redo the store (or delete the file only if you know "
                "the shards come from this same config)"
            ) from None
        old_cfg = cfg.model_dump(mode="json", exclude={"ray", "device"})
        old_cfg["models"] = [unpinned_as_before(m) for m in old_cfg["models"]]
        legacy = hashlib.sha256(  # stamps written before the hash left paths out (2026-11-26)
            json.dumps(old_cfg, sort_keys=True).encode()
        ).hexdigest()[:16]
        begun = writer.begun()
        if old.get("hash") not in (h, legacy) and not begun:
            # stamped, then stopped before its first shard (no Ray at --address, say): nothing of
            # the old config to keep apart, so this harvest starts the store under its own
            log.info("harvest.restamp", reason="no shard was written under the stamped config")
        elif old.get("hash") not in (h, legacy):
            what = _stamp_changes(
                old.get("config"), cfg, old.get("records_sha256") not in (None, records_hash)
            )  # stamps before 2026-12-06 hold no records hash: nothing to say of the records
            raise StoreError(
                f"store {cfg.store} was harvested with a different config{what}; pass --overwrite to redo it "
                "or pick a new store"
            )
        if writer.has_manifest():
            from diffing.store import open_store

            manifest = open_store(cfg.store).manifest
            if changed := models_changed(manifest.metadata, cfg.models):
                raise StoreError(
                    f"store {cfg.store} was harvested from other contents of {', '.join(changed)}: the "
                    "directory was rewritten since (a retrained checkpoint at the same path?); pass "
                    "--overwrite to harvest the models as they are now, or pick a new store"
                )
            log.info("harvest.skip", reason="store complete; pass --overwrite to redo")
            return manifest
    elif writer.begun():
        raise StoreError(  # not this harvest's: resuming would adopt rows of unknown origin
            f"store {cfg.store} already holds a store that no harvest stamped (no harvest_config.json); "
            "pass --overwrite to replace it or pick a new store"
        )
    shards = shard_ranges(len(records), cfg.prompts_per_shard)
    # whole or not at all: a kill mid-write must not leave a stamp no rerun can read
    atomic_write(
        writer.fs,
        stamp,
        # records_sha256: the corpus content (a store can be checked against a corpus file later);
        # records, shards: what the finished harvest holds (`crossdiff status` counts against them)
        json.dumps(
            {
                "hash": h,
                "config": cfg.model_dump(mode="json"),
                "records_sha256": records_hash,
                "corpus_stamp": version,  # the file's version: a rerun of a finished store skips the read
                "records": len(records),
                "shards": len(shards),
            },
            indent=2,
        ).encode(),
    )
    if removed := writer.remove_temp_files():  # shard writes a killed run left unfinished
        log.info("harvest.temp_removed", files=removed)

    done = {
        sid: info for sid, info in writer.done_shards([s for s, _, _ in shards]).items() if info is not None
    }
    todo = [(sid, a, b) for sid, a, b in shards if sid not in done]
    if todo and done:  # a resume: shards over a rewritten model directory would be refused at the end
        stamps = {"model_stamps": resolved_model_stamps(list(done.values()))}
        if changed := models_changed(stamps, cfg.models):
            raise StoreError(
                f"store {cfg.store}'s finished shards were computed from other contents of "
                f"{', '.join(changed)}: the directory was rewritten since; pass --overwrite to harvest "
                "the models as they are now, or pick a new store"
            )
    log.info(
        "harvest.start",
        records=len(records),
        shards=len(shards),
        todo=len(todo),
        d_model=d_model,
        layer=cfg.layer,
    )
    if todo:
        ensure_ray(address)
        from ray.data import ActorPoolStrategy

        # harvest.shard lines count the shards with an ETA: Ray Data's own progress lines (every
        # 10 s where stdout is no terminal: jobs, the demo's log) would only add noise beside them
        ctx = ray.data.DataContext.get_current()
        ctx.enable_progress_bars = False
        # an actor's own error (a StoreError, a model that cannot load) reaches this driver as itself,
        # not as a UserCodeException whose cause was lost on the way: it keeps its one-line message
        ctx.raise_original_map_exception = True
        items = [{"shard_id": sid, "start": a, "records": json.dumps(records[a:b])} for sid, a, b in todo]
        del records  # the shards' JSON holds them now; the parsed corpus is several times larger
        actors = min(cfg.ray.num_actors, len(todo))  # a resume with few shards left loads fewer models
        ds = ray.data.from_items(items, override_num_blocks=len(items))
        del items  # in Ray's object store now
        out = ds.map_batches(
            HarvestActor,
            fn_constructor_kwargs={"cfg_json": cfg.model_dump_json(), "d_model": d_model},
            batch_size=shards_per_call(len(todo), actors, cfg.ray.write_threads),
            # one call queued per actor: a call holds several shards, so the actors that load
            # their models first must not take the calls the slower ones would get
            compute=ActorPoolStrategy(size=actors, max_tasks_in_flight_per_actor=1),
            num_cpus=cfg.ray.num_cpus_per_actor,
            num_gpus=cfg.ray.num_gpus_per_actor,
        )
        t0, done, rows, toks = time.perf_counter(), 0, 0, 0
        for r in out.iter_rows():
            done += 1
            rows += int(r["n_rows"])
            toks += int(r["n_tokens"])
            el = time.perf_counter() - t0
            log.info(
                "harvest.shard",
                shard=r["shard_id"],
                done=f"{done}/{len(todo)}",
                rows=int(r["n_rows"]),
                outliers_dropped=int(r["n_outliers"]),
                # this shard on its actor (steady state) / all shards so far over wall time (incl. start-up)
                shard_tokens_per_s=round(int(r["n_tokens"]) / max(float(r["seconds"]), 1e-9)),
                tokens_per_s=round(toks / max(el, 1e-9)),
                eta_s=round(el / done * (len(todo) - done)),
            )
    found = writer.done_shards([sid for sid, _, _ in shards])
    missing = [sid for sid, info in found.items() if info is None]
    if missing:
        raise StoreError(f"{len(missing)} shards did not finish (first: {missing[0]}); rerun to resume")
    infos = list(found.values())
    dtypes, revisions = resolved_dtypes(infos), resolved_revisions(infos)
    stamps, tokenizers = resolved_model_stamps(infos), resolved_tokenizers(infos)
    meta = {
        **({"resolved_dtypes": dtypes} if dtypes else {}),
        **({"revisions": revisions} if revisions else {}),
        **({"model_stamps": stamps} if stamps else {}),
        **({"tokenizers": tokenizers} if tokenizers else {}),
        **outlier_totals(infos, log),
    }
    manifest = writer.finalize(infos, metadata=meta or None)
    log.info(
        "harvest.done",
        rows=manifest.n_rows,
        shards=len(manifest.shards),
        mean_norms=[round(x, 2) for x in manifest.mean_norms],
    )
    return manifest
