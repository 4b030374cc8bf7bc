"""The activation store contract: plain-pyarrow readable, atomic, verified, deterministic."""

import json
import subprocess
import sys

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch

from diffing.store import StoreError, StoreWriter, open_store, write_arrays


def _acts(n=1000, m=2, d=8, seed=0):
    return np.random.default_rng(seed).standard_normal((n, m, d)).astype(np.float32)


def test_roundtrip_and_plain_pyarrow(tmp_path):
    acts = _acts()
    doc = np.repeat(np.arange(10), 100)
    pos = np.tile(np.arange(100), 10)
    tok = np.arange(1000) % 97
    st = write_arrays(
        str(tmp_path / "s"),
        acts,
        model_names=["base", "ft"],
        doc_ids=doc,
        positions=pos,
        token_ids=tok,
        shard_rows=300,
    )
    assert st.n_rows == 1000 and len(st.manifest.shards) == 4
    got, meta = st.load()
    assert got.dtype == torch.float16 and got.shape == (1000, 2, 8)
    np.testing.assert_allclose(got.float().numpy(), acts, atol=2e-3, rtol=1e-3)
    assert (meta["doc_id"] == doc).all() and (meta["pos"] == pos).all() and (meta["token_id"] == tok).all()
    # plain pyarrow, no crossdiff and no Ray: fixed-size lists of d_model halves
    t = pq.read_table(tmp_path / "s" / "shards" / "00000.parquet")
    col = t.column("act_1").combine_chunks()
    assert col.type.list_size == 8
    np.testing.assert_allclose(col.flatten().to_numpy().reshape(-1, 8), acts[:300, 1], atol=2e-3, rtol=1e-3)
    m = json.loads((tmp_path / "s" / "manifest.json").read_text())
    assert m["model_names"] == ["base", "ft"] and m["d_model"] == 8
    # the README's recipe for the whole store, verbatim but for the path
    import pyarrow.dataset as ds

    STORE = tmp_path / "s"
    t = ds.dataset([f"{STORE}/{s['path']}" for s in m["shards"]], format="parquet").to_table()
    whole = np.stack(
        [
            t[f"act_{i}"].combine_chunks().flatten().to_numpy().reshape(-1, m["d_model"])
            for i in range(len(m["model_names"]))
        ],
        axis=1,
    )
    assert whole.dtype == np.float16 and whole.shape == (1000, 2, 8)
    np.testing.assert_array_equal(whole, got.numpy())
    want = np.linalg.norm(acts.astype(np.float16).astype(np.float32), axis=-1).mean(0)
    np.testing.assert_allclose(m["mean_norms"], want, rtol=1e-4)


def test_bytes_per_token_pair(tmp_path):
    d = 256
    st = write_arrays(str(tmp_path / "s"), _acts(4096, 2, d), model_names=["a", "b"])
    size = sum((tmp_path / "s" / s.path).stat().st_size for s in st.manifest.shards)
    assert size / st.n_rows <= 2 * d * 2 + 16  # fp16 pair + doc_id/pos/token_id


def test_shards_hold_row_groups_and_read_back_whole(tmp_path, monkeypatch):
    """Shards are split in ~16 MiB row groups (parallel decode); a multi-group shard reads back exactly."""
    import diffing.store.format as store_mod

    assert store_mod.row_group_rows(2 * 3584 * 2) == 1170  # Gemma-2-9b width: ~16 MiB groups
    assert store_mod.row_group_rows(2 * 576 * 2) == 7281
    monkeypatch.setattr(store_mod, "ROW_GROUP_BYTES", 1)  # the 1,024-row floor: 5 groups per shard
    acts = torch.randn(4500, 2, 8).half()
    write_arrays(str(tmp_path / "s"), acts, model_names=["A", "B"], shard_rows=4500)
    st = open_store(str(tmp_path / "s"))
    assert pq.ParquetFile(str(tmp_path / "s" / st.manifest.shards[0].path)).num_row_groups == 5
    a, _ = st.read_shard(0)
    assert a.shape == (4500, 2, 8) and np.array_equal(a, acts.numpy())


def test_corrupt_and_missing_shards_fail_clearly(tmp_path):
    st = write_arrays(str(tmp_path / "s"), _acts(), model_names=["a", "b"], shard_rows=500)
    p = tmp_path / "s" / st.manifest.shards[1].path
    data = bytearray(p.read_bytes())
    data[100] ^= 0xFF
    p.write_bytes(bytes(data))
    with pytest.raises(StoreError, match="corrupt"):
        open_store(str(tmp_path / "s")).load()
    p.unlink()
    with pytest.raises(StoreError, match="missing"):
        open_store(str(tmp_path / "s")).load()


def test_no_manifest_no_store(tmp_path):
    with pytest.raises(StoreError, match="no manifest.json"):
        open_store(str(tmp_path / "nothing"))


def test_failed_write_leaves_nothing_visible(tmp_path, monkeypatch):
    w = StoreWriter(str(tmp_path / "s"), model_names=["a", "b"], d_model=8)
    w.write_shard("00000", _acts(10))
    import diffing.store.writer as store_mod

    real = store_mod.pq.write_table

    def boom(table, buf, **kw):
        real(table, buf, **kw)
        raise OSError("disk full")

    monkeypatch.setattr(store_mod.pq, "write_table", boom)
    with pytest.raises(OSError):
        w.write_shard("00001", _acts(10))
    monkeypatch.undo()
    assert w.done_shard("00001") is None
    assert sorted(p.name for p in (tmp_path / "s" / "shards").iterdir()) == ["00000.json", "00000.parquet"]
    w.finalize()
    assert open_store(str(tmp_path / "s")).n_rows == 10


def test_refuses_to_overwrite_without_flag(tmp_path):
    write_arrays(str(tmp_path / "s"), _acts(), model_names=["a", "b"])
    with pytest.raises(StoreError, match="overwrite"):
        write_arrays(str(tmp_path / "s"), _acts(), model_names=["a", "b"])
    st = write_arrays(str(tmp_path / "s"), _acts(50), model_names=["a", "b"], overwrite=True)
    assert st.n_rows == 50


@pytest.mark.parametrize(
    "kwargs, match",
    [
        # the messages' own words (the parameter ids end up in tmp_path, which other errors name)
        (dict(acts=np.zeros((10, 1, 8)), model_names=["a"]), "a store needs >= 2 models"),
        (dict(acts=np.zeros((10, 2, 8)), model_names=["a"]), "2 models but model_names has 1"),
        (dict(acts=np.zeros((0, 2, 8)), model_names=["a", "b"]), r"acts is empty \(0 tokens\)"),
        (dict(acts=np.zeros((10, 8)), model_names=["a", "b"]), "n_tokens, n_models, d_model"),
        (dict(acts=np.full((10, 2, 8), np.nan), model_names=["a", "b"]), "acts contain NaN or inf"),
        (dict(acts=np.full((10, 2, 8), 1e5, np.float32), model_names=["a", "b"]), "beyond float16's range"),
        # metadata of the wrong length: refused before the first shard (else truncated, or a half store)
        (dict(acts=np.zeros((700, 2, 8)), model_names=["a", "b"], doc_ids=np.arange(10_000)), "doc_ids"),
        (dict(acts=np.zeros((700, 2, 8)), model_names=["a", "b"], positions=np.arange(400)), "positions"),
    ],
)
def test_bad_input(tmp_path, kwargs, match):
    acts = kwargs.pop("acts")
    with pytest.raises(StoreError, match=match):
        write_arrays(str(tmp_path / "s"), acts, shard_rows=300, **kwargs)
    assert not (tmp_path / "s" / "manifest.json").exists()
    assert not list((tmp_path / "s").rglob("*.parquet"))


def test_iter_batches_covers_each_row_once_and_is_deterministic(tmp_path):
    n = 1000
    acts = np.zeros((n, 2, 4), np.float32)
    acts[:, 0, 0] = np.arange(n)  # row id survives fp16 up to 2048
    st = write_arrays(str(tmp_path / "s"), acts, model_names=["a", "b"], shard_rows=128)
    ids = lambda it: np.concatenate([b[:, 0, 0].float().numpy() for b in it])  # noqa: E731
    a = ids(st.iter_batches(64, seed=1, epoch=0, buffer_rows=300, drop_last=False))
    assert sorted(a.astype(int).tolist()) == list(range(n))
    assert (a != np.arange(n)).any()  # shuffled
    np.testing.assert_array_equal(
        a, ids(st.iter_batches(64, seed=1, epoch=0, buffer_rows=300, drop_last=False))
    )
    assert (a != ids(st.iter_batches(64, seed=1, epoch=1, buffer_rows=300, drop_last=False))).any()
    skipped = ids(st.iter_batches(64, seed=1, epoch=0, buffer_rows=300, drop_last=False, skip_batches=5))
    np.testing.assert_array_equal(skipped, a[5 * 64 :])


def test_unshuffled_batches_stream_shard_by_shard(tmp_path):
    """In order, every row once, in batches that cut across shards, whatever the buffer; and
    holding about two shards, not `buffer_rows` (GBs at the Gemma shape)."""
    n, rows = 16 * 500, 500
    acts = np.zeros((n, 2, 64), np.float32)
    acts[:, 0, 0] = np.arange(n) % 2048  # row id, exact in fp16
    st = write_arrays(str(tmp_path / "s"), acts, model_names=["a", "b"], shard_rows=rows)
    want = acts[:, 0, 0]
    for kw in ({}, {"buffer_rows": 1}, {"drop_last": False}, {"skip_batches": 3}):
        got = np.concatenate([b[:, 0, 0].float().numpy() for b in st.iter_batches(96, shuffle=False, **kw)])
        start = 3 * 96 if kw.get("skip_batches") else 0
        end = n if kw.get("drop_last") is False else n // 96 * 96
        np.testing.assert_array_equal(got, want[start:end])
    shard_bytes = rows * 2 * 64 * 2  # float16
    # measured in a child process that exits without stopping tracemalloc: tracemalloc.stop()
    # racing a native thread that enters Python (Ray's, for the rest of this session once a test
    # started it) segfaults Python 3.11 (cpython gh-128679)
    child = (
        "import sys, tracemalloc; from diffing.store import open_store\n"
        "st = open_store(sys.argv[1])\n"
        "for i in range(2):\n"
        "    i and tracemalloc.start()\n"
        "    for _ in st.iter_batches(96, shuffle=False): pass\n"
        "print(tracemalloc.get_traced_memory()[1], flush=True)\n"
        "import os; os._exit(0)"
    )
    out = subprocess.run([sys.executable, "-c", child, st.uri], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    peak = int(out.stdout.split()[-1])
    assert peak < 4 * shard_bytes, peak / shard_bytes  # the whole store (16 shards) before


@pytest.mark.timeout(120)
def test_s3_store_roundtrip(s3_endpoint):
    acts = _acts(600)
    uri = "s3://crossdiff-test/stores/one"
    st = write_arrays(uri, acts, model_names=["a", "b"], shard_rows=250)
    back = open_store(uri)
    assert back.n_rows == 600 and len(back.manifest.shards) == 3
    got, _ = back.load()
    np.testing.assert_allclose(got.float().numpy(), acts, atol=2e-3, rtol=1e-3)
    assert st.manifest == back.manifest
    # plain pyarrow over S3 (endpoint from AWS_ENDPOINT_URL)
    import pyarrow.fs as pafs

    fs = pafs.S3FileSystem(
        endpoint_override=s3_endpoint, access_key="testing", secret_key="testing", region="us-east-1"
    )
    t = pq.read_table("crossdiff-test/stores/one/shards/00000.parquet", filesystem=fs)
    assert t.num_rows == 250


def test_half_precision_input_is_stored_as_given(tmp_path):
    """A float16 shard (the harvest's own rows) is stored bit for bit, from numpy or torch, and
    its norm statistics are those of the stored values."""
    acts = _acts(300).astype(np.float16)
    w = StoreWriter(str(tmp_path / "s"), model_names=["a", "b"], d_model=8)
    info_np = w.write_shard("00000", acts)
    info_t = w.write_shard("00001", torch.from_numpy(acts))
    w.finalize()
    st = open_store(str(tmp_path / "s"))
    for i in range(2):
        got, _ = st.read_shard(i)
        assert got.dtype == np.float16 and np.array_equal(got, acts)
    want = np.linalg.norm(acts.astype(np.float32), axis=-1).sum(0)
    np.testing.assert_allclose(info_np.norm_sums, want, rtol=1e-6)
    assert info_np.norm_sums == info_t.norm_sums


@pytest.mark.timeout(120)
def test_shards_written_by_other_processes_are_seen_through_a_cached_listing(s3_endpoint):
    """The pipeline lists the run on S3 (s3fs caches that listing) before the harvest's actors, other
    processes, write their shards: the driver must still see them when it checks what is done."""
    import s3fs

    uri = "s3://crossdiff-test/stores/listed"
    mine = StoreWriter(uri, model_names=["a", "b"], d_model=8)
    mine.write_shard("00000", _acts(50))
    mine.fs.find(uri)  # the listing s3fs keeps: shards/ holds 00000 only
    other = StoreWriter(uri, model_names=["a", "b"], d_model=8)
    other.fs = s3fs.S3FileSystem(skip_instance_cache=True)  # another process's own client
    other.write_shard("00001", _acts(50))
    assert mine.done_shard("00001") is not None and mine.done_shard("00002") is None


def test_write_arrays_and_iter_batches_refuse_plausible_mistakes(tmp_path):
    x = np.random.default_rng(0).standard_normal((100, 2, 4)).astype(np.float32)
    with pytest.raises(StoreError, match="list of names"):
        write_arrays(str(tmp_path / "a"), x, model_names="AB", doc_ids=np.arange(100))
    with pytest.raises(StoreError, match="shard_rows must be a whole number >= 1"):
        write_arrays(str(tmp_path / "b"), x, model_names=["A", "B"], doc_ids=np.arange(100), shard_rows=0)
    st = write_arrays(str(tmp_path / "c"), x, model_names=["A", "B"], doc_ids=np.arange(100), shard_rows=40)
    with pytest.raises(ValueError, match="batch_size must be >= 1"):
        next(st.iter_batches(0))
    with pytest.raises(ValueError, match=r"shard_indices \[9\] out of range: the store has 3 shards"):
        next(st.iter_batches(8, shard_indices=[0, 9]))


@pytest.mark.parametrize("where", ["local", "s3"])
def test_done_shards_reads_many_sidecars_in_one_listing(tmp_path, where, request):
    """One listing and one batched read: the same answers as one done_shard call per shard."""
    uri = (
        str(tmp_path / "s")
        if where == "local"
        else (request.getfixturevalue("s3_endpoint") and "s3://crossdiff-test/stores/done")
    )
    w = StoreWriter(uri, model_names=["a", "b"], d_model=8)
    w.write_shard("00000", _acts(40))
    w.write_shard("00002", _acts(30))
    ids = ["00000", "00001", "00002", "00003"]
    got = w.done_shards(ids)
    assert list(got) == ids and got == {s: w.done_shard(s) for s in ids}
    assert got["00001"] is None and got["00002"].n_rows == 30
    assert StoreWriter(str(tmp_path / "empty"), model_names=["a", "b"], d_model=8).done_shards(
        ids
    ) == dict.fromkeys(ids)


def test_write_arrays_groups_rows_given_in_any_order_by_document(tmp_path):
    """A shuffled activation buffer (rows in any order) is stored as a harvest stores it: each
    document's rows together and in position order, documents in order of first appearance, every
    row still carrying its own activations, token and extra values."""
    rng = np.random.default_rng(0)
    doc = np.repeat([30, 10, 20], 40)
    pos = np.tile(np.arange(40), 3)
    acts = rng.standard_normal((120, 2, 4)).astype(np.float32)
    tok = rng.integers(0, 99, 120)
    src = [f"s{d}" for d in doc]
    perm = rng.permutation(120)
    st = write_arrays(
        str(tmp_path / "s"),
        acts[perm],
        model_names=["A", "B"],
        doc_ids=doc[perm],
        positions=pos[perm],
        token_ids=tok[perm],
        extra={"source": [src[i] for i in perm]},
        shard_rows=25,
        dtype="float32",
    )
    x, meta = st.load()
    first = list(dict.fromkeys(doc[perm].tolist()))  # documents as they first appear in the input
    assert meta["doc_id"].tolist() == [d for d in first for _ in range(40)]
    for d in first:
        assert meta["pos"][meta["doc_id"] == d].tolist() == list(range(40))
    key = {(int(d), int(p)): i for i, (d, p) in enumerate(zip(doc, pos, strict=True))}
    idx = [key[(int(d), int(p))] for d, p in zip(meta["doc_id"], meta["pos"], strict=True)]
    np.testing.assert_array_equal(x.numpy(), acts[idx])
    assert meta["token_id"].tolist() == tok[idx].tolist()
    assert list(meta["source"]) == [src[i] for i in idx]


def test_bfloat16_tensors_are_converted_a_shard_at_a_time(tmp_path, monkeypatch):
    """A bf16 model's activations (a dtype numpy lacks) are stored as their float32 values would
    be, in any row order, without a float32 copy of the whole input (twice its memory); a NaN in
    them is still refused, naming its row, before any shard is written."""
    g = torch.Generator().manual_seed(0)
    acts = torch.randn(600, 2, 8, generator=g).bfloat16()
    perm = torch.randperm(600, generator=g).numpy()
    kw = dict(
        model_names=["A", "B"],
        doc_ids=np.repeat(np.arange(6), 100)[perm],
        positions=np.tile(np.arange(100), 6)[perm],
        shard_rows=150,
    )
    want = write_arrays(str(tmp_path / "f32"), acts.float(), **kw).load()
    sizes = []
    real = torch.Tensor.float
    monkeypatch.setattr("diffing.store.layout.CHECK_CHUNK_BYTES", 100 * 2 * 8 * 2)  # its check: 100 rows
    monkeypatch.setattr(torch.Tensor, "float", lambda t: sizes.append(t.numel()) or real(t))
    got = write_arrays(str(tmp_path / "bf16"), acts, **kw).load()
    monkeypatch.undo()
    assert torch.equal(got[0], want[0]) and got[0].dtype == torch.float16
    assert all(np.array_equal(got[1][k], want[1][k]) for k in ("doc_id", "pos", "token_id"))
    assert sizes and max(sizes) <= 150 * 2 * 8  # one shard at most, never the whole input
    bad = acts.clone()
    bad[417, 1, 3] = float("nan")
    with pytest.raises(StoreError, match=r"NaN or inf \(first at row 417\); nothing was written"):
        write_arrays(str(tmp_path / "nan"), bad, **kw)
    assert not (tmp_path / "nan").exists() or not any((tmp_path / "nan").rglob("*.parquet"))


def test_bring_your_own_mistakes_are_refused_before_anything_is_written(tmp_path):
    """Bad values in a later shard, ids that are not integers, a shard whose documents interleave:
    each refused with the fix, and nothing left behind that blocks the corrected write."""
    rng = np.random.default_rng(0)
    acts = rng.standard_normal((2000, 2, 4)).astype(np.float32)
    doc = np.repeat(np.arange(20), 100)
    acts[1500, 1, 2] = np.inf
    with pytest.raises(StoreError, match="NaN or inf \\(first at row 1500\\); nothing was written"):
        write_arrays(str(tmp_path / "s"), acts, model_names=["A", "B"], doc_ids=doc, shard_rows=1000)
    assert not (tmp_path / "s" / "shards").exists()
    acts[1500, 1, 2] = 0.0
    write_arrays(
        str(tmp_path / "s"), acts, model_names=["A", "B"], doc_ids=doc, shard_rows=1000
    )  # no overwrite
    with pytest.raises(StoreError, match="beyond float16's range.*float32"):
        write_arrays(str(tmp_path / "h"), acts * 1e5, model_names=["A", "B"], doc_ids=doc)
    with pytest.raises(StoreError, match="doc_ids must be one integer per token.*np.unique"):
        write_arrays(str(tmp_path / "t"), acts, model_names=["A", "B"], doc_ids=[f"d{d}" for d in doc])
    with pytest.raises(StoreError, match="doc_ids must be one integer per token"):
        write_arrays(str(tmp_path / "t"), acts, model_names=["A", "B"], doc_ids=doc[:, None])
    big = np.full(len(doc), 2**31, np.int64)  # an int32 column would wrap it silently
    with pytest.raises(StoreError, match=r"token_ids holds 2147483648; they must lie in \[-1, 2\*\*31 - 1\]"):
        write_arrays(str(tmp_path / "t"), acts, model_names=["A", "B"], doc_ids=doc, token_ids=big)
    with pytest.raises(StoreError, match=r"positions holds -1; they must lie in \[0,"):
        write_arrays(
            str(tmp_path / "t"), acts, model_names=["A", "B"], doc_ids=doc, positions=-np.ones_like(doc)
        )
    assert not (tmp_path / "t").exists()
    w = StoreWriter(str(tmp_path / "w"), model_names=["A", "B"], d_model=4)
    perm = rng.permutation(1000)
    with pytest.raises(
        StoreError, match="a document's rows are not together.*sort the whole buffer by \\(doc_id, pos\\)"
    ):
        w.write_shard("00000", acts[perm], doc_ids=doc[perm])
    assert not (tmp_path / "w" / "shards" / "00000.parquet").exists()


def test_a_shuffled_buffer_without_positions_numbers_each_document_in_order_given(tmp_path):
    rng = np.random.default_rng(1)
    doc = np.repeat([7, 3], 50)
    acts = rng.standard_normal((100, 2, 4)).astype(np.float32)
    perm = rng.permutation(100)
    with pytest.warns(UserWarning, match="numbered in the order given; pass positions"):
        st = write_arrays(str(tmp_path / "s"), acts[perm], model_names=["A", "B"], doc_ids=doc[perm])
    _, meta = st.load()
    first = int(doc[perm][0])
    assert meta["doc_id"].tolist() == [first] * 50 + [10 - first] * 50
    assert meta["pos"].tolist() == list(range(50)) * 2  # windows of consecutive tokens, not gaps
