"""Latent evidence (delphi style): contexts per selected latent, from a held-out part of the store.

Two streaming passes over held-out shards, both per shard (so a Ray Data job can map them):

1. `scan_shard` encodes the rows with the crosscoder's inference threshold (batch-independent)
   for the selected latents only, and keeps, per latent: firing count, activation sum and max,
   activation mass per corpus `source`, and three bounded candidate lists of documents:
   the strongest (one entry per document: its peak token), a uniform random sample of activating
   documents (bottom-k of a seeded hash, so the sample does not depend on shard order or
   on how shards are split over workers), and a uniform sample of documents where it never fires.
   Partial results merge associatively (`Accumulator.merge`).
2. `window_shard` (diffing.windows, with the choice of contexts) re-reads only the shards that
   may hold a chosen document's window and rebuilds each context (±`window` tokens around the
   peak, by doc_id/pos) with the latent's activation per token.

Quantile samples: the random sample of activating documents is cut into `n_quantiles` equal-count
bins of their peak activation (bin 0 = weakest); `per_quantile` random documents come from each.
With a reservoir at least as large as the number of activating documents the bins are exact
(the candidate lists hold one entry per document, also for a document split over shards).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

from diffing.config import AnalysisConfig
from diffing.encoding import SubsetEncoder

_M1, _M2, _G = np.uint64(0xBF58476D1CE4E5B9), np.uint64(0x94D049BB133111EB), np.uint64(0x9E3779B97F4A7C15)


def _mix(x: np.ndarray) -> np.ndarray:
    """splitmix64 finaliser (vectorised, wrapping uint64 arithmetic)."""
    with np.errstate(over="ignore"):
        z = x.astype(np.uint64) + _G
        z = (z ^ (z >> np.uint64(30))) * _M1
        z = (z ^ (z >> np.uint64(27))) * _M2
        return z ^ (z >> np.uint64(31))


def uniform_hash(*parts: int | np.ndarray) -> np.ndarray:
    """Deterministic uniform numbers in [0, 1) from integer parts (broadcast)."""
    h = np.uint64(0)
    for p in parts:
        h = _mix(np.asarray(h, np.uint64) ^ np.asarray(p).astype(np.int64).astype(np.uint64))
    return (np.asarray(h, np.uint64) >> np.uint64(11)).astype(np.float64) * 2.0**-53


def heldout_mask(doc_ids: np.ndarray, cfg: AnalysisConfig) -> np.ndarray:
    """Rows of held-out documents ('hash' mode); every row otherwise (shards are chosen instead)."""
    if cfg.heldout != "hash":
        return np.ones(len(doc_ids), bool)
    return uniform_hash(cfg.evidence_seed, 7, np.asarray(doc_ids, np.int64)) < cfg.heldout_frac


def heldout_shards(store, cfg: AnalysisConfig) -> list[int]:
    """Shard indices read for evidence, in order, until about `evidence_max_tokens` held-out rows."""
    shards = store.manifest.shards
    n = len(shards)
    start = n - max(1, math.ceil(cfg.heldout_frac * n)) if cfg.heldout == "last_shards" else 0
    frac = cfg.heldout_frac if cfg.heldout == "hash" else 1.0
    out, rows = [], 0.0
    for i in range(start, n):
        out.append(i)
        rows += shards[i].n_rows * frac
        if rows >= cfg.evidence_max_tokens:
            break
    return out


# ----------------------------------------------------------------------------------------------
# Pass 1: per-shard accumulation

_FIELDS = {
    "top": ("val", "doc", "pos", "shard", "edge"),
    "res": ("key", "val", "doc", "pos", "shard", "edge"),
}
_FIELDS["neg"] = _FIELDS["res"]


def _empty(K: int, cap: int, fields: Sequence[str]) -> dict[str, np.ndarray]:
    out = {}
    for f in fields:
        if f == "val":
            out[f] = np.full((K, cap), -np.inf if "key" not in fields else 0.0)
        elif f == "key":
            out[f] = np.full((K, cap), np.inf)
        else:
            out[f] = np.full((K, cap), -1, np.int64)
    return out


def _keep(
    a: dict[str, np.ndarray],
    b: dict[str, np.ndarray],
    by: str,
    cap: int,
    largest: bool,
    drop: np.ndarray | None = None,
) -> dict:
    """Concatenate two candidate lists [K, *] and keep the `cap` best per latent by field `by`, one
    entry per document. Each list holds a document once, but a document split over shards has an
    entry per part, which must not crowd out other documents: of a document in both lists the
    better part stays (higher `by`, then higher `val`, as in the reservoir, where all parts share
    one key; then the lower shard and position). drop [K, *] (both lists): entries to leave out."""
    cat = {f: np.concatenate([a[f], b[f]], axis=1) for f in a}
    score = cat[by] if largest else -cat[by]  # higher is better
    valid = np.isfinite(score) if drop is None else np.isfinite(score) & ~drop
    K, na = a[by].shape
    nb = score.shape[1] - na
    row_key = np.arange(K, dtype=np.int64)[:, None] << 41  # doc ids below 2**40 (see _edge_key)
    at_edge = valid & (cat["edge"] != 0)  # only a document at a shard's edge can run on into another
    fa, fb = np.flatnonzero(at_edge[:, :na]), np.flatnonzero(at_edge[:, na:])
    ka = (row_key + cat["doc"][:, :na]).ravel()[fa]
    kb = (row_key + cat["doc"][:, na:]).ravel()[fb]
    _, ia, ib = np.intersect1d(ka, kb, assume_unique=True, return_indices=True)
    if len(ia):  # one document in both lists: keep its better part
        r, ca, cb = fa[ia] // na, fa[ia] % na, na + fb[ib] % nb
        better = [
            (score[r, ca], score[r, cb]),
            (cat["val"][r, ca], cat["val"][r, cb]),
            (-cat["shard"][r, ca], -cat["shard"][r, cb]),
            (-cat["pos"][r, ca], -cat["pos"][r, cb]),
        ]
        a_wins, tied = np.zeros(len(r), bool), np.ones(len(r), bool)
        for x, y in better:
            a_wins |= tied & (x > y)
            tied &= x == y
        a_wins |= tied
        valid[r[a_wins], cb[a_wins]] = False
        valid[r[~a_wins], ca[~a_wins]] = False
    idx = np.argsort(-np.where(valid, score, -np.inf), axis=1, kind="stable")[:, :cap]
    out = {f: np.take_along_axis(v, idx, axis=1) for f, v in cat.items()}
    out[by] = np.where(np.take_along_axis(valid, idx, axis=1), out[by], -np.inf if largest else np.inf)
    return out


@dataclass
class Accumulator:
    """Per-latent statistics and candidate documents for K selected latents (mergeable)."""

    latents: np.ndarray
    cfg: AnalysisConfig
    n_rows: int = 0
    n_fire: np.ndarray = None  # type: ignore[assignment]
    s_act: np.ndarray = None  # type: ignore[assignment]
    max_act: np.ndarray = None  # type: ignore[assignment]
    mass: dict[str, np.ndarray] = field(default_factory=dict)
    top: dict[str, np.ndarray] = None  # type: ignore[assignment]
    res: dict[str, np.ndarray] = None  # type: ignore[assignment]
    neg: dict[str, np.ndarray] = None  # type: ignore[assignment]
    # k * 2**40 + doc for docs at a shard's edge where latent k fired (sorted, int64): such a doc
    # may continue in the neighbouring shard, where it is a negative candidate it must not become
    fired_edge: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))

    def __post_init__(self):
        K = len(self.latents)
        self.n_fire = np.zeros(K, np.int64) if self.n_fire is None else self.n_fire
        self.s_act = np.zeros(K) if self.s_act is None else self.s_act
        self.max_act = np.zeros(K) if self.max_act is None else self.max_act
        c = self.cfg
        self.top = self.top or _empty(K, 2 * c.n_top, _FIELDS["top"])
        self.res = self.res or _empty(K, c.reservoir, _FIELDS["res"])
        self.neg = self.neg or _empty(K, 2 * c.n_negatives + 2, _FIELDS["neg"])

    def update(
        self,
        f: np.ndarray,
        doc: np.ndarray,
        pos: np.ndarray,
        src: np.ndarray | None,
        *,
        shard: int,
        edge: np.ndarray,
    ) -> None:
        """Add rows sorted by (doc, pos): f [n, K] activations of the selected latents."""
        n, K = f.shape
        if n == 0:
            return
        self.n_rows += n
        fired = f > 0
        self.n_fire += fired.sum(0)
        self.s_act += f.sum(0, dtype=np.float64)
        self.max_act = np.maximum(self.max_act, f.max(0))
        if src is not None:
            add_source_mass(self.mass, f, src)
        starts = np.flatnonzero(np.r_[True, doc[1:] != doc[:-1]])
        lengths = np.diff(np.r_[starts, n])
        seg_max = np.maximum.reduceat(f, starts, axis=0)  # [nd, K]
        seg = np.repeat(np.arange(len(starts)), lengths)
        ridx = np.where(fired & (f == seg_max[seg]), np.arange(n)[:, None], n)
        peak = np.minimum.reduceat(ridx, starts, axis=0)  # first peak row per (doc, latent)
        d = doc[starts]
        lat = self.latents[:, None]
        vals = seg_max.T.astype(np.float64)  # [K, nd]
        base = {
            "doc": np.broadcast_to(d, vals.shape),
            "shard": np.full(vals.shape, shard, np.int64),
            "edge": np.broadcast_to(edge[starts], vals.shape).astype(np.int64),
        }
        peak_pos = pos[np.minimum(peak, n - 1)].T.astype(np.int64)
        on = vals > 0
        at_edge = np.flatnonzero(edge[starts] != 0)
        ks, js = np.nonzero(on[:, at_edge])
        self.fired_edge = np.union1d(self.fired_edge, _edge_key(ks, d[at_edge[js]]))
        cand = {**base, "val": np.where(on, vals, -np.inf), "pos": peak_pos}
        self.top = _keep(self.top, cand, "val", self.top["val"].shape[1], largest=True)
        seed = self.cfg.evidence_seed
        key = np.where(on, uniform_hash(seed, 1, lat, d[None]), np.inf)
        self.res = _keep(self.res, {**cand, "key": key, "val": vals}, "key", self.res["key"].shape[1], False)
        pick = starts + np.floor(uniform_hash(seed, 3, d) * lengths).astype(np.int64)  # a random row per doc
        nkey = np.where(~on, uniform_hash(seed, 2, lat, d[None]), np.inf)
        ncand = {
            **base,
            "key": nkey,
            "val": np.zeros_like(vals),
            "pos": np.broadcast_to(pos[pick], vals.shape),
        }
        self.neg = _keep(
            self.neg, ncand, "key", self.neg["key"].shape[1], False, self._fired(self.neg, ncand)
        )

    def merge(self, other: Accumulator) -> Accumulator:
        if not np.array_equal(self.latents, other.latents):
            raise ValueError("cannot merge evidence accumulators of different latent sets")
        self.n_rows += other.n_rows
        self.n_fire = self.n_fire + other.n_fire
        self.s_act = self.s_act + other.s_act
        self.max_act = np.maximum(self.max_act, other.max_act)
        for s, m in other.mass.items():
            self.mass[s] = self.mass.get(s, 0.0) + m
        self.top = _keep(self.top, other.top, "val", self.top["val"].shape[1], largest=True)
        self.res = _keep(self.res, other.res, "key", self.res["key"].shape[1], largest=False)
        self.fired_edge = np.union1d(self.fired_edge, other.fired_edge)
        cap = self.neg["key"].shape[1]
        self.neg = _keep(self.neg, other.neg, "key", cap, False, self._fired(self.neg, other.neg))
        return self

    def _fired(self, a: dict[str, np.ndarray], b: dict[str, np.ndarray]) -> np.ndarray:
        """[K, *] of the two negative lists concatenated: documents known to fire (at a shard's
        edge, so in another part of the document), which must not take a negative's place."""
        doc = np.concatenate([a["doc"], b["doc"]], axis=1)
        k = np.broadcast_to(np.arange(len(doc))[:, None], doc.shape)
        return np.isin(_edge_key(k, doc), self.fired_edge)


def _doc_sorted(table, cfg: AnalysisConfig, store) -> dict[str, np.ndarray]:
    """Held-out rows of a shard table sorted by (doc, pos), with `edge` flags: 1 = the doc holds the
    shard's first row, 2 = its last row (docs that may continue in the neighbouring shard)."""
    doc = table.column("doc_id").to_numpy()
    pos = table.column("pos").to_numpy()
    if len(doc) == 0:  # a shard whose records kept no tokens
        edge = np.zeros(0, np.int64)
    else:
        edge = (doc == doc[0]).astype(np.int64) | 2 * (doc == doc[-1]).astype(np.int64)
    keep = heldout_mask(doc, cfg)
    order = np.flatnonzero(keep)
    order = order[np.lexsort((pos[order], doc[order]))]
    out = {"doc": doc[order], "pos": pos[order], "edge": edge[order], "rows": order}
    out["token_id"] = table.column("token_id").to_numpy()[order]
    if "source" in table.column_names:
        out["source"] = np.asarray(table.column("source").to_pylist(), dtype=object)[order]
    return out


def _chunks(doc: np.ndarray, size: int):
    """Row ranges of at most `size` rows that never split a document (a longer doc is one chunk)."""
    n = len(doc)
    starts = np.flatnonzero(np.r_[True, doc[1:] != doc[:-1]]).tolist() + [n]
    lo = 0
    for i in range(1, len(starts)):
        if starts[i] - lo > size and starts[i - 1] > lo:
            yield lo, starts[i - 1]
            lo = starts[i - 1]
    if n > lo:
        yield lo, n


def add_source_mass(mass: dict[str, np.ndarray], f: np.ndarray, src: np.ndarray) -> None:
    """mass[source] += the activations f [n, K] summed over the rows of that source."""
    for name in np.unique(src):
        m = mass.setdefault(str(name), np.zeros(f.shape[1]))
        m += f[src == name].sum(0, dtype=np.float64)


def mass_of_shard(store, shard: int, encoder: SubsetEncoder, cfg: AnalysisConfig) -> dict[str, np.ndarray]:
    """Activation mass per corpus source of the encoder's latents over one shard's held-out rows
    (the `mass` of ``scan_shard`` without its candidate lists: cheap enough for every latent)."""
    table = store.read_table(shard)
    rows = _doc_sorted(table, cfg, store)
    mass: dict[str, np.ndarray] = {}
    if len(rows["doc"]) == 0 or "source" not in rows:
        return mass
    acts = store.acts_of(table)
    for lo, hi in _chunks(rows["doc"], cfg.batch_size):
        add_source_mass(mass, encoder(acts[rows["rows"][lo:hi]].astype(np.float32)), rows["source"][lo:hi])
    return mass


def scan_shard(store, shard: int, encoder: SubsetEncoder, cfg: AnalysisConfig) -> Accumulator:
    """Pass 1 over one shard: statistics and candidate documents of the encoder's latents."""
    table = store.read_table(shard)
    acc = Accumulator(np.asarray(encoder.latents), cfg)
    rows = _doc_sorted(table, cfg, store)
    if len(rows["doc"]) == 0:
        return acc
    acts = store.acts_of(table)
    for lo, hi in _chunks(rows["doc"], cfg.batch_size):
        f = encoder(acts[rows["rows"][lo:hi]].astype(np.float32))
        src = rows["source"][lo:hi] if "source" in rows else None
        acc.update(f, rows["doc"][lo:hi], rows["pos"][lo:hi], src, shard=shard, edge=rows["edge"][lo:hi])
    return acc


def _edge_key(k, doc) -> np.ndarray:
    """One int64 per (latent index, doc id) pair (doc ids below 2**40)."""
    return np.asarray(k, np.int64) * (1 << 40) + np.asarray(doc, np.int64)


def __getattr__(name: str):  # pass 2 moved to diffing.windows (which imports this module)
    if name in ("Request", "plan_requests", "route", "window_shard", "merge_windows"):
        from diffing import windows

        return getattr(windows, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
