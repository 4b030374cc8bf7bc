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

from __future__ import annotations

import hashlib
import io
import json
import math
import uuid
from collections.abc import Iterator, Sequence
from typing import Any, Literal

import fsspec
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch
from pydantic import BaseModel, ConfigDict, Field

FORMAT_VERSION = 1
META_COLUMNS = ("doc_id", "pos", "token_id")
_NP_DTYPES = {"float16": np.float16, "float32": np.float32}


class StoreError(RuntimeError):
    """A problem with a store, phrased for the user."""


class ShardInfo(BaseModel):
    model_config = ConfigDict(extra="forbid")
    shard_id: str
    path: str = Field(description="Relative to the store root.")
    n_rows: int
    sha256: str
    norm_sums: list[float] = Field(description="Per model: sum over rows of ||x_m|| (float32 math).")
    producer: dict[str, Any] = Field(
        default_factory=dict, description="What computed the shard (a harvest's resolved dtypes, device)."
    )


class Manifest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    format_version: int = FORMAT_VERSION
    model_names: list[str]
    d_model: int
    dtype: Literal["float16", "float32"] = "float16"
    layer: int | None = None
    site: str | None = None
    extra_columns: list[str] = Field(default_factory=list)
    n_rows: int = 0
    mean_norms: list[float] = Field(default_factory=list, description="E||x_m|| per model over the store.")
    shards: list[ShardInfo] = Field(default_factory=list)
    metadata: dict[str, Any] = Field(default_factory=dict, description="Producer config, for provenance.")

    @property
    def n_models(self) -> int:
        return len(self.model_names)


ROW_GROUP_BYTES = 16 << 20


def row_group_rows(row_bytes: int) -> int:
    """Rows per parquet row group: ~16 MiB of activations (at least 1,024 rows). pyarrow decodes
    row groups in parallel; one group per shard read a Gemma-width shard (d_model 3584) at
    ~220 MB/s on one core, 1,024-2,048-row groups at ~360-390 MB/s (docs/benchmarks.md)."""
    return max(1024, ROW_GROUP_BYTES // max(1, row_bytes))


def _fs(uri: str) -> tuple[fsspec.AbstractFileSystem, str]:
    fs, root = fsspec.core.url_to_fs(uri)
    return fs, root.rstrip("/")


def _is_local(fs: fsspec.AbstractFileSystem) -> bool:
    protocol = fs.protocol if isinstance(fs.protocol, str) else fs.protocol[0]
    return protocol in ("file", "local")


def check_writable(fs: fsspec.AbstractFileSystem, root: str, what: str, fix: str = "") -> None:
    """Fail early, with `what` named, when `root` cannot be written (a probe object written and
    removed). Object stores get no makedirs: on S3 it would create a missing bucket."""
    try:
        if _is_local(fs):
            fs.makedirs(root, exist_ok=True)
        fs.pipe_file(f"{root}/.write-probe", b"ok")
        fs.rm(f"{root}/.write-probe")
    except Exception as e:
        raise StoreError(f"{what}: cannot write there ({type(e).__name__}: {e}){fix}") from None


def atomic_write(fs: fsspec.AbstractFileSystem, path: str, data: bytes | memoryview) -> None:
    """Write bytes so that readers see either nothing or the whole file."""
    if _is_local(fs):
        parent = path.rsplit("/", 1)[0]
        fs.makedirs(parent, exist_ok=True)
        tmp = f"{parent}/.tmp-{uuid.uuid4().hex}"
        with fs.open(tmp, "wb") as f:
            f.write(data)
        fs.mv(tmp, path)
    else:  # object stores: one PUT is atomic (their clients take bytes, not buffers)
        fs.pipe_file(path, bytes(data))


def _fixed_list(a: np.ndarray) -> pa.FixedSizeListArray:
    n, d = a.shape
    return pa.FixedSizeListArray.from_arrays(pa.array(np.ascontiguousarray(a).reshape(-1)), d)


def _chunks_2d(col: pa.ChunkedArray | pa.Array, d: int) -> Iterator[np.ndarray]:
    """[rows, d] views of a fixed-size-list column, one per chunk (row group), no copy."""
    for chunk in col.chunks if isinstance(col, pa.ChunkedArray) else [col]:
        yield chunk.flatten().to_numpy(zero_copy_only=False).reshape(-1, d)


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

    def clear(self) -> None:
        """Remove an existing store's manifest and shards (for --overwrite)."""
        for rel in ("manifest.json", "shards"):
            if self.fs.exists(self._path(rel)):
                self.fs.rm(self._path(rel), recursive=True)

    def done_shard(self, shard_id: str) -> ShardInfo | None:
        """The ShardInfo of a completed shard, or None (a parquet file without sidecar is incomplete)."""
        p = self._path(f"shards/{shard_id}.json")
        if not self.fs.exists(p):
            return None
        return ShardInfo.model_validate_json(self.fs.cat_file(p))

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
        its sidecar (provenance: e.g. the dtypes the harvest's models ran in)."""
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
        with np.errstate(over="ignore"):  # overflow is reported below, with the fix
            stored = acts.astype(_NP_DTYPES[h.dtype], copy=False)  # no copy if already the store's dtype
        step = max(1, (64 << 20) // max(1, stored[:1].nbytes))  # rows per 64 MiB: bounded temporaries
        norms = np.zeros(h.n_models, np.float64)
        for a in range(0, n, step):
            chunk = stored[a : a + step].astype(np.float32)
            if not np.isfinite(chunk).all():
                finite = np.isfinite(acts[a : a + step]).all()
                bad = f"values beyond {h.dtype}'s range" if finite else "NaN or inf"
                raise StoreError(f"shard {shard_id}: acts contain {bad}; nothing was written")
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
        for name, arr in cols.items():
            if len(arr) != n:
                raise StoreError(f"{name} has {len(arr)} entries but acts has {n} rows")
        for m in range(h.n_models):
            cols[f"act_{m}"] = _fixed_list(stored[:, m])
        extra = extra or {}
        if set(extra) != set(h.extra_columns):
            raise StoreError(f"extra columns {sorted(extra)} do not match the store's {h.extra_columns}")
        for name in h.extra_columns:
            cols[name] = pa.array(list(extra[name]))
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


class ActivationStore:
    """Read side of a finished store."""

    def __init__(self, uri: str, manifest: Manifest):
        self.uri = uri
        self.fs, self.root = _fs(uri)
        self.manifest = manifest

    @property
    def model_names(self) -> list[str]:
        return self.manifest.model_names

    @property
    def n_models(self) -> int:
        return self.manifest.n_models

    @property
    def d_model(self) -> int:
        return self.manifest.d_model

    @property
    def n_rows(self) -> int:
        return self.manifest.n_rows

    def read_table(self, i: int, *, verify: bool = True, columns: Sequence[str] | None = None) -> pa.Table:
        info = self.manifest.shards[i]
        path = f"{self.root}/{info.path}"
        try:
            data = self.fs.cat_file(path)
        except FileNotFoundError:
            raise StoreError(
                f"shard {info.shard_id} is missing at {self.uri}/{info.path}; rerun the harvest"
            ) from None
        if verify and hashlib.sha256(data).hexdigest() != info.sha256:
            raise StoreError(
                f"shard {info.shard_id} at {self.uri}/{info.path} is corrupt (sha256 mismatch); "
                "rerun the harvest with --overwrite"
            )
        table = pq.read_table(io.BytesIO(data), columns=list(columns) if columns else None)
        if table.num_rows != info.n_rows:
            raise StoreError(f"shard {info.shard_id} has {table.num_rows} rows, manifest says {info.n_rows}")
        return table

    def acts_of(self, table: pa.Table) -> np.ndarray:
        """[n_rows, n_models, d_model] in the stored dtype."""
        out = None
        for m in range(self.n_models):  # one copy, chunk by chunk, straight into [N, M, D]
            row = 0
            for part in _chunks_2d(table.column(f"act_{m}"), self.d_model):
                if out is None:
                    out = np.empty((table.num_rows, self.n_models, self.d_model), dtype=part.dtype)
                out[row : row + len(part), m] = part
                row += len(part)
        if out is None:  # a table without chunks
            return np.empty((0, self.n_models, self.d_model), dtype=_NP_DTYPES[self.manifest.dtype])
        return out

    def read_shard(self, i: int, *, verify: bool = True) -> tuple[np.ndarray, dict[str, np.ndarray]]:
        table = self.read_table(i, verify=verify)
        meta = {
            c: table.column(c).to_numpy(zero_copy_only=False)
            for c in (*META_COLUMNS, *self.manifest.extra_columns)
        }
        return self.acts_of(table), meta

    def load(self, max_rows: int | None = None) -> tuple[torch.Tensor, dict[str, np.ndarray]]:
        """Read shards in order into memory: acts [N, M, D] and the meta columns."""
        acts, metas, n = [], [], 0
        for i in range(len(self.manifest.shards)):
            a, meta = self.read_shard(i)
            acts.append(a)
            metas.append(meta)
            n += len(a)
            if max_rows is not None and n >= max_rows:
                break
        if not acts:
            raise StoreError(f"store {self.uri} has no shards")
        out = torch.from_numpy(np.concatenate(acts)[:max_rows])
        meta = {k: np.concatenate([m[k] for m in metas])[:max_rows] for k in metas[0]}
        return out, meta

    def iter_batches(
        self,
        batch_size: int,
        *,
        shuffle: bool = True,
        seed: int = 0,
        epoch: int = 0,
        buffer_rows: int = 262_144,
        drop_last: bool = True,
        skip_batches: int = 0,
        shard_indices: Sequence[int] | None = None,
    ) -> Iterator[torch.Tensor]:
        """Stream batches [B, M, D] (stored dtype). Shuffled: shard order and a row buffer, both
        seeded by (seed, epoch), so a run can resume by skipping the batches it already used."""
        rng = np.random.default_rng([seed, epoch])
        order = list(shard_indices if shard_indices is not None else range(len(self.manifest.shards)))
        if shuffle:
            rng.shuffle(order)
        buf: list[np.ndarray] = []
        held = 0
        emitted = 0

        def drain(final: bool):
            nonlocal buf, held, emitted
            block = np.concatenate(buf) if len(buf) > 1 else buf[0]
            if shuffle:
                block = block[rng.permutation(len(block))]
            n_full = len(block) // batch_size
            for j in range(n_full):
                if emitted >= skip_batches:
                    yield torch.from_numpy(block[j * batch_size : (j + 1) * batch_size])
                emitted += 1
            rest = block[n_full * batch_size :]
            if final and len(rest) and not drop_last:
                if emitted >= skip_batches:
                    yield torch.from_numpy(rest)
                emitted += 1
            buf = [rest] if (not final and len(rest)) else []
            held = len(rest) if not final else 0

        for i in order:
            a, _ = self.read_shard(i)
            buf.append(a)
            held += len(a)
            if held >= buffer_rows:
                yield from drain(final=False)
        if held:
            yield from drain(final=True)

    def shards_for_sample(self, max_rows: int | None) -> range:
        """Shard order for a bounded read (evaluation, statistics): all shards in order when
        max_rows covers the store, else the last shards first. A fit that reads the store in order
        (Ray Data without a shuffle buffer) trains on its first rows during warmup, and a model
        scores lower on exactly those rows (measured: FVE 0.84 vs 0.90 elsewhere, same weights)."""
        n = len(self.manifest.shards)
        return range(n) if not max_rows or max_rows >= self.n_rows else range(n - 1, -1, -1)

    def batches_per_epoch(self, batch_size: int) -> int:
        return self.n_rows // batch_size


def open_store(uri: str) -> ActivationStore:
    """Open a finished store; fails clearly when there is no manifest (unfinished or wrong path)."""
    fs, root = _fs(uri)
    path = f"{root}/manifest.json"
    try:
        raw = fs.cat_file(path)
    except FileNotFoundError:
        raise StoreError(
            f"no manifest.json at {uri}: not a crossdiff store, or its harvest has not finished "
            "(rerun the harvest to complete it)"
        ) from None
    manifest = Manifest.model_validate_json(raw)
    if manifest.format_version != FORMAT_VERSION:
        raise StoreError(
            f"store {uri} has format_version {manifest.format_version}; this crossdiff reads {FORMAT_VERSION}"
        )
    if manifest.n_rows == 0 or not manifest.shards:
        raise StoreError(f"store {uri} is empty (0 rows)")
    return ActivationStore(uri, manifest)


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
    """Write a store from in-memory activations [n_tokens, n_models, d_model] (bring your own)."""
    if isinstance(acts, torch.Tensor):
        acts = acts.detach().float().cpu().numpy()
    acts = np.asarray(acts)
    if acts.ndim != 3:
        raise StoreError(f"acts must be [n_tokens, n_models, d_model], got shape {list(acts.shape)}")
    if acts.shape[0] == 0:
        raise StoreError("acts is empty (0 tokens)")
    if acts.shape[1] != len(model_names):
        raise StoreError(f"acts has {acts.shape[1]} models but model_names has {len(model_names)}")
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
    n_shards = math.ceil(n / shard_rows)
    width = max(5, len(str(n_shards)))
    infos = []

    def cut(a, sl: slice):
        return None if a is None else np.asarray(a)[sl]

    for s in range(n_shards):
        sl = slice(s * shard_rows, min(n, (s + 1) * shard_rows))
        infos.append(
            writer.write_shard(
                f"{s:0{width}d}",
                acts[sl],
                doc_ids=cut(doc_ids, sl),
                positions=cut(positions, sl),
                token_ids=cut(token_ids, sl),
                extra={k: list(v)[sl] for k, v in (extra or {}).items()},
            )
        )
    writer.finalize(infos)
    return open_store(uri)
