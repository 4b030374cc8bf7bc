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


def _one_per_model(shards: list[ShardInfo], key: str, refusal: str) -> dict[str, str]:
    """{model: value} of ``producer[key]`` over the shards; a StoreError, ``refusal`` with the
    disagreeing models in its ``{mixed}``, where a model's shards disagree."""
    seen: dict[str, dict[str, list[str]]] = {}
    for info in shards:
        for name, rev in (info.producer.get(key) or {}).items():
            seen.setdefault(name, {}).setdefault(rev, []).append(info.shard_id)
    if mixed := {n: revs for n, revs in seen.items() if len(revs) > 1}:
        what = "; ".join(
            f"{n}: " + ", ".join(f"{r[:12]} in {len(ids)} shards (e.g. {ids[0]})" for r, ids in revs.items())
            for n, revs in mixed.items()
        )
        raise StoreError(refusal.format(mixed=what))
    return {n: next(iter(revs)) for n, revs in seen.items()}


def resolved_revisions(shards: list[ShardInfo]) -> dict[str, str]:
    """The hub revision each model's shards were computed from; fails if a model's differ (pods
    that downloaded the current snapshot beside others with an older one in their cache)."""
    return _one_per_model(
        shards,
        "revisions",
        "the store's shards were computed from different revisions of a model ({mixed}); point "
        "harvest.models[].path at one snapshot (a local directory, or a hub id every node resolves "
        "alike) and rerun with --overwrite",
    )


def resolved_model_stamps(shards: list[ShardInfo]) -> dict[str, str]:
    """The version of each local model directory the shards were computed from
    (diffing.fingerprints.model_stamp); fails if a model's differ (the directory was rewritten
    between the shards of one store: a resumed harvest over a retrained checkpoint at the same path)."""
    return _one_per_model(
        shards,
        "model_stamps",
        "the store's shards were computed from different contents of a model directory ({mixed}): "
        "it was rewritten while this store was harvested; rerun with --overwrite (or point "
        "harvest.models[].path at a directory that stays as it is)",
    )


def resolved_tokenizers(shards: list[ShardInfo]) -> dict[str, str]:
    """The vocabulary fingerprint of each model's tokenizer over the shards
    (diffing.fingerprints.tokenizer_fingerprint); fails if a model's differ (its token ids would
    mean other text in some shards)."""
    return _one_per_model(
        shards,
        "tokenizers",
        "the store's shards were tokenized by different vocabularies of a model ({mixed}); rerun "
        "with --overwrite (or point harvest.models[].path at one tokenizer)",
    )


def models_changed(metadata: dict | None, models) -> list[str]:
    """The models whose local directory differs now from the one a finished store's shards were
    computed from (its manifest's model_stamps; stores from before them, hub models and
    directories this machine cannot read say nothing)."""
    from diffing.fingerprints import model_stamp

    recorded = (metadata or {}).get("model_stamps") or {}
    out = []
    for m in models:
        was = recorded.get(m.name)
        if was and (now := model_stamp(m.path)) is not None and now != was:
            out.append(f"{m.name} ({m.path})")
    return out
