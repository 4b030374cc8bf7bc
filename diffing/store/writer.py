"""Write side: shards from any process, in any order, then the manifest."""

from __future__ import annotations

import hashlib
import io
import json
import math
import warnings
from collections.abc import Sequence
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch

from diffing.store.format import (
    _NP_DTYPES,
    META_COLUMNS,
    Manifest,
    ShardInfo,
    StoreError,
    _fixed_list,
    _fs,
    _is_local,
    atomic_write,
    row_group_rows,
)
from diffing.store.layout import _check_values, _count_within, _repeated, _row_order, _scattered
from diffing.store.reader import ActivationStore, open_store


def store_begun(fs, root: str) -> bool:
    """A store at `root` (of fsspec `fs`) that is finished or holds a finished shard: a harvest
    that wrote none (stopped by its checks) left nothing a changed config must keep apart."""
    return fs.exists(f"{root}/manifest.json") or bool(fs.glob(f"{root}/shards/*.json"))


class StoreWriter:
    """Writes shards one at a time (any process, any order) and finalises the manifest."""

    def __init__(
        self,
        uri: str,
        *,
        model_names: Sequence[str],
        d_model: int,
        dtype: str = "float16",
        layer: int | None = None,
        site: str | None = None,
        extra_columns: Sequence[str] = (),
        metadata: dict[str, Any] | None = None,
    ):
        if len(model_names) < 2:
            raise StoreError(f"a store needs >= 2 models, got model_names={list(model_names)}")
        if bad := [n for n in model_names if "," in n or not n.strip()]:  # pairs are written "a,b"
            raise StoreError(f"model names {bad} are empty or contain ','; rename them")
        if dtype not in _NP_DTYPES:
            raise StoreError(f"dtype={dtype!r} is not supported; use one of {sorted(_NP_DTYPES)}")
        self.uri = uri
        self.fs, self.root = _fs(uri)
        self.header = Manifest(
            model_names=list(model_names),
            d_model=d_model,
            dtype=dtype,
            layer=layer,
            site=site,
            extra_columns=list(extra_columns),
            metadata=metadata or {},
        )

    def _path(self, rel: str) -> str:
        return f"{self.root}/{rel}"

    def has_manifest(self) -> bool:
        return self.fs.exists(self._path("manifest.json"))

    def begun(self) -> bool:
        """Finished, or holding a finished shard (its sidecar written): a harvest's work stands here."""
        return store_begun(self.fs, self.root)

    def clear(self) -> None:
        """Remove an existing store's manifest and shards (for --overwrite)."""
        for rel in ("manifest.json", "shards"):
            if self.fs.exists(self._path(rel)):
                self.fs.rm(self._path(rel), recursive=True)

    def remove_temp_files(self) -> int:
        """Delete the temporary files of local writes a killed process left (``.tmp-*`` beside the
        shards; each is up to a shard's size). Call only when no writer of this store is running.
        Object stores have none: an upload is one request."""
        if not _is_local(self.fs):
            return 0
        stale = self.fs.glob(self._path(".tmp-*")) + self.fs.glob(self._path("shards/.tmp-*"))
        for path in stale:
            self.fs.rm(path)
        return len(stale)

    def done_shard(self, shard_id: str) -> ShardInfo | None:
        """The ShardInfo of a completed shard, or None (a parquet file without sidecar is incomplete)."""
        # s3fs answers exists() and even cat_file() from a cached listing of the folder: one made
        # before other processes (the harvest's actors) wrote their shards would call them missing
        self.fs.invalidate_cache(self._path("shards"))
        try:
            data = self.fs.cat_file(self._path(f"shards/{shard_id}.json"))
        except FileNotFoundError:
            return None
        return ShardInfo.model_validate_json(data)

    def done_shards(self, shard_ids: Sequence[str]) -> dict[str, ShardInfo | None]:
        """``done_shard`` for many shards: one listing and one batched read (s3fs reads them
        concurrently) instead of a round trip per shard (78k sequential GETs at 5M records)."""
        self.fs.invalidate_cache(self._path("shards"))
        try:
            listed = {
                p.rsplit("/", 1)[-1][: -len(".json")] for p in self.fs.glob(self._path("shards/*.json"))
            }
        except FileNotFoundError:
            listed = set()
        want = [s for s in shard_ids if s in listed]
        data = self.fs.cat([self._path(f"shards/{s}.json") for s in want], on_error="return") if want else {}
        by_name = {}
        for p, v in data.items():
            if isinstance(v, FileNotFoundError):  # removed since the listing: not done
                continue
            if isinstance(v, BaseException):  # a read that failed (a timeout) is not "not done": raise it
                raise v
            by_name[p.rsplit("/", 1)[-1][: -len(".json")]] = v
        return {s: ShardInfo.model_validate_json(by_name[s]) if s in by_name else None for s in shard_ids}

    def write_shard(
        self,
        shard_id: str,
        acts: np.ndarray | torch.Tensor,
        *,
        doc_ids: np.ndarray | None = None,
        positions: np.ndarray | None = None,
        token_ids: np.ndarray | None = None,
        extra: dict[str, Sequence[Any]] | None = None,
        producer: dict[str, Any] | None = None,
    ) -> ShardInfo:
        """Write one shard atomically. acts: [n_rows, n_models, d_model]; ``producer`` goes to
        its sidecar (provenance: e.g. the dtypes the harvest's models ran in). Layout contract: a
        document's rows are contiguous in shard order (one shard, or a run of neighbouring ones):
        evidence windows look a document up there only. write_arrays groups rows so itself."""
        h = self.header
        if isinstance(acts, torch.Tensor):
            acts = acts.detach().cpu()
            acts = (acts if acts.dtype in (torch.float16, torch.float32) else acts.float()).numpy()
        acts = np.asarray(acts)
        if acts.ndim != 3 or acts.shape[1:] != (h.n_models, h.d_model):
            raise StoreError(
                f"acts must have shape [n_tokens, {h.n_models}, {h.d_model}] (n_models, d_model), got {list(acts.shape)}"
            )
        n = acts.shape[0]
        if doc_ids is not None and n > 1:
            d = np.asarray(doc_ids)
            if (runs := 1 + int(np.count_nonzero(d[1:] != d[:-1]))) != len(np.unique(d)):
                raise StoreError(
                    f"shard {shard_id}: a document's rows are not together ({runs} runs of {len(np.unique(d))} "
                    "doc_ids; a shuffled buffer?): a store keeps each document's rows contiguous, which its "
                    "evidence windows read; sort the whole buffer by (doc_id, pos) before cutting it into "
                    "shards, or write it with write_arrays, which does; nothing was written"
                )
        with np.errstate(over="ignore"):  # overflow is reported below, with the fix
            stored = acts.astype(_NP_DTYPES[h.dtype], copy=False)  # no copy if already the store's dtype
        step = max(1, (64 << 20) // max(1, stored[:1].nbytes))  # rows per 64 MiB: bounded temporaries
        norms = np.zeros(h.n_models, np.float64)
        for a in range(0, n, step):
            chunk = stored[a : a + step].astype(np.float32)
            if not np.isfinite(chunk).all():
                finite = np.isfinite(acts[a : a + step]).all()
                bad = f"values beyond {h.dtype}'s range" if finite else "NaN or inf"
                fix = '; store in float32 (dtype="float32" / store_dtype: float32)' if finite else ""
                raise StoreError(f"shard {shard_id}: acts contain {bad}; nothing was written{fix}")
            norms += np.linalg.norm(chunk, axis=-1).sum(0)
        cols: dict[str, pa.Array] = {
            "doc_id": pa.array(np.zeros(n, np.int64) if doc_ids is None else np.asarray(doc_ids, np.int64)),
            "pos": pa.array(
                np.arange(n, dtype=np.int32) if positions is None else np.asarray(positions, np.int32)
            ),
            "token_id": pa.array(
                np.full(n, -1, np.int32) if token_ids is None else np.asarray(token_ids, np.int32)
            ),
        }
        args = {"doc_id": "doc_ids", "pos": "positions", "token_id": "token_ids"}  # as the caller named them
        for name, arr in cols.items():
            if len(arr) != n:
                raise StoreError(f"{args[name]} has {len(arr)} entries but acts has {n} rows")
        for m in range(h.n_models):
            cols[f"act_{m}"] = _fixed_list(stored[:, m])
        extra = extra or {}
        if set(extra) != set(h.extra_columns):
            raise StoreError(f"extra columns {sorted(extra)} do not match the store's {h.extra_columns}")
        for name in h.extra_columns:
            arr = pa.array(list(extra[name]))
            # an empty shard infers type null, which no other shard has: a dataset of the shards
            # would not read ("Unsupported cast from string to null")
            cols[name] = arr.cast(pa.string()) if pa.types.is_null(arr.type) else arr
        table = pa.table(cols).replace_schema_metadata({"crossdiff.model_names": json.dumps(h.model_names)})
        buf = io.BytesIO()
        pq.write_table(
            table,
            buf,
            compression="zstd",
            use_dictionary=list(h.extra_columns) or False,
            # no min/max statistics for the activation columns: nothing filters on them, and
            # for float16 they cost a third of the write (docs/benchmarks.md)
            write_statistics=[*META_COLUMNS, *h.extra_columns],
            row_group_size=row_group_rows(stored.shape[1] * stored.shape[2] * stored.itemsize),
        )
        del table, cols
        data = buf.getbuffer()  # the Parquet bytes, not copied again
        info = ShardInfo(
            shard_id=shard_id,
            path=f"shards/{shard_id}.parquet",
            n_rows=n,
            sha256=hashlib.sha256(data).hexdigest(),
            norm_sums=[float(v) for v in norms],
            producer=producer or {},
        )
        atomic_write(self.fs, self._path(info.path), data)
        atomic_write(self.fs, self._path(f"shards/{shard_id}.json"), info.model_dump_json().encode())
        return info

    def finalize(
        self, shards: Sequence[ShardInfo] | None = None, *, metadata: dict[str, Any] | None = None
    ) -> Manifest:
        """Write manifest.json from the given shards (default: every completed shard, sorted by id);
        ``metadata`` is added to the header's."""
        if shards is None:
            shards = [
                ShardInfo.model_validate_json(self.fs.cat_file(p))
                for p in sorted(self.fs.glob(self._path("shards/*.json")))
            ]
        shards = sorted(shards, key=lambda s: s.shard_id)
        n_rows = sum(s.n_rows for s in shards)
        if n_rows == 0:
            raise StoreError(f"no rows to write at {self.uri}: the input produced no tokens")
        sums = np.sum([s.norm_sums for s in shards], axis=0)
        manifest = self.header.model_copy(
            update=dict(
                shards=list(shards),
                n_rows=n_rows,
                mean_norms=[float(v) for v in sums / n_rows],
                metadata={**self.header.metadata, **(metadata or {})},
            )
        )
        atomic_write(self.fs, self._path("manifest.json"), manifest.model_dump_json(indent=2).encode())
        return manifest


def write_arrays(
    uri: str,
    acts: np.ndarray | torch.Tensor,
    *,
    model_names: Sequence[str],
    doc_ids: np.ndarray | None = None,
    positions: np.ndarray | None = None,
    token_ids: np.ndarray | None = None,
    extra: dict[str, Sequence[Any]] | None = None,
    dtype: str = "float16",
    shard_rows: int = 65_536,
    layer: int | None = None,
    site: str | None = None,
    metadata: dict[str, Any] | None = None,
    overwrite: bool = False,
) -> ActivationStore:
    """Write a store from in-memory activations [n_tokens, n_models, d_model] (bring your own):
    numpy, or a torch tensor of any float dtype (bfloat16 is converted one shard at a time).
    Rows may come in any order: with `doc_ids` they are stored grouped by document, in position
    order (the store's layout). `positions` default to one count over the input, or, where a
    document's rows are not together, to a count within each document in the order given."""
    if isinstance(acts, torch.Tensor):
        acts = acts.detach().cpu()
        # dtypes numpy has are read in place; bfloat16 (a bf16 model's activations) stays a tensor
        # and is converted one shard at a time, not as a float32 copy of the whole input
        try:
            acts = acts.numpy()
        except TypeError:  # "Got unsupported ScalarType BFloat16"
            pass
    else:
        acts = np.asarray(acts)
    if acts.ndim != 3:
        raise StoreError(f"acts must be [n_tokens, n_models, d_model], got shape {list(acts.shape)}")
    if acts.shape[0] == 0:
        raise StoreError("acts is empty (0 tokens)")
    if isinstance(model_names, str):  # "ab" would pass as the models "a" and "b"
        raise StoreError(f"model_names must be a list of names, got the string {model_names!r}")
    if acts.shape[1] != len(model_names):
        raise StoreError(f"acts has {acts.shape[1]} models but model_names has {len(model_names)}")
    if isinstance(shard_rows, bool) or not isinstance(shard_rows, int | np.integer) or shard_rows < 1:
        raise StoreError(f"shard_rows must be a whole number >= 1, got {shard_rows!r}")
    if not isinstance(acts, torch.Tensor) and acts.dtype.kind not in "fiu":
        raise StoreError(f"acts must hold numbers (a float array), got dtype {acts.dtype}")
    if acts.shape[2] == 0:
        raise StoreError("acts has d_model = 0 (shape [n_tokens, n_models, 0]); give each model's vector")
    if len(set(model_names)) != len(model_names):
        raise StoreError(f"model_names {list(model_names)} repeat a name; each model needs its own")
    for name, col in (("doc_ids", doc_ids), ("positions", positions), ("token_ids", token_ids)):
        if col is not None and len(col) != acts.shape[0]:  # before any shard is written
            raise StoreError(f"{name} has {len(col)} values for {acts.shape[0]} tokens; give one per token")
    for name, col in (("doc_ids", doc_ids), ("positions", positions), ("token_ids", token_ids)):
        arr = None if col is None else np.asarray(col)
        if arr is not None and (arr.ndim != 1 or not np.issubdtype(arr.dtype, np.integer)):
            hint = "; for string ids: np.unique(ids, return_inverse=True)[1]" if name == "doc_ids" else ""
            raise StoreError(
                f"{name} must be one integer per token (a 1-D int array), got {arr.dtype} of shape "
                f"{list(arr.shape)}{hint}"
            )
        low = {"positions": 0, "token_ids": -1}.get(name)  # stored as int32; -1: no token id
        if arr is not None and low is not None and arr.size and (arr.min() < low or arr.max() > 2**31 - 1):
            bad = arr[(arr < low) | (arr > 2**31 - 1)][0]
            raise StoreError(f"{name} holds {bad}; they must lie in [{low}, 2**31 - 1] (stored as int32)")
    _check_values(acts, dtype)
    for name, col in (extra or {}).items():
        if name in META_COLUMNS or name.startswith("act_"):
            raise StoreError(f"extra column {name!r} would replace a store column; rename it")
        if len(col) != acts.shape[0]:
            raise StoreError(f"extra column {name!r} has {len(col)} values for {acts.shape[0]} tokens")
        try:  # one Arrow type per column, known before any shard is written
            pa.array(list(col))
        except (pa.ArrowInvalid, pa.ArrowTypeError, pa.ArrowNotImplementedError) as e:
            raise StoreError(
                f"extra column {name!r} cannot be stored as one Arrow column ({e}); give values of one type "
                "(all strings, or all numbers)"
            ) from None
    if positions is not None and (twice := _repeated(doc_ids, positions)) is not None:
        raise StoreError(
            f"doc_id {twice[0]} has position {twice[1]} on more than one row; (doc_id, position) must name "
            "one token (positions counted per chunk of a longer document? number them within the "
            "document, or give each chunk its own doc_id)"
        )
    writer = StoreWriter(
        uri,
        model_names=model_names,
        d_model=acts.shape[2],
        dtype=dtype,
        layer=layer,
        site=site,
        extra_columns=sorted(extra or {}),
        metadata=metadata,
    )
    if writer.has_manifest() or writer.fs.exists(writer._path("shards")):
        if not overwrite:
            raise StoreError(f"a store already exists at {uri}; pass overwrite=True to replace it")
        writer.clear()
    n = acts.shape[0]
    if positions is None and doc_ids is not None and _scattered(np.asarray(doc_ids)):
        warnings.warn(
            "write_arrays: no positions, and a document's rows are not together (a shuffled buffer?): "
            "each document's tokens are numbered in the order given; pass positions for the true order",
            stacklevel=2,
        )
        positions = _count_within(np.asarray(doc_ids))
    if positions is None:  # one count over the whole input: (doc_id, pos) stays unique across shards
        positions = np.arange(n, dtype=np.int64)
    # each document's rows together, in position order (see _row_order), taken shard by shard
    order = None if doc_ids is None else _row_order(doc_ids, positions)
    extra = {k: list(v) for k, v in (extra or {}).items()}
    if doc_ids is None and n > 1:
        warnings.warn(
            "write_arrays: no doc_ids, so all rows are one document (doc_id 0): evidence contexts run "
            "across unrelated tokens and the analysis' hashed held-out split may hold none of them; pass "
            "doc_ids (one per token) for real documents",
            stacklevel=2,
        )
    n_shards = math.ceil(n / shard_rows)
    width = max(5, len(str(n_shards)))
    infos = []

    def cut(a, sl: slice):
        return None if a is None else np.asarray(a)[sl if order is None else order[sl]]

    def rows(sl: slice):
        if order is None:
            return acts[sl]
        return acts[torch.from_numpy(order[sl])] if isinstance(acts, torch.Tensor) else acts[order[sl]]

    for s in range(n_shards):
        sl = slice(s * shard_rows, min(n, (s + 1) * shard_rows))
        infos.append(
            writer.write_shard(
                f"{s:0{width}d}",
                rows(sl),
                doc_ids=cut(doc_ids, sl),
                positions=cut(positions, sl),
                token_ids=cut(token_ids, sl),
                extra={k: v[sl] if order is None else [v[i] for i in order[sl]] for k, v in extra.items()},
            )
        )
    writer.finalize(infos)
    return open_store(uri)
