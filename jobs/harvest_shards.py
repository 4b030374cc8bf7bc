"""What a harvest's shard sidecars say about how they were computed, checked across shards: the
dtypes and hub revisions the models ran in (one of each per model, or the store is refused), and
the outlier rule's totals."""

from __future__ import annotations

import json

from diffing.store import ShardInfo, StoreError


def resolved_dtypes(shards: list[ShardInfo]) -> dict[str, str]:
    """The dtypes every shard's models ran in; fails if shards differ (``dtype: auto`` resolved
    differently on workers with and without native bf16, or a resume on another machine)."""
    seen: dict[str, list[str]] = {}
    for info in shards:
        if info.producer.get("dtypes"):
            seen.setdefault(json.dumps(info.producer["dtypes"], sort_keys=True), []).append(info.shard_id)
    if len(seen) > 1:
        kinds = "; ".join(f"{k} in {len(v)} shards (e.g. {v[0]})" for k, v in seen.items())
        raise StoreError(
            f"the store's shards were computed in different dtypes ({kinds}): harvest.models[].dtype=auto "
            "resolved differently on different workers; set an explicit dtype (float32 or bfloat16) and "
            "rerun with --overwrite"
        )
    return json.loads(next(iter(seen))) if seen else {}


def outlier_totals(shards: list[ShardInfo], log=None) -> dict[str, int]:
    """Tokens seen and dropped by the outlier rule over the shards that recorded them; a warning
    when more than 2% were dropped (a template token every document has, say, in one model)."""
    seen = [s.producer for s in shards if "n_outliers" in s.producer]
    if not seen:
        return {}
    tokens, dropped = sum(int(p["n_tokens"]) for p in seen), sum(int(p["n_outliers"]) for p in seen)
    if log is not None and tokens and dropped / tokens > 0.02:
        log.warning(
            "harvest.many_outliers",
            dropped=dropped,
            tokens=tokens,
            detail="harvest.outlier_norm_mult drops a token from every model when it is an outlier in "
            "one; check which tokens (a chat-template token?) or raise it",
        )
    return {"tokens_seen": tokens, "outliers_dropped": dropped}


def resolved_revisions(shards: list[ShardInfo]) -> dict[str, str]:
    """The hub revision each model's shards were computed from; fails if a model's differ (pods
    that downloaded the current snapshot beside others with an older one in their cache)."""
    seen: dict[str, dict[str, list[str]]] = {}
    for info in shards:
        for name, rev in (info.producer.get("revisions") or {}).items():
            seen.setdefault(name, {}).setdefault(rev, []).append(info.shard_id)
    mixed = {n: revs for n, revs in seen.items() if len(revs) > 1}
    if mixed:
        what = "; ".join(
            f"{n}: " + ", ".join(f"{r[:12]} in {len(ids)} shards (e.g. {ids[0]})" for r, ids in revs.items())
            for n, revs in mixed.items()
        )
        raise StoreError(
            f"the store's shards were computed from different revisions of a model ({what}); point "
            "harvest.models[].path at one snapshot (a local directory, or a hub id every node resolves "
            "alike) and rerun with --overwrite"
        )
    return {n: next(iter(revs)) for n, revs in seen.items()}
