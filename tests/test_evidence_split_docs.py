"""Evidence from a store whose documents run over several shards (write_arrays cuts shards at
`shard_rows`, wherever documents end), against a brute force over the whole input. Found by a
property-based review (2026-12-08): each part of a split document took its own slot in the bounded
candidate lists (quantile bins no longer exact, top documents and negatives crowded out), and a
window crossing more than one shard boundary came back cut short."""

from __future__ import annotations

import numpy as np
import pytest
from conftest import identity_crosscoder

from diffing.collect import evidence_for_latents
from diffing.config import AnalysisConfig
from diffing.store import write_arrays
from diffing.windows import route

D = L = 3


CC = identity_crosscoder(D, L)  # latent l = relu(model B's coordinate l): the activations are the input


def _evidence(tmp_path, vals, doc, pos, shard_rows, **cfg):
    vals = np.asarray(vals, np.float32).reshape(len(doc), -1)
    x = np.zeros((len(doc), 2, D), np.float32)
    x[:, 1, : vals.shape[1]] = vals
    store = write_arrays(
        str(tmp_path / f"s{len(list(tmp_path.iterdir()))}"),
        x,
        model_names=["A", "B"],
        doc_ids=np.asarray(doc),
        positions=np.asarray(pos),
        token_ids=np.arange(len(doc)) + 100,
        shard_rows=shard_rows,
        dtype="float32",
    )
    cfg = AnalysisConfig(heldout="all", **cfg)
    rows = {lat: {"group": "g"} for lat in range(L)}
    return evidence_for_latents(
        store, CC, list(range(L)), cfg, rows, decode=lambda ids: [f"<{i}>" for i in ids]
    )


def test_a_document_in_two_shards_takes_one_reservoir_slot(tmp_path):
    # two activating documents, a reservoir of two: the bins are exact, whichever seed
    for seed in range(4):
        ev = _evidence(
            tmp_path, [1, 2, 3], [5, 5, 9], [0, 1, 0], 1,
            reservoir=2, n_quantiles=2, per_quantile=1, n_top=2, n_negatives=0, evidence_seed=seed,
        )[0]  # fmt: skip
        assert sorted((q.doc_id, q.quantile) for q in ev.quantiles) == [(5, 0), (9, 1)]


def test_a_long_document_does_not_crowd_out_the_top_or_the_negatives(tmp_path):
    top = _evidence(
        tmp_path, [5, 4, 3, 2, 1, 0.5], [1, 1, 1, 1, 1, 2], [0, 1, 2, 3, 4, 0], 1,
        n_top=2, per_quantile=0, n_negatives=0, window=0,
    )[0]  # fmt: skip
    assert [t.doc_id for t in top.top] == [1, 2]
    neg = _evidence(
        tmp_path, [0] * 10, [2, 7, 12] + [17] * 7, [0, 0, 0] + list(range(7)), 1,
        n_negatives=3, per_quantile=0, n_top=1,
    )[0]  # fmt: skip
    assert len(neg.negatives) == 3 and len({t.doc_id for t in neg.negatives}) == 3


def test_a_document_that_fires_in_another_shard_is_never_a_negative(tmp_path):
    # doc 4 fires only in its last part, five shards after the parts that look like negatives
    vals = [0, 0, 0, 0, 0, 1, 0, 0]
    ev = _evidence(tmp_path, vals, [4] * 6 + [6, 8], list(range(6)) + [0, 0], 1, n_negatives=3, n_top=1)[0]
    assert sorted(t.doc_id for t in ev.negatives) == [6, 8]


def test_parts_that_fire_elsewhere_do_not_take_the_negatives_places(tmp_path):
    # ten documents fire in their second shard only; their first parts look like negatives until
    # the shards merge, and must not fill the list (2 * n_negatives + 2) that the quiet doc needs
    doc, pos, vals = list(np.repeat(np.arange(10), 2)) + [50], [0, 1] * 10 + [0], [0, 1] * 10 + [0]
    for seed in range(4):
        ev = _evidence(
            tmp_path, vals, doc, pos, 1, n_negatives=1, n_top=1, per_quantile=0, evidence_seed=seed
        )
        assert [t.doc_id for t in ev[0].negatives] == [50]


def test_a_window_reaches_over_every_shard_it_spans(tmp_path):
    ev = _evidence(
        tmp_path, [0, 0, 0, 0, 1], [2, 7, 12, 12, 12], [0, 0, 0, 1, 2], 1,
        window=2, n_top=1, per_quantile=0, n_negatives=0,
    )[0]  # fmt: skip
    assert ev.top[0].tokens == ["<102>", "<103>", "<104>"] and ev.top[0].acts == [0.0, 0.0, 1.0]


def test_route_asks_as_many_shards_as_the_window_can_reach():
    from diffing.windows import Request

    both = Request(0, "top", 1, 0, shard=3, edge=3)
    assert route([both], [5] * 8, 4) == {3: [0], 2: [0], 4: [0]}  # a neighbour holds the window
    assert sorted(route([both], [2] * 8, 4)) == [1, 2, 3, 4, 5]  # two short shards each way
    assert sorted(route([both], [2, 0, 0, 1, 2, 9, 0, 0], 4)) == [0, 1, 2, 3, 4, 5]  # empty shards count 0
    inner = Request(0, "top", 1, 0, shard=3, edge=0)
    assert route([inner], [1] * 8, 4) == {3: [0]}  # not at an edge: its own shard holds it


@pytest.mark.parametrize("seed", range(24))
def test_evidence_equals_a_brute_force_over_split_documents(tmp_path, seed):
    rng = np.random.default_rng(seed)
    lens = rng.integers(1, 12, rng.integers(1, 8))
    doc = np.repeat(np.arange(len(lens)) * 5 + 2, lens)
    pos = np.concatenate([np.arange(n) + rng.integers(0, 3) for n in lens])
    n = len(doc)
    vals = rng.choice([0.0, 0.0, 0.0, 1.0, 2.0, 0.5, 3.0], size=(n, L))
    cfg = dict(
        n_top=int(rng.integers(1, 5)), window=int(rng.integers(0, 4)), n_quantiles=int(rng.integers(1, 4)),
        per_quantile=int(rng.integers(0, 4)), reservoir=int(rng.integers(1, 21)),
        n_negatives=int(rng.integers(0, 4)), batch_size=int(rng.integers(1, 21)),
    )  # fmt: skip
    evs = _evidence(tmp_path, vals, doc, pos, int(rng.integers(1, 4)), **cfg)
    tok = np.arange(n) + 100
    for lat, e in enumerate(evs):
        f = vals[:, lat]
        peak = {int(d): f[doc == d].max() for d in np.unique(doc)}
        firing = sorted((v for v in peak.values() if v > 0), reverse=True)
        assert sorted((peak[t.doc_id] for t in e.top), reverse=True) == firing[: cfg["n_top"]]
        for t in e.top + e.quantiles + e.negatives:  # every window whole, wherever its shards
            m = np.flatnonzero((doc == t.doc_id) & (np.abs(pos - t.pos) <= cfg["window"]))
            m = m[np.argsort(pos[m])]
            assert t.tokens == [f"<{i}>" for i in tok[m]] and np.allclose(t.acts, f[m])
        quiet = [d for d, v in peak.items() if v == 0]
        assert sorted(t.doc_id for t in e.negatives) == sorted({t.doc_id for t in e.negatives})
        assert {t.doc_id for t in e.negatives} <= set(quiet)
        assert len(e.negatives) == min(cfg["n_negatives"], len(quiet))
        assert len({t.doc_id for t in e.quantiles}) == len(e.quantiles)
        assert all(peak[t.doc_id] > 0 for t in e.quantiles)
        if firing and cfg["reservoir"] >= len(firing) and cfg["per_quantile"]:  # the bins are exact
            pk = np.array(firing)
            edges = np.quantile(pk, np.linspace(0, 1, cfg["n_quantiles"] + 1))
            bins = np.clip(np.searchsorted(edges, pk, side="right") - 1, 0, cfg["n_quantiles"] - 1)
            got = np.bincount([t.quantile for t in e.quantiles], minlength=cfg["n_quantiles"])
            want = [min(cfg["per_quantile"], int((bins == q).sum())) for q in range(cfg["n_quantiles"])]
            assert got.tolist() == want
