"""Splice prompts are the held-out documents as the harvest read them, and only the positions
the harvest kept are spliced: checked against a direct tokenisation of the corpus on a store with
dropped first tokens and dropped outliers (no Ray: the harvester and writer run in-process)."""

import json

import pytest
import torch

from diffing.config import AnalysisConfig
from diffing.harvest import HarvestConfig, Harvester, harvest_shards
from diffing.splice import heldout_prompts, splice_eval
from diffing.store import open_store
from jobs.harvest_actor import _writer

TEXTS = [
    "The quick brown fox jumps over the lazy dog, again and again.",
    "Crosscoders learn one dictionary for two models at once.",
    "Il pleut souvent en automne, et le bus arrive en retard.",
    "Numbers: 3, 14, 159, 2653 and 58979 are digits of pi.",
    "A short one.",
    "Model diffing asks what fine-tuning changed inside a model.",
]


def _store(tmp_path, tiny_pair, *, drop_first=2, outlier=1.2):
    tmp_path.mkdir(parents=True, exist_ok=True)
    corpus = tmp_path / "c.jsonl"
    recs = [{"id": f"d{i}", "text": t} for i, t in enumerate(TEXTS)]
    corpus.write_text("\n".join(json.dumps(r) for r in recs))
    cfg = HarvestConfig.model_validate(
        {
            "models": [
                {"name": "base", "path": str(tiny_pair[0])},
                {"name": "ft", "path": str(tiny_pair[1])},
            ],
            "layer": 1,
            "corpus": {"uri": str(corpus)},
            "store": str(tmp_path / "store"),
            "context_length": 48,
            "prompts_per_shard": 3,
            "batch_prompts": 3,
            "drop_first_raw_tokens": drop_first,
            "outlier_norm_mult": outlier,
            "device": "cpu",
        }
    )
    h = Harvester(cfg)
    writer = _writer(cfg, h.d_model)
    harvest_shards(h, writer, [("00000", 0, recs[:3]), ("00001", 3, recs[3:])], write_threads=0)
    writer.finalize()
    return open_store(cfg.store), cfg, corpus


def _tokenizers(tiny_pair):
    from diffing.models import load_tokenizer

    return [load_tokenizer(str(p)) for p in tiny_pair]


def _analysis(**kw):
    return AnalysisConfig.model_validate(
        {"heldout": "last_shards", "heldout_frac": 1.0, "splice_prompts": 8, **kw}
    )


def test_prompts_are_the_harvested_documents_and_only_kept_positions_are_spliced(tmp_path, tiny_pair):
    store, cfg, _ = _store(tmp_path, tiny_pair)
    toks = _tokenizers(tiny_pair)
    kept: dict[int, set[int]] = {}
    for i in range(len(store.manifest.shards)):
        t = store.read_table(i, columns=["doc_id", "pos"])
        for d, p in zip(t.column("doc_id").to_pylist(), t.column("pos").to_pylist(), strict=True):
            kept.setdefault(d, set()).add(p)
    gaps = [d for d, ps in kept.items() if max(ps) - min(ps) + 1 > len(ps)]
    assert gaps, "the planted outlier threshold should drop tokens inside some documents"

    prompts, masks, source = heldout_prompts(store, _analysis(), bos_id=toks[0].bos_token_id, tokenizers=toks)
    assert source == "corpus" and len(prompts) == len(TEXTS)
    for d, (ids, mask) in enumerate(zip(prompts, masks, strict=True)):
        truth = toks[0](TEXTS[d], truncation=True, max_length=cfg.context_length)["input_ids"]
        last = max(kept[d])
        assert ids == truth[: last + 2]  # every token, the dropped ones too, in place
        assert {p for p, m in enumerate(mask) if m} == kept[d]
        bos = int(truth[0] == toks[0].bos_token_id)
        assert not any(mask[: bos + cfg.drop_first_raw_tokens])  # BOS and the attention sinks never


def test_only_the_corpus_rows_up_to_the_last_prompt_are_read(tmp_path, tiny_pair, monkeypatch):
    import diffing.corpus as dc

    store, _, _ = _store(tmp_path, tiny_pair)
    toks = _tokenizers(tiny_pair)
    asked, real = [], dc.read_corpus
    monkeypatch.setattr(dc, "read_corpus", lambda spec: asked.append(spec.max_prompts) or real(spec))
    prompts, _, source = heldout_prompts(
        store, _analysis(splice_prompts=2), bos_id=toks[0].bos_token_id, tokenizers=toks
    )
    assert source == "corpus" and len(prompts) == 2
    assert asked == [2]  # documents 0 and 1 of the six
    monkeypatch.undo()
    every, _, _ = heldout_prompts(store, _analysis(), bos_id=toks[0].bos_token_id, tokenizers=toks)
    assert prompts == every[:2]  # whole documents: the second is not cut where the count was reached


def test_splice_scores_only_the_kept_positions(tiny_pair):
    from test_splice import _identity_crosscoder

    from diffing.models import load_model

    models = [load_model(str(p)) for p in tiny_pair]
    D = models[0].config.hidden_size
    prompts = [[1, 5, 6, 7, 8, 9, 10], [1, 11, 12, 13]]
    keep = [[False, False, True, False, True, True, True], [False, True, True, True]]
    res = splice_eval(models, _identity_crosscoder(D), 1, prompts, keep=keep, pad_id=0)
    # predictions at kept positions that have a next token: 3 (pos 2, 4, 5) + 2 (pos 1, 2)
    assert res["n_tokens"] == 5
    assert res["models"]["base"]["full"]["kl"] == pytest.approx(0, abs=1e-6)
    with pytest.raises(ValueError, match="one mask per prompt"):
        splice_eval(models, _identity_crosscoder(D), 1, prompts, keep=keep[:1])


def test_without_the_corpus_the_store_rows_rebuild_what_they_can(tmp_path, tiny_pair):
    toks = _tokenizers(tiny_pair)
    store, cfg, corpus = _store(tmp_path / "a", tiny_pair, drop_first=2)
    corpus.unlink()
    prompts, _, source = heldout_prompts(store, _analysis(), bos_id=toks[0].bos_token_id, tokenizers=toks)
    assert source == "store" and prompts == []  # every raw document lost its first tokens

    store, cfg, corpus = _store(tmp_path / "b", tiny_pair, drop_first=0, outlier=None)
    corpus.unlink()
    prompts, masks, source = heldout_prompts(store, _analysis(), bos_id=toks[0].bos_token_id, tokenizers=toks)
    assert source == "store" and len(prompts) == len(TEXTS)
    for d, (ids, mask) in enumerate(zip(prompts, masks, strict=True)):
        truth = toks[0](TEXTS[d], truncation=True, max_length=cfg.context_length)["input_ids"]
        bos = int(truth[0] == toks[0].bos_token_id)
        assert ids == truth and mask == [False] * bos + [True] * (len(ids) - bos)


def test_a_changed_corpus_falls_back_to_the_store(tmp_path, tiny_pair):
    toks = _tokenizers(tiny_pair)
    store, cfg, corpus = _store(tmp_path, tiny_pair, drop_first=0, outlier=None)
    corpus.write_text("\n".join(json.dumps({"id": i, "text": "something else " * 5}) for i in range(6)))
    prompts, _, source = heldout_prompts(store, _analysis(), bos_id=toks[0].bos_token_id, tokenizers=toks)
    assert source == "store" and len(prompts) == len(TEXTS)
    assert torch.tensor(prompts[0]).tolist() == toks[0](TEXTS[0], max_length=48, truncation=True)["input_ids"]


def test_splice_run_end_to_end(tmp_path, tiny_pair):
    from diffing.config import CrosscoderConfig
    from diffing.crosscoder import Crosscoder
    from diffing.splice import splice_run

    store, cfg, _ = _store(tmp_path, tiny_pair)
    toks = _tokenizers(tiny_pair)
    cfg_cc = CrosscoderConfig(kind="l1", n_latents=64).resolve(
        n_models=2, d_model=store.d_model, model_names=("base", "ft")
    )
    cc = Crosscoder(cfg_cc, seed=0)
    run = tmp_path / "run"
    cc.save(run / "crosscoder")
    res = splice_run(run, store, _analysis(splice=True))
    expect = 0
    for i in range(len(store.manifest.shards)):
        t = store.read_table(i, columns=["doc_id", "pos"])
        for d, p in zip(t.column("doc_id").to_pylist(), t.column("pos").to_pylist(), strict=True):
            n = len(toks[0](TEXTS[d], truncation=True, max_length=cfg.context_length)["input_ids"])
            expect += p >= 1 and p + 1 < n
    assert res["prompts_from"] == "corpus" and res["n_tokens"] == expect
    assert json.loads((run / "splice.json").read_text())["n_prompts"] == len(TEXTS)


def test_the_shared_only_variant_drops_exactly_the_model_specific_latents(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    from diffing.splice import specific_latents

    assert specific_latents(tmp_path) is None
    groups = ["A-specific", "baseline", "", "B-specific", "A-shared"]
    pq.write_table(pa.table({"latent": [0, 1, 2, 3, 4], "group": groups}), tmp_path / "latents.parquet")
    assert specific_latents(tmp_path) == [0, 3]
