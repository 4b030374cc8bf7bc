"""The store's contract at its edges: what write_arrays / StoreWriter write by default, what they
refuse (and that nothing is left half-written), and what the reader gives back. Each case here
was a mutant of diffing/store/ that the rest of the suite let through (2026-12-07)."""

from __future__ import annotations

import json
import warnings

import numpy as np
import pytest

from diffing.store import StoreError, StoreWriter, open_store, write_arrays
from diffing.store import writer as writer_mod

# most cases here write rows of no particular document
pytestmark = pytest.mark.filterwarnings("ignore:write_arrays. no doc_ids:UserWarning")


def _acts(n: int, d: int = 4, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((n, 2, d)).astype(np.float32)


def test_the_range_check_is_the_stores_own_dtype(tmp_path):
    """float32 holds 1e5 (the fix the float16 error names); float16 holds its largest value 65504."""
    acts = _acts(10)
    acts[3, 1, 2] = 1e5
    st = write_arrays(str(tmp_path / "f32"), acts, model_names=["a", "b"], dtype="float32")
    assert float(st.load()[0].max()) == 1e5
    acts[3, 1, 2] = 65504.0
    st = write_arrays(str(tmp_path / "f16"), acts, model_names=["a", "b"], dtype="float16")
    assert float(st.load()[0].max()) == 65504.0


def test_overflow_in_a_late_shard_is_refused_before_the_first_is_written(tmp_path):
    acts = _acts(10)
    acts[9, 0, 0] = 1e6
    with pytest.raises(StoreError, match="beyond float16's range"):
        write_arrays(str(tmp_path / "s"), acts, model_names=["a", "b"], shard_rows=5)
    assert not list(tmp_path.rglob("*.parquet"))


def test_rows_without_token_ids_carry_minus_one_not_a_real_token(tmp_path):
    st = write_arrays(str(tmp_path / "s"), _acts(20), model_names=["a", "b"], doc_ids=np.zeros(20, int))
    assert (st.load()[1]["token_id"] == -1).all()


def test_a_shuffled_buffer_without_positions_numbers_rows_in_the_order_given(tmp_path):
    """1,000 rows of five interleaved documents: each document's rows keep their input order
    (a stable count; an unstable sort reorders them past ~16 rows)."""
    rng = np.random.default_rng(1)
    doc = rng.integers(0, 5, 1000)
    acts = _acts(1000)
    acts[:, 0, 0] = np.arange(1000)  # each row's input index, to follow it
    with pytest.warns(UserWarning, match="numbered in the order given"):
        st = write_arrays(str(tmp_path / "s"), acts, model_names=["a", "b"], doc_ids=doc, dtype="float32")
    x, meta = st.load()
    for d in range(5):
        rows = meta["doc_id"] == d
        assert meta["pos"][rows].tolist() == list(range(int(rows.sum())))
        assert x[rows, 0, 0].tolist() == np.flatnonzero(doc == d).tolist()


def test_contiguous_documents_without_positions_get_no_warning_and_one_count(tmp_path):
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        st = write_arrays(str(tmp_path / "s"), _acts(4), model_names=["a", "b"], doc_ids=[0, 0, 1, 1])
    assert st.load()[1]["pos"].tolist() == [0, 1, 2, 3]


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(extra={"act_0": ["x"] * 6}), "would replace a store column"),
        (dict(extra={"doc_id": ["x"] * 6}), "would replace a store column"),
        (dict(dtype="bfloat16"), "dtype='bfloat16' is not supported"),
        (dict(model_names=["a", " "]), "are empty or contain ','"),
        (dict(model_names=["a", "b,c"]), "are empty or contain ','"),
        (dict(doc_ids=[0, 0, 1, 1, 2, 2], positions=[0, 1, 0, 0, 0, 1]), "doc_id 1 has position 0 on more"),
        (dict(positions=[0, 1, 2, 2, 3, 4]), "doc_id 0 has position 2 on more than one row"),
        (dict(extra={"src": ["x", 2, "y", "z", "w", "v"]}), "extra column 'src' cannot be stored as one"),
        (dict(shard_rows=2.5), "shard_rows must be a whole number >= 1, got 2.5"),
        (dict(shard_rows=True), "shard_rows must be a whole number"),
    ],
    ids=[
        "act-column",
        "meta-column",
        "bf16-store",
        "blank-name",
        "comma-name",
        "repeated-pos",
        "repeated-pos-one-doc",
        "mixed-extra",
        "fractional-shard-rows",
        "bool-shard-rows",
    ],
)
def test_write_arrays_refusals_name_the_problem(tmp_path, kwargs, match):
    kw = {"model_names": ["a", "b"], **kwargs}
    with pytest.raises(StoreError, match=match):
        write_arrays(str(tmp_path / "s"), _acts(6), **kw)
    assert not list(tmp_path.rglob("*.parquet"))


def test_acts_must_be_numbers_with_a_width(tmp_path):
    with pytest.raises(StoreError, match="acts must hold numbers"):
        write_arrays(str(tmp_path / "s"), _acts(2).astype(object), model_names=["a", "b"])
    with pytest.raises(StoreError, match="d_model = 0"):
        write_arrays(str(tmp_path / "s"), np.zeros((2, 2, 0), np.float32), model_names=["a", "b"])
    assert not list(tmp_path.rglob("*.parquet"))


def test_a_repeated_position_does_not_touch_the_store_it_would_overwrite(tmp_path):
    uri = str(tmp_path / "s")
    write_arrays(uri, _acts(4), model_names=["a", "b"])
    with pytest.raises(StoreError, match="position 0 on more than one row"):
        write_arrays(
            uri,
            _acts(4),
            model_names=["a", "b"],
            doc_ids=[3, 3, 4, 4],
            positions=[0, 0, 0, 1],
            overwrite=True,
        )
    assert open_store(uri).manifest.n_rows == 4 and len(list(tmp_path.rglob("*.parquet"))) == 1


def test_leftover_shards_without_a_manifest_are_a_store_to_keep(tmp_path):
    """An unfinished store (shards, no manifest) is not written over without overwrite=True, and
    counts as begun (a harvest with a changed config must keep it apart)."""
    (tmp_path / "s" / "shards").mkdir(parents=True)
    (tmp_path / "s" / "shards" / "00000.parquet").write_bytes(b"old")
    with pytest.raises(StoreError, match="already exists"):
        write_arrays(str(tmp_path / "s"), _acts(6), model_names=["a", "b"])
    w = StoreWriter(str(tmp_path / "t"), model_names=["a", "b"], d_model=4)
    assert not w.begun()
    w.write_shard("00000", _acts(6))
    assert w.begun() and not w.has_manifest()
    st = write_arrays(str(tmp_path / "s"), _acts(6), model_names=["a", "b"], overwrite=True)
    assert st.n_rows == 6 and not (tmp_path / "s" / "shards" / "00000.parquet").read_bytes() == b"old"


def test_write_shard_takes_exactly_the_stores_extra_columns(tmp_path):
    w = StoreWriter(str(tmp_path / "s"), model_names=["a", "b"], d_model=4, extra_columns=["source"])
    with pytest.raises(StoreError, match="do not match"):
        w.write_shard("00000", _acts(3), extra={"source": ["x"] * 3, "other": [1, 2, 3]})
    with pytest.raises(StoreError, match="do not match"):
        w.write_shard("00000", _acts(3), extra={})
    with pytest.raises(StoreError, match="positions has 2 entries but acts has 3 rows"):
        w.write_shard("00000", _acts(3), positions=np.arange(2), extra={"source": ["x"] * 3})
    assert not list(tmp_path.rglob("*.parquet"))


def test_write_shard_names_nan_as_nan(tmp_path):
    acts = _acts(3)
    acts[1, 0, 0] = np.nan
    w = StoreWriter(str(tmp_path / "s"), model_names=["a", "b"], d_model=4)
    with pytest.raises(StoreError, match="acts contain NaN or inf; nothing was written$"):
        w.write_shard("00000", acts)


def test_a_shard_whose_parquet_write_failed_is_not_done(tmp_path, monkeypatch):
    """The sidecar (the shard's 'done' mark) is written after its Parquet file: a write that dies
    in between leaves a shard a resume redoes, never a done mark without data."""
    w = StoreWriter(str(tmp_path / "s"), model_names=["a", "b"], d_model=4)
    real = writer_mod.atomic_write

    def failing(fs, path, data):
        if path.endswith(".parquet"):
            raise OSError("disk full")
        real(fs, path, data)

    monkeypatch.setattr(writer_mod, "atomic_write", failing)
    with pytest.raises(OSError):
        w.write_shard("00000", _acts(3))
    assert w.done_shard("00000") is None and not w.begun()


def test_finalize_orders_shards_by_id_and_its_metadata_wins(tmp_path):
    w = StoreWriter(str(tmp_path / "s"), model_names=["a", "b"], d_model=4, metadata={"k": 1, "keep": 0})
    b = w.write_shard("00001", _acts(3, seed=1))
    a = w.write_shard("00000", _acts(2, seed=2))
    m = w.finalize([b, a], metadata={"k": 2})
    assert [s.shard_id for s in m.shards] == ["00000", "00001"] and m.n_rows == 5
    assert m.metadata == {"k": 2, "keep": 0}
    assert json.loads((tmp_path / "s" / "manifest.json").read_text())["metadata"]["k"] == 2
    with pytest.raises(StoreError, match="no rows to write"):
        StoreWriter(str(tmp_path / "e"), model_names=["a", "b"], d_model=4).finalize([])


def test_load_cuts_acts_and_meta_alike_and_epochs_count_full_batches(tmp_path):
    st = write_arrays(str(tmp_path / "s"), _acts(300), model_names=["a", "b"], shard_rows=100)
    x, meta = st.load(150)
    assert len(x) == 150 and all(len(v) == 150 for v in meta.values())
    assert st.batches_per_epoch(7) == 300 // 7 == 42
    assert st.batches_per_epoch(300) == 1 and st.batches_per_epoch(301) == 0


def test_shuffled_batches_mix_rows_and_shard_order_varies_with_the_epoch(tmp_path):
    acts = _acts(600)
    acts[:, 0, 0] = np.arange(600)
    st = write_arrays(str(tmp_path / "s"), acts, model_names=["a", "b"], shard_rows=100, dtype="float32")
    first = next(st.iter_batches(10, shuffle=True, buffer_rows=1000))[:, 0, 0].numpy()
    assert not np.array_equal(np.sort(first), np.arange(first.min(), first.min() + 10))  # not one run
    # a buffer of one shard: the first batch's rows come from the first shard read, which the epoch picks
    shards = {
        int(next(st.iter_batches(10, shuffle=True, buffer_rows=100, epoch=e))[0, 0, 0]) // 100
        for e in range(8)
    }
    assert len(shards) > 1
    assert sorted(
        r for b in st.iter_batches(50, shuffle=True, buffer_rows=100) for r in b[:, 0, 0].tolist()
    ) == [float(i) for i in range(600)]  # still every row once


def test_the_reader_refuses_stores_that_do_not_match_their_manifest(tmp_path):
    write_arrays(str(tmp_path / "s"), _acts(10), model_names=["a", "b"])
    path = tmp_path / "s" / "manifest.json"
    good = json.loads(path.read_text())

    def opened_with(change):
        m = json.loads(json.dumps(good))
        change(m)
        path.write_text(json.dumps(m))
        return open_store(str(tmp_path / "s"))

    with pytest.raises(StoreError, match="has 10 rows, manifest says 11"):
        opened_with(lambda m: m["shards"][0].update(n_rows=11)).load()
    with pytest.raises(StoreError, match="names 3 models but a shard has no column 'act_2'"):
        opened_with(lambda m: m.update(model_names=["a", "b", "c"])).load()
    with pytest.raises(ValueError, match=r"shard_indices \[1\] out of range"):
        next(opened_with(lambda m: None).iter_batches(2, shard_indices=[1]))
    with pytest.raises(StoreError, match="is empty"):
        opened_with(lambda m: m.update(shards=[], n_rows=0))
    path.write_text("[]")
    with pytest.raises(StoreError, match="not a JSON object"):
        open_store(str(tmp_path / "s"))


def test_the_write_probe_leaves_nothing_behind(tmp_path):
    from diffing.store import check_writable
    from diffing.store.format import _fs

    fs, root = _fs(str(tmp_path / "out"))
    check_writable(fs, root, "store=out")
    assert list((tmp_path / "out").iterdir()) == []


def test_a_float64_tensor_beyond_float32_is_named_as_such(tmp_path):
    import torch

    acts = torch.zeros(4, 2, 4, dtype=torch.float64)
    acts[1, 0, 0] = 1e39
    with pytest.raises(StoreError, match="beyond float32's range"):
        write_arrays(str(tmp_path / "s"), acts, model_names=["a", "b"], dtype="float32")
