"""Latent evidence against naive references on a constructed store where latents fire on known docs."""

import json
import typing

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from diffing.collect import collect_evidence, collect_source_mass, evidence_for_latents, range_file
from diffing.config import AnalysisConfig, CrosscoderConfig
from diffing.crosscoder import Crosscoder
from diffing.evidence import LatentEvidence, iter_evidence, read_jsonl
from diffing.examples import SubsetEncoder, heldout_mask, uniform_hash
from diffing.store import write_arrays

D, L, N_DOCS, DOC_LEN = 8, 6, 150, 20
SOURCES = ["alpha", "beta", "gamma"]


def _crosscoder() -> Crosscoder:
    """L1 crosscoder: latent l reads coordinate l of model B (l < D-2) with weight 1, so f_l = relu(x_B[l])."""
    from conftest import identity_crosscoder

    return identity_crosscoder(D, L)


def _data(seed=0):
    """Docs of DOC_LEN tokens; latent l fires (exponential value) on a few tokens of docs of its sources."""
    rng = np.random.default_rng(seed)
    n = N_DOCS * DOC_LEN
    doc = np.repeat(np.arange(N_DOCS) * 7 + 3, DOC_LEN)  # non-contiguous doc ids
    pos = np.tile(np.arange(DOC_LEN) + 1, N_DOCS)  # as if BOS were dropped
    src_doc = rng.integers(0, 3, N_DOCS)
    x = np.zeros((n, 2, D), np.float32)
    for lat in range(L):
        doc_on = rng.random(N_DOCS) < 0.4 + 0.1 * (src_doc == lat % 3)
        tok_on = rng.random(n) < 0.15
        val = rng.exponential(1.0, n) + 0.05
        on = np.repeat(doc_on, DOC_LEN) & tok_on
        x[:, 1, lat] = np.where(on, val, -rng.random(n))  # negatives elsewhere: relu gives 0
    x = x.round(3)
    token_id = rng.integers(0, 50, n)
    return x, doc, pos, token_id, np.asarray(SOURCES, dtype=object)[np.repeat(src_doc, DOC_LEN)]


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    return _world(tmp_path_factory.mktemp("ev"))


@pytest.fixture(scope="module")
def shuffled_world(tmp_path_factory):
    """The same tokens with the store's rows in random order: a store written by other code
    (write_arrays takes rows in any order) must give the same evidence."""
    return _world(tmp_path_factory.mktemp("ev-shuffled"), shuffle=True)


def _world(tmp, shuffle=False):
    x, doc, pos, tok, src = _data()
    if shuffle:
        perm = np.random.default_rng(5).permutation(len(doc))
        x, doc, pos, tok, src = x[perm], doc[perm], pos[perm], tok[perm], src[perm]
    # 333-row shards cut documents in two: windows and per-doc maxima must join across shards
    store = write_arrays(
        str(tmp / "store"),
        x,
        model_names=["A", "B"],
        doc_ids=doc,
        positions=pos,
        token_ids=tok,
        extra={"source": list(src)},
        shard_rows=333,
        dtype="float32",
    )
    run = tmp / "run"
    cc = _crosscoder()
    cc.save(run / "crosscoder")
    groups = ["B-specific", "B-specific", "A-specific", "baseline", "", "baseline"]
    pq.write_table(
        pa.table(
            {
                "latent": np.arange(L),
                "group": groups,
                "delta_norm": np.linspace(0, 1, L),
                "cosine": np.zeros(L),
                "nu_eps": np.full(L, 0.1),
                "nu_r": np.full(L, np.nan),
            }
        ),
        run / "latents.parquet",
    )
    f = np.maximum(x[:, 1, :L], 0)  # naive reference activations [n, L]
    return {
        "store": store,
        "run": run,
        "f": f,
        "doc": doc,
        "pos": pos,
        "tok": tok,
        "src": src,
        "groups": groups,
    }


CFG = AnalysisConfig(
    heldout="all",
    n_top=7,
    window=3,
    n_quantiles=4,
    per_quantile=3,
    reservoir=4096,
    n_negatives=5,
    batch_size=64,
    latents_per_file=2,
    latents_per_pass=3,
)


def _reference_doc_max(w, lat):
    out = {}
    for d in np.unique(w["doc"]):
        m = w["doc"] == d
        v = w["f"][m, lat]
        out[int(d)] = (float(v.max()), int(w["pos"][m][np.argmax(v)]))
    return out


@pytest.mark.parametrize("kind", typing.get_args(CrosscoderConfig.model_fields["kind"].annotation))
def test_subset_encoder_matches_full_encode_with_threshold(kind):
    """Every kind: the evidence passes' encoder of a few latents equals the model's own encode."""
    cfg = CrosscoderConfig(
        n_models=2, d_model=16, n_latents=64, k=4, model_names=("A", "B"), aux_k=8, kind=kind
    )
    cc = Crosscoder(cfg, seed=1)
    if kind == "batchtopk":
        with pytest.raises(ValueError, match="no BatchTopK inference threshold"):
            SubsetEncoder(cc, [3])  # batch top-k: a latent's value would depend on the rows beside it
    with torch.no_grad():
        cc.threshold.fill_(0.05)
        cc.norm_scale.copy_(torch.tensor([0.7, 1.3]))
    x = torch.randn(300, 2, 16)
    sel = [3, 17, 40, 63]
    np.testing.assert_allclose(
        SubsetEncoder(cc, sel)(x), cc.encode(x, normalised=False)[:, sel].numpy(), atol=1e-5
    )


@pytest.mark.parametrize("which", ["world", "shuffled_world"])
def test_evidence_matches_naive_reference(which, request):
    world = request.getfixturevalue(which)
    collect_evidence(world["run"], world["store"], CFG)
    ev = {e.latent: e for e in iter_evidence(world["run"])}
    assert sorted(ev) == [0, 1, 2, 3, 5]  # every latent with a group, none other
    assert [e.latent for e in iter_evidence(world["run"])] == sorted(ev)  # files sort in latent order
    f, doc, pos, tok = world["f"], world["doc"], world["pos"], world["tok"]
    for lat, e in ev.items():
        assert e.group == world["groups"][lat]
        # stats
        assert e.stats["freq"] == pytest.approx((f[:, lat] > 0).mean())
        assert e.stats["mean_act"] == pytest.approx(f[f[:, lat] > 0, lat].mean(), rel=1e-5)
        assert e.stats["max_act"] == pytest.approx(f[:, lat].max(), rel=1e-6)
        assert e.stats["nu_eps"] == pytest.approx(0.1) and e.stats["nu_r"] is None
        # top contexts = the documents with the largest peaks, strongest first (naive full sort)
        ref = sorted(
            ((v, d, p) for d, (v, p) in _reference_doc_max(world, lat).items() if v > 0), reverse=True
        )
        assert len(e.top) == CFG.n_top
        assert [(x.doc_id, x.pos) for x in e.top] == [(d, p) for _, d, p in ref[: CFG.n_top]]
        for x in e.top + e.quantiles + e.negatives:
            m = np.flatnonzero((doc == x.doc_id) & (np.abs(pos - x.pos) <= CFG.window))
            m = m[np.argsort(pos[m])]  # the window in document order, whatever the store's row order
            assert x.acts == pytest.approx(f[m, lat].tolist(), abs=1e-5)  # per-token activations
            assert x.tokens == [f"<{t}>" for t in tok[m]]  # no tokenizer: "<id>" strings
            assert x.tokens[x.peak] == f"<{tok[m][pos[m] == x.pos][0]}>"
            assert x.source == world["src"][m][0]
        for x in e.top:
            assert x.acts[x.peak] == pytest.approx(max(x.acts))
        # quantile samples lie in their equal-count bins of the per-doc peaks (reservoir holds them all)
        peaks = np.array([v for v, _, _ in ref])
        edges = np.quantile(peaks, np.linspace(0, 1, CFG.n_quantiles + 1))
        assert len(e.quantiles) == CFG.n_quantiles * CFG.per_quantile
        for x in e.quantiles:
            assert edges[x.quantile] - 1e-6 <= x.acts[x.peak] <= edges[x.quantile + 1] + 1e-6
        assert len({x.doc_id for x in e.quantiles}) == len(e.quantiles)
        # ...and are a random sample of their bin: its documents with the smallest hash keys
        bins = np.clip(np.searchsorted(edges, peaks, side="right") - 1, 0, CFG.n_quantiles - 1)
        docs = np.array([d for _, d, _ in ref])
        keys = uniform_hash(CFG.evidence_seed, 1, lat, docs)
        for q in range(CFG.n_quantiles):
            in_bin = np.flatnonzero(bins == q)
            want = docs[in_bin[np.argsort(keys[in_bin])][: CFG.per_quantile]]
            assert sorted(x.doc_id for x in e.quantiles if x.quantile == q) == sorted(want.tolist())
        # negatives: documents where the latent never fires, in no shard (333-row shards split
        # documents: a part where it is silent must not make its document a negative)
        assert len(e.negatives) == CFG.n_negatives
        assert all(f[doc == x.doc_id, lat].max() == 0 for x in e.negatives), lat
        # source mass: share of activation mass per source
        total = f[:, lat].sum()
        want = {s: f[world["src"] == s, lat].sum() / total for s in SOURCES}
        assert e.source_mass == pytest.approx({s: v for s, v in want.items() if v > 0}, rel=1e-5)
    # a negative's window sits at a random row of its document, not always at its start
    assert any(x.pos > pos[doc == x.doc_id].min() for e in ev.values() for x in e.negatives)


def test_resume_skips_written_ranges(world, tmp_path):
    import shutil

    run = tmp_path / "run"
    shutil.copytree(world["run"], run, ignore=shutil.ignore_patterns("examples"))
    files = collect_evidence(run, world["store"], CFG)
    assert [p.name for p in files] == [range_file(0, 2), range_file(2, 4), range_file(4, 6)]
    files[1].unlink()  # as if killed before this range was written
    mtime0 = files[0].stat().st_mtime_ns
    calls = []

    def counting_map(fn, items):
        calls.append(len(items))
        return [fn(i) for i in items]

    collect_evidence(run, world["store"], CFG, map_fn=counting_map)
    assert files[0].stat().st_mtime_ns == mtime0  # untouched
    assert files[1].exists() and [e.latent for e in read_jsonl(files[1], LatentEvidence)] == [2, 3]
    assert len(calls) == 2  # one pass (two map calls: scan, windows) for the one missing range
    collect_evidence(run, world["store"], CFG, map_fn=counting_map)
    assert len(calls) == 2  # nothing left to do


def test_per_shard_results_are_merged_as_they_arrive(world, monkeypatch):
    """The driver holds the running merge and a result or two, not one per shard (at the
    Gemma shape each is ~100 MB and a pass reads ~80 shards)."""
    import gc
    import weakref

    import diffing.collect as dc

    alive, peak = [0], [0]
    scan = dc.ScanTask.__call__

    def gone():
        alive[0] -= 1

    def tracked(self, shard):
        gc.collect()  # results already merged away are freed before this one counts
        out = scan(self, shard)
        alive[0] += 1
        weakref.finalize(out, gone)
        peak[0] = max(peak[0], alive[0])
        return out

    monkeypatch.setattr(dc.ScanTask, "__call__", tracked)
    rows = {lat: {"latent": lat, "group": "x", "delta_norm": 0.5} for lat in range(L)}
    ev = evidence_for_latents(world["store"], world["run"] / "crosscoder", [0, 4], CFG, rows)
    n_shards = len(world["store"].manifest.shards)
    assert n_shards >= 6 and [e.latent for e in ev] == [0, 4]
    assert peak[0] <= 3  # the running merge, the last result merged and the newest: 10 held before


def test_heldout_hash_uses_only_heldout_docs(world):
    cfg = CFG.model_copy(update={"heldout": "hash", "heldout_frac": 0.3})
    rows = {lat: {"latent": lat, "group": "x", "delta_norm": 0.5} for lat in range(L)}
    ev = evidence_for_latents(world["store"], world["run"] / "crosscoder", [0, 4], cfg, rows)
    keep = heldout_mask(world["doc"], cfg)
    assert 0.15 < keep.mean() < 0.45
    assert [e.latent for e in ev] == [0, 4]
    for e in ev:
        docs = {x.doc_id for x in e.top + e.quantiles + e.negatives}
        assert docs <= set(world["doc"][keep].tolist())
        assert e.stats["heldout_tokens"] == keep.sum()
        assert e.stats["freq"] == pytest.approx((world["f"][keep, e.latent] > 0).mean())


def test_heldout_last_shards_reads_only_the_last_shards(world):
    """heldout=last_shards: the evidence comes from the last ceil(frac * n) shards alone (the rows a
    fit that stopped short never saw), with statistics over exactly those rows."""
    import math

    cfg = CFG.model_copy(update={"heldout": "last_shards", "heldout_frac": 0.3})
    rows = {lat: {"latent": lat, "group": "x", "delta_norm": 0.5} for lat in range(L)}
    ev = evidence_for_latents(world["store"], world["run"] / "crosscoder", [0, 4], cfg, rows)
    shards = world["store"].manifest.shards
    first = len(shards) - math.ceil(0.3 * len(shards))
    start = sum(sh.n_rows for sh in shards[:first])  # rows are stored in order: the tail of the arrays
    assert 0 < start < len(world["doc"])
    for e in ev:
        assert {x.doc_id for x in e.top + e.quantiles + e.negatives} <= set(world["doc"][start:].tolist())
        assert e.stats["heldout_tokens"] == len(world["doc"]) - start
        assert e.stats["freq"] == pytest.approx((world["f"][start:, e.latent] > 0).mean())
        assert e.top[0].acts[e.top[0].peak] == pytest.approx(world["f"][start:, e.latent].max(), rel=1e-6)
        for x in e.top + e.quantiles + e.negatives:  # whole windows, across the shard boundaries too
            doc, pos = world["doc"], world["pos"]
            m = np.flatnonzero((doc == x.doc_id) & (np.abs(pos - x.pos) <= cfg.window))
            m = m[np.argsort(pos[m])]
            assert x.acts == pytest.approx(world["f"][m, e.latent].tolist(), abs=1e-5)


def test_uniform_hash_is_uniform_and_deterministic():
    u = uniform_hash(0, 1, np.arange(100_000))
    assert np.array_equal(u, uniform_hash(0, 1, np.arange(100_000)))
    assert abs(u.mean() - 0.5) < 0.01 and u.min() >= 0 and u.max() < 1
    assert not np.array_equal(u, uniform_hash(1, 1, np.arange(100_000)))


def test_evidence_json_roundtrip(world, tmp_path):
    import shutil

    run = tmp_path / "run"  # a copy: the order of the other tests does not matter
    shutil.copytree(world["run"], run, ignore=shutil.ignore_patterns("examples"))
    collect_evidence(run, world["store"], CFG)
    files = sorted((run / "examples").glob("*.jsonl"))
    assert files
    lines = [line for p in files for line in p.read_text().splitlines()]
    assert lines
    for line in lines:
        LatentEvidence.model_validate(json.loads(line))


@pytest.mark.ray
@pytest.mark.slow
@pytest.mark.timeout(300)
def test_ray_data_pass_equals_in_process(world, ray_cluster):
    from jobs.analyze import ray_data_map

    rows = {lat: {"latent": lat, "group": "x", "delta_norm": 0.5} for lat in range(L)}
    local = evidence_for_latents(world["store"], world["run"] / "crosscoder", [0, 2, 5], CFG, rows)
    dist = evidence_for_latents(
        world["store"], world["run"] / "crosscoder", [0, 2, 5], CFG, rows, map_fn=ray_data_map(2)
    )
    assert [e.model_dump() for e in dist] == [e.model_dump() for e in local]


def test_stale_range_is_redone(world, tmp_path):
    """A range file from an older selection (other latents) is rewritten, not trusted."""
    import shutil

    run = tmp_path / "run"
    shutil.copytree(world["run"], run, ignore=shutil.ignore_patterns("examples"))
    files = collect_evidence(run, world["store"], CFG)
    lines = files[0].read_text().splitlines()
    files[0].write_text(lines[0] + "\n")  # range 0-2 should hold latents 0 and 1
    collect_evidence(run, world["store"], CFG)
    assert [e.latent for e in read_jsonl(files[0], LatentEvidence)] == [0, 1]
    # as many latents, other ones: stale too
    files[0].write_text(lines[1] + "\n" + lines[1] + "\n")
    collect_evidence(run, world["store"], CFG)
    assert [e.latent for e in read_jsonl(files[0], LatentEvidence)] == [0, 1]
    # overwrite redoes a file that looks done
    tampered = lines[1].replace('"freq"', '"freq_x"', 1)
    assert tampered != lines[1]
    files[0].write_text(lines[0] + "\n" + tampered + "\n")  # latents 0 and 1: looks done
    collect_evidence(run, world["store"], CFG, overwrite=True)
    assert files[0].read_text().splitlines() == lines


def test_source_mass_of_every_latent_matches_naive_reference(world, tmp_path):
    import shutil

    run = tmp_path / "run"
    shutil.copytree(world["run"], run)
    path = collect_source_mass(run, world["store"], CFG)
    t = pq.read_table(path).to_pydict()
    assert t["latent"] == list(range(L))  # every latent, selected or not
    f = world["f"]
    for s in SOURCES:
        want = f[world["src"] == s].sum(0)
        got = np.asarray(t.get(f"mass/{s}", np.zeros(L)))
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
    # done work is skipped; overwrite redoes it
    mtime = path.stat().st_mtime_ns
    assert collect_source_mass(run, world["store"], CFG) == path and path.stat().st_mtime_ns == mtime
    pq.write_table(pa.table({"latent": [0]}), path)  # tampered with
    collect_source_mass(run, world["store"], CFG, overwrite=True)
    assert pq.read_table(path).to_pydict()["latent"] == list(range(L))


def test_the_every_latent_source_mass_pass_runs_only_where_it_is_read(world, tmp_path, monkeypatch):
    """Its only reader is the planted-truth check, and it encodes every latent over every held-out
    row (CPU-hours at the Gemma shape): `auto` runs it for a pipeline with `planted` only."""
    import shutil

    import diffing.analysis as da
    import diffing.collect as dc
    from jobs.analyze import run_analyze

    table = pq.read_table(world["run"] / "latents.parquet")
    table = table.append_column("class", pa.array(["shared"] * L)).append_column(
        "robust", pa.array([False] * L)
    )
    monkeypatch.setattr(da, "analyze_run", lambda *a, **k: table)  # the fixture's latents, as analysed
    calls = []
    monkeypatch.setattr(dc.MassTask, "__call__", lambda self, shard: calls.append(shard) or {})
    for i, (setting, planted, runs) in enumerate(
        [("auto", False, False), ("auto", True, True), ("never", True, False), ("always", False, True)]
    ):
        run = tmp_path / f"run{i}"
        shutil.copytree(world["run"], run)
        calls.clear()
        summary = run_analyze(
            run, world["store"], CFG.model_copy(update={"source_mass": setting}), planted=planted
        )
        assert bool(calls) == runs and ("source_mass" in summary) == runs, (setting, planted)
        assert list((run / "examples").glob("*.jsonl"))  # the selected latents' evidence either way


def test_a_ray_pass_unpickles_its_task_once_per_worker_process(monkeypatch):
    """The task (the encoder it carries, the store it opens) serves every shard a process gets."""
    import pickle

    import ray

    from jobs import analyze

    monkeypatch.setattr(ray, "get", lambda ref: ref)  # the "object ref" is the pickled task here
    first = analyze._task_fn("pass-1", pickle.dumps({"w": [1, 2]}))
    assert analyze._task_fn("pass-1", b"never unpickled again") is first
    assert analyze._task_fn("pass-2", pickle.dumps({"w": [3]})) == {"w": [3]} and list(analyze._TASK_FN) == [
        "pass-2"
    ]


def test_a_store_without_doc_ids_is_one_document_and_the_hashed_evidence_says_so(tmp_path, world):
    """write_arrays without doc_ids warns (every row is document 0), numbers positions over the whole
    input so no two shards share (doc, pos), and evidence with nothing held out is an error, not
    latents with empty contexts for the judge."""
    x, *_ = _data()
    with pytest.warns(UserWarning, match="no doc_ids"):
        store = write_arrays(str(tmp_path / "s"), x, model_names=["A", "B"], shard_rows=333, dtype="float32")
    import pyarrow.dataset as ds

    m = json.loads((tmp_path / "s" / "manifest.json").read_text())
    cols = ds.dataset([str(tmp_path / "s" / s["path"]) for s in m["shards"]], format="parquet").to_table(
        columns=["doc_id", "pos"]
    )
    assert cols["pos"].to_pylist() == list(range(len(x))) and set(cols["doc_id"].to_pylist()) == {0}
    # doc 0 hashes out of the held-out set under these settings: nothing to show
    cfg = AnalysisConfig(heldout="hash", heldout_frac=0.2, batch_size=64)
    assert not heldout_mask(np.zeros(1, np.int64), cfg)[0]
    rows = {0: {"group": "B-specific", "latent": 0}}
    with pytest.raises(ValueError, match="no held-out rows.*doc_ids"):
        evidence_for_latents(store, world["run"] / "crosscoder", [0], cfg, rows)


def test_a_window_reaches_back_into_the_first_shard(tmp_path):
    """A document cut between shards 0 and 1, peaking in shard 1 next to the cut: its window holds
    the rows before the cut too (every other shard boundary was covered; the first was not)."""
    x = np.zeros((20, 2, D), np.float32)
    x[:, 1, 0] = -1.0
    doc = np.repeat([0, 1, 2], [8, 5, 7])  # document 1: rows 8-12, across the cut at row 10
    pos = np.concatenate([np.arange(8), np.arange(5), np.arange(7)])
    x[9, 1, 0], x[10, 1, 0] = 0.5, 2.0  # latent 0 fires at rows 9 (shard 0) and 10 (shard 1)
    store = write_arrays(
        str(tmp_path / "s"),
        x,
        model_names=["A", "B"],
        doc_ids=doc,
        positions=pos,
        shard_rows=10,
        dtype="float32",
    )
    cc = _crosscoder()
    cc.save(tmp_path / "cc")
    cfg = CFG.model_copy(update={"n_top": 1, "window": 3, "n_negatives": 1})
    rows = {0: {"latent": 0, "group": "x", "delta_norm": 0.5}}
    (e,) = evidence_for_latents(store, tmp_path / "cc", [0], cfg, rows)
    (top,) = e.top
    assert (top.doc_id, top.pos) == (1, 2)
    assert top.acts == pytest.approx([0.0, 0.5, 2.0, 0.0, 0.0])  # positions 0-4: all of document 1
