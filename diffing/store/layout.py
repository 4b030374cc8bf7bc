"""What write_arrays does to activations it is handed before any shard is written: the values
checked, and the rows laid out as a harvest lays them (each document's rows together, in position
order), whatever order they came in."""

from __future__ import annotations

import math

import numpy as np

from diffing.store.format import _NP_DTYPES, StoreError

CHECK_CHUNK_BYTES = 64 << 20  # the value check reads the input this much at a time


def _scattered(d: np.ndarray) -> bool:
    """Whether some document's rows are not contiguous."""
    return len(d) > 1 and 1 + int(np.count_nonzero(d[1:] != d[:-1])) != len(np.unique(d))


def _count_within(d: np.ndarray) -> np.ndarray:
    """0, 1, 2, ... within each document, in the order its rows come."""
    _, inverse = np.unique(d, return_inverse=True)
    order = np.argsort(inverse, kind="stable")
    counts = np.bincount(inverse)
    out = np.empty(len(d), np.int64)
    out[order] = np.arange(len(d)) - np.repeat(np.cumsum(counts) - counts, counts)
    return out


def _check_values(acts, dtype: str) -> None:
    """NaN/inf, or values the store's dtype cannot hold, refused before any shard is written.
    acts: a numpy array, or a CPU tensor of a dtype numpy lacks (bfloat16), read in chunks."""
    limit = float(np.finfo(_NP_DTYPES[dtype]).max) if dtype in _NP_DTYPES else math.inf
    step = max(1, CHECK_CHUNK_BYTES // max(1, acts[:1].nbytes))
    for a in range(0, acts.shape[0], step):
        chunk = acts[a : a + step]
        chunk = chunk if isinstance(chunk, np.ndarray) else chunk.float().numpy()
        if not np.isfinite(chunk).all():
            row = a + int(np.flatnonzero(~np.isfinite(chunk).reshape(len(chunk), -1).all(1))[0])
            raise StoreError(f"acts contain NaN or inf (first at row {row}); nothing was written")
        if np.abs(chunk).max(initial=0.0) > limit:
            raise StoreError(
                f"acts contain values beyond {dtype}'s range; nothing was written; store in float32 "
                f'(dtype="float32"; |x| up to {limit:g} fits {dtype})'
            )


def _row_order(doc_ids, positions) -> np.ndarray | None:
    """The order that puts each document's rows together, in position order, documents in the order
    they first appear (None: the rows are in it already): the store's layout (a harvest writes it
    so), which evidence windows rely on (a document is looked up in its shard and the ones a window
    can reach beyond its edges). Rows given otherwise (a shuffled buffer) would give windows of
    scattered fragments. Applied shard by shard, so a memory-mapped buffer is not copied whole."""
    d, p = np.asarray(doc_ids), np.asarray(positions)
    _, first, inverse = np.unique(d, return_index=True, return_inverse=True)
    order = np.lexsort((p, np.argsort(np.argsort(first))[inverse]))
    return None if np.array_equal(order, np.arange(len(order))) else order


def _repeated(doc_ids, positions) -> tuple[int, int] | None:
    """A (doc_id, position) pair given to more than one row, or None: the pair names a token (windows
    and the evidence's de-duplication look rows up by it)."""
    p = np.asarray(positions)
    d = np.zeros(len(p), np.int64) if doc_ids is None else np.asarray(doc_ids)
    o = np.lexsort((p, d))
    same = np.flatnonzero((d[o][1:] == d[o][:-1]) & (p[o][1:] == p[o][:-1]))
    return None if not len(same) else (int(d[o][same[0]]), int(p[o][same[0]]))
