"""The store's on-disk contract: manifest and shard models, and the atomic-write helpers."""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator
from typing import Any, Literal

import fsspec
import numpy as np
import pyarrow as pa
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
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())  # on disk before the rename: a crash leaves no empty shard behind
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
