"""Harvest: exact activations, Ray Data sharding to local and S3 stores, resume, bad input."""

import json
import os
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch

from diffing.harvest import CorpusSpec, HarvestConfig, Harvester, ModelSpec
from diffing.models import HarvestInputError
from diffing.store import StoreError, open_store

pytestmark = pytest.mark.timeout(300)
CHAT = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"}]


def _corpus(path, n=24):
    recs = []
    for i in range(n):
        if i % 3 == 0:
            recs.append(
                {
                    "id": f"c{i}",
                    "source": "chat",
                    "messages": [
                        {"role": "user", "content": f"What is {i} plus {i}?"},
                        {"role": "assistant", "content": f"It is {2 * i}."},
                    ],
                }
            )
        else:
            recs.append(
                {
                    "id": f"t{i}",
                    "source": "text",
                    "text": f"Document {i}: the quick brown fox jumps over {i} lazy dogs.",
                }
            )
    path.write_text("\n".join(json.dumps(r) for r in recs) + "\n")
    return recs


def _cfg(tiny_pair, corpus, store, **kw):
    base, ft = tiny_pair
    data = dict(
        models=[{"name": "base", "path": str(base)}, {"name": "ft", "path": str(ft)}],
        layer=2,
        corpus={"uri": str(corpus)},
        store=str(store),
        prompts_per_shard=5,
        batch_prompts=3,
        context_length=64,
        outlier_norm_mult=None,
        ray={"num_actors": 1, "num_cpus_per_actor": 0.5},
    )
    data.update(kw)
    return HarvestConfig.model_validate(data)


def test_activations_equal_a_direct_forward(tmp_path, tiny_pair):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    recs = _corpus(tmp_path / "c.jsonl", 4)
    cfg = _cfg(tiny_pair, tmp_path / "c.jsonl", tmp_path / "s", drop_first_raw_tokens=0)
    h = Harvester(cfg)
    rows = h.run(recs, doc_id_start=100)
    tok = AutoTokenizer.from_pretrained(str(tiny_pair[0]))
    for m, path in enumerate(tiny_pair):
        model = AutoModelForCausalLM.from_pretrained(str(path)).eval()
        for j, rec in enumerate(recs):
            text = (
                tok.apply_chat_template(rec["messages"], tokenize=False) if "messages" in rec else rec["text"]
            )
            ids = tok(text, add_special_tokens="messages" not in rec)["input_ids"]
            with torch.no_grad():
                hs = model(torch.tensor([ids]), output_hidden_states=True).hidden_states[cfg.layer + 1][0]
            sel = rows["doc_id"] == 100 + j
            pos = rows["pos"][sel]
            assert (rows["token_id"][sel] == np.array(ids)[pos]).all()
            want = hs[torch.from_numpy(pos).long()].half().float()
            got = rows["acts"][torch.from_numpy(sel)][:, m].half().float()
            assert torch.allclose(got, want, atol=1e-2, rtol=1e-2)
    assert set(rows["source"]) == {"chat", "text"}


def test_rows_leave_the_device_in_the_store_dtype(tmp_path, tiny_pair):
    """float16 rows are the float32 rows rounded once, in the same order (no float32 copy of a
    shard is kept on the host)."""
    recs = _corpus(tmp_path / "c.jsonl", 9)
    rows = {}
    for dt in ("float32", "float16"):
        cfg = _cfg(tiny_pair, tmp_path / "c.jsonl", tmp_path / "s", store_dtype=dt, device="cpu")
        rows[dt] = Harvester(cfg).run(recs, doc_id_start=0)
        assert rows[dt]["acts"].dtype == getattr(torch, dt)
    for key in ("doc_id", "pos", "token_id"):
        assert (rows["float32"][key] == rows["float16"][key]).all()
    assert rows["float32"]["source"] == rows["float16"]["source"]
    assert torch.equal(rows["float16"]["acts"], rows["float32"]["acts"].half())
    # the rows are in document order, then position
    order = np.lexsort((rows["float16"]["pos"], rows["float16"]["doc_id"]))
    assert (order == np.arange(len(order))).all()


def test_an_activation_beyond_float16_is_a_clear_error(tmp_path, tiny_pair, monkeypatch):
    import diffing.harvest as harvest_mod

    real = harvest_mod.residual_after_layer
    monkeypatch.setattr(harvest_mod, "residual_after_layer", lambda *a: real(*a) * 1e6)
    recs = _corpus(tmp_path / "c.jsonl", 3)
    cfg = _cfg(tiny_pair, tmp_path / "c.jsonl", tmp_path / "s", device="cpu")
    with pytest.raises(HarvestInputError, match="overflows store_dtype=float16.*store_dtype: float32"):
        Harvester(cfg).run(recs, doc_id_start=0)
    f32 = Harvester(cfg.model_copy(update={"store_dtype": "float32"})).run(recs, doc_id_start=0)
    assert torch.isfinite(f32["acts"]).all()


def _shards(recs, per=3):
    return [(f"{i // per:05d}", i, recs[i : i + per]) for i in range(0, len(recs), per)]


def _store_writer(cfg, h, root):
    from diffing.store import StoreWriter

    return StoreWriter(str(root), model_names=["base", "ft"], d_model=h.d_model, extra_columns=["source"])


def test_background_writes_give_the_same_shards(tmp_path, tiny_pair):
    """Shards written on threads while the next computes are the inline shards, byte for byte."""
    from diffing.harvest import harvest_shards

    recs = _corpus(tmp_path / "c.jsonl", 10)
    h = Harvester(_cfg(tiny_pair, tmp_path / "c.jsonl", tmp_path / "s", device="cpu"))
    got = {}
    for wt in (0, 1, 3):
        w = _store_writer(h.cfg, h, tmp_path / f"w{wt}")
        res = harvest_shards(h, w, _shards(recs), write_threads=wt, producer={"by": "test"})
        assert [r["shard_id"] for r in res] == ["00000", "00001", "00002", "00003"]
        got[wt] = [(r["n_rows"], w.done_shard(r["shard_id"]).sha256) for r in res]
        assert all(r["n_tokens"] >= r["n_rows"] > 0 for r in res)
    assert got[0] == got[1] == got[3]


def test_a_failed_background_write_is_raised_and_leaves_whole_shards_only(tmp_path, tiny_pair, monkeypatch):
    from diffing.harvest import harvest_shards

    recs = _corpus(tmp_path / "c.jsonl", 9)
    h = Harvester(_cfg(tiny_pair, tmp_path / "c.jsonl", tmp_path / "s", device="cpu"))
    w = _store_writer(h.cfg, h, tmp_path / "w")
    real = w.write_shard

    def flaky(sid, *a, **kw):
        if sid == "00001":
            raise OSError("disk full")
        return real(sid, *a, **kw)

    monkeypatch.setattr(w, "write_shard", flaky)
    with pytest.raises(OSError, match="disk full"):
        harvest_shards(h, w, _shards(recs), write_threads=2)
    # the write started before the failure finished; the failed shard is absent, not partial; a
    # later shard was either written whole or not started (the error stops the forward passes)
    assert w.done_shard("00000") is not None and w.done_shard("00001") is None
    assert sorted(p.name for p in (tmp_path / "w" / "shards").iterdir() if p.suffix == ".json") in (
        ["00000.json"],
        ["00000.json", "00002.json"],
    )
    w.finalize([w.done_shard(s) for s in ("00000", "00002") if w.done_shard(s)])
    assert open_store(str(tmp_path / "w")).n_rows > 0


def test_shards_per_call_overlap_writes_but_feed_every_actor():
    from jobs.harvest_actor import shards_per_call

    assert shards_per_call(1000, 8, 4) == 16  # a long harvest: 4 shards per writer thread
    assert shards_per_call(79, 8, 4) == 10  # a short one still reaches all 8 actors
    assert shards_per_call(3, 8, 4) == 1
    assert shards_per_call(20, 1, 0) == 1  # inline writes: nothing to overlap
    assert shards_per_call(20, 1, 1) == 4


@pytest.mark.parametrize("native", [False, True])
def test_auto_dtype_follows_the_hardware(cpu_bf16, native):
    from diffing.models import resolve_dtype

    cpu_bf16(native)
    assert resolve_dtype("auto", "cpu") == ("bfloat16" if native else "float32")
    for explicit in ("float32", "bfloat16", "float16"):
        assert resolve_dtype(explicit, "cpu") == explicit
    assert resolve_dtype("auto", "meta") == "float32"


def test_bfloat16_harvest_matches_float32_within_its_precision(tmp_path, tiny_pair, cpu_bf16):
    recs = _corpus(tmp_path / "c.jsonl", 6)
    rows = {}
    for dtype in ("float32", "bfloat16"):
        cfg = _cfg(tiny_pair, tmp_path / "c.jsonl", tmp_path / "s", drop_first_raw_tokens=0, device="cpu")
        models = [m.model_copy(update={"dtype": dtype}) for m in cfg.models]
        h = Harvester(cfg.model_copy(update={"models": models}))
        assert h.dtypes == [dtype, dtype]
        rows[dtype] = h.run(recs, doc_id_start=0)
    a, b = rows["float32"], rows["bfloat16"]
    for key in ("doc_id", "pos", "token_id"):
        assert (a[key] == b[key]).all()  # the same tokens, in the same order
    rel = (b["acts"] - a["acts"]).norm(dim=-1) / a["acts"].norm(dim=-1)
    assert rel.median() < 2e-2 and rel.max() < 1e-1  # bf16 keeps 8 mantissa bits
    # auto on a CPU without native bf16 is float32: the rows are the float32 rows exactly
    cpu_bf16(False)
    cfg = _cfg(tiny_pair, tmp_path / "c.jsonl", tmp_path / "s", drop_first_raw_tokens=0, device="cpu")
    auto = Harvester(
        cfg.model_copy(update={"models": [m.model_copy(update={"dtype": "auto"}) for m in cfg.models]})
    )
    assert auto.dtypes == ["float32", "float32"]
    assert torch.equal(auto.run(recs, doc_id_start=0)["acts"], a["acts"])


def test_shards_computed_in_different_dtypes_are_refused():
    from diffing.store import ShardInfo
    from jobs.harvest import resolved_dtypes

    def shard(i, dtypes):
        producer = {"device": "cpu", "dtypes": dtypes} if dtypes else {}
        return ShardInfo(
            shard_id=f"{i:02d}", path="p", n_rows=1, sha256="x", norm_sums=[1.0], producer=producer
        )

    bf16, fp32 = {"base": "bfloat16", "ft": "bfloat16"}, {"base": "float32", "ft": "float32"}
    assert resolved_dtypes([shard(0, bf16), shard(1, bf16), shard(2, None)]) == bf16  # None: an old sidecar
    assert resolved_dtypes([shard(0, None)]) == {}
    with pytest.raises(StoreError, match=r"different dtypes.*explicit dtype.*--overwrite"):
        resolved_dtypes([shard(0, bf16), shard(1, fp32)])


def test_shards_computed_from_different_contents_of_a_model_directory_are_refused():
    from diffing.store import ShardInfo
    from jobs.harvest import resolved_model_stamps

    def shard(i, stamps):
        return ShardInfo(
            shard_id=f"{i:02d}",
            path="p",
            n_rows=1,
            sha256="x",
            norm_sums=[1.0],
            producer={"model_stamps": stamps},
        )

    assert resolved_model_stamps([shard(0, {"ft": "a"}), shard(1, {"ft": "a"})]) == {"ft": "a"}
    from diffing.store import ShardInfo as S
    from jobs.harvest_shards import resolved_tokenizers

    tok = [
        S(
            shard_id=f"{i}",
            path="p",
            n_rows=1,
            sha256="x",
            norm_sums=[1.0],
            producer={"tokenizers": {"ft": v}},
        )
        for i, v in enumerate("ab")
    ]
    with pytest.raises(
        StoreError, match=r"tokenized by different vocabularies of a model \(ft: a in 1 shards"
    ):
        resolved_tokenizers(tok)
    with pytest.raises(StoreError, match=r"different contents of a model directory \(ft: a in 1 shards"):
        resolved_model_stamps([shard(0, {"ft": "a"}), shard(1, {"ft": "b"})])


def test_a_model_stamp_reads_every_byte_of_a_small_file_and_names_no_hub_id(tmp_path):
    from diffing.fingerprints import model_stamp

    d = tmp_path / "m"
    d.mkdir()
    (d / "config.json").write_text("{}")
    (d / "model.safetensors").write_bytes(bytes(3 << 19))  # 1.5 MiB
    before = model_stamp(d)
    (d / "model.safetensors").write_bytes(bytes((3 << 19) - 1) + b"\x01")  # its last byte
    assert model_stamp(d) != before
    assert model_stamp("HuggingFaceTB/SmolLM2-135M-Instruct") is None


def test_shards_computed_from_different_hub_revisions_are_refused():
    """Pods that downloaded today's snapshot of a hub model beside pods with last month's in their
    cache would mix two models' rows in one store."""
    from diffing.store import ShardInfo
    from jobs.harvest import resolved_revisions

    def shard(i, revisions):
        producer = {"device": "cuda", "revisions": revisions} if revisions is not None else {}
        return ShardInfo(
            shard_id=f"{i:02d}", path="p", n_rows=1, sha256="x", norm_sums=[1.0], producer=producer
        )

    a, b = "a" * 40, "b" * 40
    assert resolved_revisions([shard(0, {"it": a}), shard(1, {"it": a}), shard(2, None), shard(3, {})]) == {
        "it": a
    }
    with pytest.raises(StoreError, match=r"different revisions of a model \(it: aaaaaaaaaaaa in 1 shards"):
        resolved_revisions([shard(0, {"it": a, "pt": a}), shard(1, {"it": b, "pt": a})])


@pytest.mark.ray
def test_ray_harvest_local_store_and_rerun(tmp_path, tiny_pair, ray_cluster, monkeypatch):
    from jobs.harvest import run_harvest

    _corpus(tmp_path / "c.jsonl")
    shutil.copytree(tiny_pair[1], tmp_path / "ft")  # a checkpoint directory of the user's own
    tiny_pair = (tiny_pair[0], tmp_path / "ft")
    cfg = _cfg(tiny_pair, tmp_path / "c.jsonl", tmp_path / "s")
    m = run_harvest(cfg)
    assert len(m.shards) == 5 and m.model_names == ["base", "ft"] and m.layer == 2
    # what the models ran in, per shard and for the store (splice evaluation reloads them so)
    assert all(s.producer["dtypes"] == {"base": "float32", "ft": "float32"} for s in m.shards)
    assert m.metadata["resolved_dtypes"] == {"base": "float32", "ft": "float32"}
    # tokens seen and dropped as outliers: per shard, and in total for the store
    assert m.metadata["tokens_seen"] == sum(s.producer["n_tokens"] for s in m.shards) > 0
    assert m.metadata["outliers_dropped"] == sum(s.producer["n_outliers"] for s in m.shards)
    st = open_store(str(tmp_path / "s"))
    acts, meta = st.load()
    assert acts.shape[1:] == (2, 64) and len(acts) == m.n_rows
    assert set(meta["source"]) == {"chat", "text"}
    # first token of each raw-text doc dropped; nothing from padding
    text_docs = {int(d) for d, s in zip(meta["doc_id"], meta["source"], strict=True) if s == "text"}
    for d in text_docs:
        assert meta["pos"][meta["doc_id"] == d].min() >= 1
    # rerun: nothing to do, same manifest
    before = (tmp_path / "s" / "manifest.json").read_text()
    assert run_harvest(cfg) == m
    assert (tmp_path / "s" / "manifest.json").read_text() == before
    # ... without reading the corpus: the stamp names the file's version (minutes at millions of records)
    import jobs.harvest

    def no_read(spec):
        raise AssertionError("a finished store's rerun read the corpus")

    with monkeypatch.context() as mp:
        mp.setattr(jobs.harvest, "read_corpus", no_read)
        assert run_harvest(cfg) == m
        _corpus(tmp_path / "edited.jsonl", 23)  # another corpus file: the full path, which reads it
        with pytest.raises(AssertionError, match="read the corpus"):
            run_harvest(_cfg(tiny_pair, tmp_path / "edited.jsonl", tmp_path / "s"))
    # the same harvest named differently (relative store path, copied corpus): still nothing to do
    shutil.copy(tmp_path / "c.jsonl", tmp_path / "copy.jsonl")
    monkeypatch.chdir(tmp_path)
    assert run_harvest(_cfg(tiny_pair, "copy.jsonl", "s")) == m
    # different records under the same name: refused, store untouched
    _corpus(tmp_path / "copy.jsonl", 23)
    with pytest.raises(StoreError, match=r"different config \(corpus: other records\)"):
        run_harvest(_cfg(tiny_pair, "copy.jsonl", "s"))
    with pytest.raises(StoreError, match=r"different config \(layer: 2 -> 1; corpus: other records\)"):
        run_harvest(_cfg(tiny_pair, "copy.jsonl", "s", layer=1))  # the refusal names what changed
    assert (tmp_path / "s" / "manifest.json").read_text() == before
    # a stamp from before records were hashed (2026-12-06) says nothing of them: not "other records"
    stamp = tmp_path / "s" / "harvest_config.json"
    saved = stamp.read_text()
    stamp.write_text(json.dumps({k: v for k, v in json.loads(saved).items() if k != "records_sha256"}))
    with pytest.raises(StoreError, match=r"different config \(layer: 2 -> 1\); pass --overwrite"):
        run_harvest(_cfg(tiny_pair, tmp_path / "c.jsonl", "s", layer=1))
    stamp.write_text(saved)
    # the same corpus file with another setting: the stamp's fast path must not hand back the store
    with pytest.raises(StoreError, match=r"different config \(layer: 2 -> 1\); pass --overwrite"):
        run_harvest(_cfg(tiny_pair, tmp_path / "c.jsonl", "s", layer=1))
    # --overwrite on a finished store redoes it (clears it first), not hands it back
    s3 = shutil.copytree(tmp_path / "s", tmp_path / "s3")

    def cleared():
        raise RuntimeError("cleared")

    with pytest.raises(RuntimeError, match="cleared"):
        run_harvest(_cfg(tiny_pair, tmp_path / "c.jsonl", s3), overwrite=True, on_cleared=cleared)
    assert not (s3 / "manifest.json").exists()
    # a store stamped by a harvest stopped before its first shard (no Ray at --address): no rows of
    # the old config exist, so another config starts it without --overwrite
    (tmp_path / "s2").mkdir()
    (tmp_path / "s2" / "harvest_config.json").write_text(json.dumps({"hash": "x", "config": {"layer": 0}}))
    assert run_harvest(_cfg(tiny_pair, "c.jsonl", "s2")).n_rows == m.n_rows
    # the fine-tune retrained into the same directory: the finished store is not its activations
    from safetensors.torch import load_file, save_file

    from diffing.fingerprints import model_stamp
    from jobs.pipeline import Pipeline, PipelineConfig, with_defaults

    assert m.metadata["model_stamps"] == {
        "base": model_stamp(tiny_pair[0]),
        "ft": model_stamp(tmp_path / "ft"),
    }
    assert len(set(m.metadata["tokenizers"].values())) == 1 and set(m.metadata["tokenizers"]) == {
        "base",
        "ft",
    }
    assert model_stamp(tiny_pair[0]) == model_stamp(
        shutil.copytree(tiny_pair[0], tmp_path / "b2")
    )  # by content
    weights = load_file(tmp_path / "ft" / "model.safetensors")
    save_file({k: v + 1e-3 for k, v in weights.items()}, tmp_path / "ft" / "model.safetensors")
    with pytest.raises(StoreError, match=r"harvested from other contents of ft \(.*ft\).*--overwrite"):
        run_harvest(cfg)
    assert (tmp_path / "s" / "manifest.json").read_text() == before
    # ...and a pipeline run on that store takes its harvest for a changed stage
    hc = cfg.model_dump(mode="json")
    p = Pipeline(PipelineConfig.model_validate(with_defaults({"out": str(tmp_path / "run"), "harvest": hc})))
    assert p._models_changed() == [f"ft ({tmp_path / 'ft'})"]
    assert "other contents of ft" in str(p._changed("harvest"))
    # a harvest cut short, resumed over the rewritten directory: refused before any shard is computed
    (tmp_path / "s" / "manifest.json").unlink()
    last = sorted((tmp_path / "s" / "shards").glob("*.json"))[-1]
    last.unlink()
    with pytest.raises(StoreError, match=r"finished shards were computed from other contents of ft"):
        run_harvest(cfg)
    assert not last.exists()


@pytest.mark.ray
def test_ray_harvest_to_s3(tmp_path, tiny_pair, ray_cluster, s3_endpoint):
    from jobs.harvest import run_harvest

    _corpus(tmp_path / "c.jsonl", 10)
    cfg = _cfg(tiny_pair, tmp_path / "c.jsonl", "s3://crossdiff-test/harvest/one")
    m = run_harvest(cfg)
    st = open_store("s3://crossdiff-test/harvest/one")
    assert st.n_rows == m.n_rows > 0 and len(st.manifest.shards) == 2
    from jobs.status import run_status

    assert run_status("s3://crossdiff-test/harvest/one")["stages"] == [{"stage": "harvest", "state": "done"}]


@pytest.mark.ray
@pytest.mark.slow
def test_killed_driver_resumes_to_identical_rows(tmp_path, tiny_pair, ray_cluster):
    from jobs.harvest import run_harvest

    # 40 shards: on a warm cluster the harvest can write the last of 20 within one poll of the 4th
    n_shards = 40
    _corpus(tmp_path / "c.jsonl", 2 * n_shards)
    clean = _cfg(tiny_pair, tmp_path / "c.jsonl", tmp_path / "clean", prompts_per_shard=2)
    run_harvest(clean)
    cut = clean.model_copy(update={"store": str(tmp_path / "cut")})
    script = (
        "import sys; from diffing.harvest import HarvestConfig; from jobs.harvest import run_harvest; "
        "run_harvest(HarvestConfig.model_validate_json(sys.argv[1]), address=sys.argv[2])"
    )
    proc = subprocess.Popen(
        [sys.executable, "-c", script, cut.model_dump_json(), ray_cluster],
        start_new_session=True,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.time() + 200
    while time.time() < deadline and len(list((tmp_path / "cut" / "shards").glob("*.json"))) < 4:
        time.sleep(0.2)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    n_done = len(list((tmp_path / "cut" / "shards").glob("*.json")))
    assert 4 <= n_done < n_shards, n_done
    assert not (tmp_path / "cut" / "manifest.json").exists()
    finished = {p.name: p.stat().st_mtime_ns for p in (tmp_path / "cut" / "shards").glob("*.parquet")}
    finished = {
        n: t for n, t in finished.items() if (tmp_path / "cut" / "shards" / n).with_suffix(".json").exists()
    }
    assert len(finished) >= 4
    from jobs.status import run_status

    st = run_status(str(tmp_path / "cut"))  # `crossdiff status` of the killed store
    assert st["stages"] == [{"stage": "harvest", "state": "started"}] and st["progress"]["shards"] == n_shards
    # the actors outlive their killed driver a moment: a shard in flight may still land
    assert n_done <= st["progress"]["shards_done"] <= n_shards, (n_done, st["progress"])
    run_harvest(cut)
    # a resume: the shards finished before the kill were kept, not written again
    assert {n: (tmp_path / "cut" / "shards" / n).stat().st_mtime_ns for n in finished} == finished
    # the stamp records the corpus content: both stores came from the same records
    stamps = [json.loads((tmp_path / s / "harvest_config.json").read_text()) for s in ("clean", "cut")]
    assert (
        len(stamps[0]["records_sha256"]) == 64 and stamps[0]["records_sha256"] == stamps[1]["records_sha256"]
    )
    a, ma = open_store(str(tmp_path / "clean")).load()
    b, mb = open_store(str(tmp_path / "cut")).load()
    assert torch.equal(a, b)
    for k in ("doc_id", "pos", "token_id", "source"):
        assert (ma[k] == mb[k]).all()


@pytest.mark.parametrize("case", ["missing_column", "empty", "layer", "tokenizers", "template"])
def test_bad_inputs_fail_clearly_and_write_nothing(tmp_path, tiny_pair, case):
    from jobs.harvest import run_harvest

    _corpus(tmp_path / "c.jsonl", 4)
    kw, match = {}, None
    if case == "missing_column":
        (tmp_path / "c.jsonl").write_text(json.dumps({"prompt": "hi"}) + "\n")
        match = "neither a 'text' nor a 'messages'"
    elif case == "empty":
        (tmp_path / "c.jsonl").write_text("")
        match = "holds no records"
    elif case == "layer":
        kw["layer"] = 99
        match = "layer=99 is out of range"
    elif case == "template":  # Gemma's template raises on a system turn; found before any shard runs
        from transformers import AutoTokenizer

        template = (
            "{% for m in messages %}{% if m['role'] == 'system' %}{{ raise_exception('System role not "
            "supported') }}{% endif %}{{ m['content'] }}{% endfor %}"
        )
        kw["models"] = []
        for name, src in zip(("base", "ft"), tiny_pair, strict=True):
            shutil.copytree(src, tmp_path / name)
            tok = AutoTokenizer.from_pretrained(str(tmp_path / name))
            tok.chat_template = template
            tok.save_pretrained(str(tmp_path / name))
            kw["models"].append({"name": name, "path": str(tmp_path / name)})
        recs = [{"id": f"t{i}", "text": f"doc {i}"} for i in range(300)]
        recs.append({"id": "sys", "messages": [{"role": "system", "content": "Be brief."}, *CHAT]})
        (tmp_path / "c.jsonl").write_text("\n".join(json.dumps(r) for r in recs) + "\n")
        match = "record 'sys': the model's chat template rejects its messages.*System role not supported"
    else:
        from transformers import AutoTokenizer

        other = tmp_path / "other"
        shutil.copytree(tiny_pair[1], other)
        tok = AutoTokenizer.from_pretrained(str(other))
        tok.add_tokens(["quick brown"])
        tok.save_pretrained(str(other))
        kw["models"] = [{"name": "base", "path": str(tiny_pair[0])}, {"name": "ft", "path": str(other)}]
        match = "tokenizers disagree"
    cfg = _cfg(tiny_pair, tmp_path / "c.jsonl", tmp_path / "s", **kw)
    with pytest.raises(HarvestInputError, match=match):
        run_harvest(cfg)
    assert not (tmp_path / "s" / "shards").exists()


def test_unreachable_bucket_fails_before_work(tmp_path, tiny_pair, monkeypatch):
    from conftest import free_port

    from jobs.harvest import run_harvest

    _corpus(tmp_path / "c.jsonl", 4)
    monkeypatch.setenv("AWS_ENDPOINT_URL", f"http://127.0.0.1:{free_port()}")
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "x")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "x")
    monkeypatch.setenv("AWS_MAX_ATTEMPTS", "1")
    import s3fs

    s3fs.S3FileSystem.clear_instance_cache()  # fsspec caches clients; the endpoint comes from the env
    cfg = _cfg(tiny_pair, tmp_path / "c.jsonl", "s3://nobucket/x")
    try:
        with pytest.raises(StoreError, match="cannot write"):
            run_harvest(cfg)
    finally:
        s3fs.S3FileSystem.clear_instance_cache()  # don't leave a client for the dead endpoint behind


def test_config_validation():
    with pytest.raises(ValueError, match="at least two models"):
        HarvestConfig(models=[ModelSpec(name="a", path="x")], layer=0, corpus=CorpusSpec(uri="c"), store="s")
    with pytest.raises(ValueError, match="unique"):
        HarvestConfig(
            models=[ModelSpec(name="a", path="x"), ModelSpec(name="a", path="y")],
            layer=0,
            corpus=CorpusSpec(uri="c"),
            store="s",
        )


def test_harvest_models_keep_only_the_layers_up_to_the_site(tmp_path, tiny_pair):
    """The layers past the harvested one are never run: they are not loaded onto the device either
    (and the activations are those of the whole model, test_activations_equal_a_direct_forward)."""
    from diffing.models import load_model, n_layers

    full = n_layers(load_model(str(tiny_pair[0])))
    h = Harvester(_cfg(tiny_pair, tmp_path / "c.jsonl", tmp_path / "s", device="cpu"))
    assert all(n_layers(m) == h.cfg.layer + 1 < full for m in h.models)
    with pytest.raises(HarvestInputError, match="out of range"):
        Harvester(_cfg(tiny_pair, tmp_path / "c.jsonl", tmp_path / "s2", device="cpu", layer=full))


def test_a_store_that_drops_many_outliers_says_so():
    from diffing.store import ShardInfo
    from jobs.harvest import outlier_totals

    warned = []

    class Log:
        def warning(self, event, **kw):
            warned.append((event, kw))

    def shard(i, n, dropped):
        producer = {"n_tokens": n, "n_outliers": dropped}
        return ShardInfo(shard_id=f"{i}", path="p", n_rows=1, sha256="x", norm_sums=[1.0], producer=producer)

    assert outlier_totals([shard(0, 1000, 5), shard(1, 1000, 5)], Log()) == {
        "tokens_seen": 2000,
        "outliers_dropped": 10,
    }
    assert not warned
    outlier_totals([shard(0, 1000, 100)], Log())
    assert warned and warned[0][0] == "harvest.many_outliers"
    assert outlier_totals([ShardInfo(shard_id="0", path="p", n_rows=1, sha256="x", norm_sums=[1.0])]) == {}
