"""The activation store: paired activations of several models on the same tokens.

Layout at any fsspec URI (a local path, `s3://bucket/prefix`, `gs://...`):

    manifest.json                 models, layer/site, d_model, dtype, norm stats, shards (+ sha256)
    shards/<shard_id>.parquet     rows: doc_id, pos, token_id, act_0 .. act_{M-1}, [extra columns]
    shards/<shard_id>.json        the shard's ShardInfo; written last, so it marks the shard complete

`act_m` is a fixed-size list of `d_model` floats (float16 by default) for model m: plain pyarrow
reads it without Ray. A shard becomes visible only when complete (temp file + rename locally; a
single PUT on object stores); the manifest is written last, from the shard sidecars, so a store
with a manifest is always whole. Reads verify each shard's sha256.
"""

from diffing.store.format import (
    FORMAT_VERSION,
    META_COLUMNS,
    ROW_GROUP_BYTES,
    Manifest,
    ShardInfo,
    StoreError,
    atomic_write,
    check_writable,
    row_group_rows,
)
from diffing.store.reader import ActivationStore, open_store
from diffing.store.writer import StoreWriter, write_arrays

__all__ = [
    "FORMAT_VERSION",
    "META_COLUMNS",
    "ROW_GROUP_BYTES",
    "ActivationStore",
    "Manifest",
    "ShardInfo",
    "StoreError",
    "StoreWriter",
    "atomic_write",
    "check_writable",
    "open_store",
    "row_group_rows",
    "write_arrays",
]
