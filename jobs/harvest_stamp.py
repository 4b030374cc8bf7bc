"""A store's stamp (STORE/harvest_config.json): what the harvest that made it read and how,
so a rerun knows whether the store is its own, what changed if not, and whether a finished store
can be taken as it is without reading the corpus again."""

from __future__ import annotations

import hashlib
import json
from typing import Any

import fsspec

from diffing.harvest import HarvestConfig, unpinned_as_before
from diffing.store import Manifest, StoreError
from jobs.harvest_shards import models_changed


def _stamp_changes(old: Any, cfg: HarvestConfig, corpus_changed: bool) -> str:
    """ " (field: old -> new, ...)" for the settings that decide the rows, from the stamp's config."""
    if not isinstance(old, dict):
        return ""
    skip = {"ray", "device", "store"}
    now = cfg.model_dump(mode="json")
    now["models"] = [unpinned_as_before(m) for m in now["models"]]  # stamps made before those fields
    if isinstance(old.get("models"), list):
        old = {**old, "models": [unpinned_as_before(m) if isinstance(m, dict) else m for m in old["models"]]}
    changed = [
        f"{k}: {json.dumps(old.get(k))} -> {json.dumps(now[k])}"
        for k in sorted(now)
        if k not in skip and k != "corpus" and old.get(k) != now[k]
    ]
    if corpus_changed:
        changed.append("corpus: other records")
    return f" ({'; '.join(changed)})"[:600] if changed else ""


def _finished_as_stamped(cfg: HarvestConfig, version: str) -> Manifest | None:
    """A finished store whose stamp names this version of the corpus files and, with the records
    hash it recorded, this config: its manifest, without reading the corpus (a rerun over millions
    of records parsed and hashed them for minutes to find nothing to do). Anything else (an older
    stamp, other files, models rewritten since) takes the full path, which names the difference."""
    from diffing.store import open_store

    fs, root = fsspec.core.url_to_fs(cfg.store)
    try:
        old = json.loads(fs.cat_file(f"{root.rstrip('/')}/harvest_config.json"))
    except (FileNotFoundError, ValueError):
        return None
    if not isinstance(old, dict) or old.get("corpus_stamp") != version or not old.get("records_sha256"):
        return None
    if old.get("hash") != _config_hash(cfg, old["records_sha256"]):
        return None
    try:
        manifest = open_store(cfg.store).manifest
    except StoreError:
        return None  # not finished: a resume needs the records
    return None if models_changed(manifest.metadata, cfg.models) else manifest


def _records_hash(records: list[dict[str, Any]]) -> str:
    """The corpus records' content (sha256), whatever file they were read from: the digest of
    ``json.dumps(records, sort_keys=True, default=str)``, fed one record at a time (the whole
    string held twice the corpus in memory: 12 GiB at 2M records)."""
    h = hashlib.sha256(b"[")
    for i, r in enumerate(records):
        if i:
            h.update(b", ")
        h.update(json.dumps(r, sort_keys=True, default=str).encode())
    h.update(b"]")
    return h.hexdigest()


def _config_hash(cfg: HarvestConfig, records_hash: str) -> str:
    """What determines the rows: the settings and the corpus records themselves. Not the actor pool
    or the device, nor where the store and the corpus file are named from (a relative and an
    absolute path to the same store, or a copied corpus, are the same harvest)."""
    rel = cfg.model_dump(mode="json", exclude={"ray": True, "device": True, "store": True, "corpus": {"uri"}})
    rel["models"] = [unpinned_as_before(m) for m in rel["models"]]
    rel["records"] = records_hash
    return hashlib.sha256(json.dumps(rel, sort_keys=True).encode()).hexdigest()[:16]
