"""Pass 2 of the latent evidence (see diffing.examples): which contexts each latent gets (top
documents, quantile samples, negatives, from pass 1's candidate lists), which shards can hold
their windows, and the windows themselves, rebuilt per shard and joined."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from diffing.config import AnalysisConfig
from diffing.encoding import SubsetEncoder
from diffing.examples import Accumulator, _doc_sorted, _edge_key


@dataclass(frozen=True)
class Request:
    k: int  # index into the pass's latent list
    kind: str  # "top" | "quantile" | "neg"
    doc: int
    pos: int
    shard: int
    edge: int
    quantile: int | None = None


def _unique_docs(lst: dict[str, np.ndarray], k: int, valid: np.ndarray) -> np.ndarray:
    """Column indices of latent k's list, in list order, one per doc (the first, i.e. best)."""
    idx = np.flatnonzero(valid[k])
    _, first = np.unique(lst["doc"][k, idx], return_index=True)
    return idx[np.sort(first)]


def plan_requests(acc: Accumulator) -> list[Request]:
    """Top documents, quantile samples and negatives per latent, from the pass-1 lists."""
    cfg = acc.cfg
    out: list[Request] = []

    def req(lst, k, j, kind, q=None):
        return Request(
            k,
            kind,
            int(lst["doc"][k, j]),
            int(lst["pos"][k, j]),
            int(lst["shard"][k, j]),
            int(lst["edge"][k, j]),
            q,
        )

    # duplicates of a doc (split over shards) keep the strongest entry in the reservoir
    for k in range(len(acc.latents)):
        for j in _unique_docs(acc.top, k, np.isfinite(acc.top["val"]))[: cfg.n_top]:
            out.append(req(acc.top, k, j, "top"))
        res = acc.res
        valid = np.isfinite(res["key"][k])
        idx = np.flatnonzero(valid)
        idx = idx[np.lexsort((-res["val"][k, idx], res["doc"][k, idx]))]  # per doc strongest first
        _, first = np.unique(res["doc"][k, idx], return_index=True)
        idx = np.sort(idx[first])  # back to key order (random)
        if len(idx) and cfg.per_quantile:
            v = res["val"][k, idx]
            edges = np.quantile(v, np.linspace(0, 1, cfg.n_quantiles + 1))
            bins = np.clip(np.searchsorted(edges, v, side="right") - 1, 0, cfg.n_quantiles - 1)
            for q in range(cfg.n_quantiles):
                for j in idx[bins == q][: cfg.per_quantile]:
                    out.append(req(res, k, j, "quantile", q))
        negs = _unique_docs(acc.neg, k, np.isfinite(acc.neg["key"]))
        negs = negs[~np.isin(_edge_key(k, acc.neg["doc"][k, negs]), acc.fired_edge)]  # fired elsewhere
        for j in negs[: 2 * cfg.n_negatives + 2]:
            out.append(req(acc.neg, k, j, "neg"))
    return out


def route(requests: Sequence[Request], shard_rows: Sequence[int], window: int) -> dict[int, list[int]]:
    """Shard -> indices of requests whose window may lie there: a doc at a shard's edge also asks
    the shards beyond that edge, as many as `window` tokens can reach (shard_rows: each shard's row
    count; one neighbour unless shards are shorter than the window)."""
    n = len(shard_rows)
    by: dict[int, list[int]] = {}
    for i, r in enumerate(requests):
        shards = {r.shard}
        for flag, step in ((1, -1), (2, 1)):
            s, left = r.shard + step, window
            while r.edge & flag and 0 <= s < n and left > 0:
                shards.add(s)
                left -= shard_rows[s]
                s += step
        for s in shards:
            by.setdefault(s, []).append(i)
    return by


def window_shard(
    store, shard: int, encoder: SubsetEncoder, requests: Sequence[tuple[int, Request]], cfg: AnalysisConfig
) -> dict[int, dict]:
    """Pass 2 over one shard: for each (request id, request) the rows of its window found here:
    {"pos", "token_id", "act"} arrays and the doc's source."""
    table = store.read_table(shard)
    rows = _doc_sorted(table, cfg, store)
    doc, pos = rows["doc"], rows["pos"]
    spans = []
    for rid, r in requests:
        lo, hi = np.searchsorted(doc, r.doc, "left"), np.searchsorted(doc, r.doc, "right")
        a = lo + np.searchsorted(pos[lo:hi], r.pos - cfg.window, "left")
        b = lo + np.searchsorted(pos[lo:hi], r.pos + cfg.window, "right")
        if b > a:
            spans.append((rid, r, a, b))
    if not spans:
        return {}
    need = np.unique(np.concatenate([np.arange(a, b) for _, _, a, b in spans]))
    f = encoder(store.acts_of(table)[rows["rows"][need]].astype(np.float32))  # [len(need), K]
    where = np.full(len(doc), -1)
    where[need] = np.arange(len(need))
    out = {}
    for rid, r, a, b in spans:
        sl = where[a:b]
        out[rid] = {
            "pos": pos[a:b].astype(np.int64),
            "token_id": rows["token_id"][a:b].astype(np.int64),
            "act": f[sl, r.k].astype(np.float64),
            "source": str(rows["source"][a]) if "source" in rows else None,
        }
    return out


def merge_windows(parts: Sequence[dict[int, dict]]) -> dict[int, dict]:
    """Join the per-shard fragments of every window (sorted by position, no duplicates)."""
    out: dict[int, dict] = {}
    for part in parts:
        for rid, frag in part.items():
            if rid not in out:
                out[rid] = dict(frag)
                continue
            cur = out[rid]
            for key in ("pos", "token_id", "act"):
                cur[key] = np.concatenate([cur[key], frag[key]])
    for frag in out.values():
        _, idx = np.unique(frag["pos"], return_index=True)
        for key in ("pos", "token_id", "act"):
            frag[key] = frag[key][idx]
    return out
