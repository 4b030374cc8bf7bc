"""Harvest inputs that users bring and our own pair does not exercise: Gemma-2's softcapped
attention, multimodal configs, a base model without a chat template, tokenizers that add tokens or
BOS, Parquet chats with timestamps, foreign or mismatched stores, broken config files."""

from __future__ import annotations

import json
import shutil

import pytest
import torch

from diffing.harvest import HarvestConfig, Harvester
from diffing.models import HarvestInputError, load_model, residual_after_layer
from diffing.store import StoreError, open_store, write_arrays
from diffing.tokens import check_tokenizers_agree

pytestmark = pytest.mark.timeout(120)
CHAT = {
    "id": "c",
    "messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"}],
}


def _tiny(tmp_path, name, model):
    from diffing.embedded.tiny import byte_tokenizer

    d = tmp_path / name
    model.save_pretrained(d)
    byte_tokenizer().save_pretrained(d)
    return d


def _cfg(paths, store, records, tmp_path, **kw):
    (tmp_path / "c.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    return HarvestConfig.model_validate(
        dict(
            models=[{"name": f"m{i}", "path": str(p)} for i, p in enumerate(paths)],
            layer=1, corpus={"uri": str(tmp_path / "c.jsonl")}, store=str(store), device="cpu",
            prompts_per_shard=4, batch_prompts=2, context_length=32, outlier_norm_mult=None,
            drop_first_raw_tokens=0, **kw,
        )
    )  # fmt: skip


def test_gemma2_is_harvested_with_its_attention_softcap(tmp_path):
    from transformers import AutoModelForCausalLM, Gemma2Config, Gemma2ForCausalLM

    torch.manual_seed(0)
    cfg = Gemma2Config(
        vocab_size=259, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=2,
        num_key_value_heads=2, head_dim=32, sliding_window=16, attn_logit_softcapping=5.0,
    )  # fmt: skip
    model = Gemma2ForCausalLM(cfg)
    with torch.no_grad():  # large attention logits, so the softcap matters
        for layer in model.model.layers:
            layer.self_attn.q_proj.weight.mul_(40)
            layer.self_attn.k_proj.weight.mul_(40)
    path = _tiny(tmp_path, "gemma2", model)
    ids = torch.randint(3, 259, (2, 12))
    mask = torch.ones_like(ids)
    got = residual_after_layer(load_model(str(path)), ids, mask, 1)
    eager = AutoModelForCausalLM.from_pretrained(path, attn_implementation="eager").eval()
    sdpa = AutoModelForCausalLM.from_pretrained(path, attn_implementation="sdpa").eval()
    want = residual_after_layer(eager, ids, mask, 1)
    assert torch.allclose(got, want, atol=1e-5)
    # the premise: the default kernel would have skipped the softcap
    assert not torch.allclose(residual_after_layer(sdpa, ids, mask, 1), want, atol=1e-3)


def test_a_base_without_a_chat_template_reads_the_chats_the_other_renders(tmp_path, tiny_pair):
    from transformers import AutoTokenizer

    base = tmp_path / "base"
    shutil.copytree(tiny_pair[0], base)
    tok = AutoTokenizer.from_pretrained(base)
    tok.chat_template = None
    tok.save_pretrained(base)
    (base / "chat_template.jinja").unlink(missing_ok=True)
    assert AutoTokenizer.from_pretrained(base).chat_template is None
    recs = [CHAT, {"id": "t", "text": "plain text"}]
    with_template = Harvester(_cfg([tiny_pair[0], tiny_pair[1]], tmp_path / "a", recs, tmp_path)).run(recs, 0)
    without = Harvester(_cfg([base, tiny_pair[1]], tmp_path / "b", recs, tmp_path)).run(recs, 0)
    assert (with_template["token_id"] == without["token_id"]).all()
    assert torch.equal(with_template["acts"], without["acts"])


def test_tokenizers_that_disagree_say_where_and_why(tmp_path, tiny_pair):
    from diffing.embedded.tiny import byte_tokenizer

    a, b = byte_tokenizer(), byte_tokenizer()
    b.add_bos_token = True  # a tokenizer saved with add_bos_token
    b._tokenizer.post_processor = __import__("tokenizers").processors.TemplateProcessing(
        single="<|im_start|> $A", special_tokens=[("<|im_start|>", 1)]
    )
    with pytest.raises(HarvestInputError, match=r"model 'ft' .* record 't1'.*at token 0.*add_bos_token"):
        check_tokenizers_agree([a, b], [{"id": "t1", "text": "hello"}], ["base", "ft"])


def test_a_pad_token_past_the_other_models_vocabulary_is_never_fed_to_it(tmp_path, tiny_pair):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    padded = tmp_path / "padded"
    shutil.copytree(tiny_pair[0], padded)
    tok = AutoTokenizer.from_pretrained(padded)
    tok.add_special_tokens({"pad_token": "[PAD]"})  # id 259, past the other model's 259 embeddings
    tok.save_pretrained(padded)
    model = AutoModelForCausalLM.from_pretrained(padded)
    model.resize_token_embeddings(len(tok))
    model.save_pretrained(padded)
    recs = [{"id": f"t{i}", "text": "word " * (i + 1)} for i in range(4)]  # padded batches
    h = Harvester(_cfg([padded, tiny_pair[1]], tmp_path / "s", recs, tmp_path))
    out = h.run(recs, 0)
    assert out["n_kept"] > 0 and h.pad_id < 259
    with pytest.raises(HarvestInputError, match="tokenizers disagree.*'\\[PAD\\]'"):
        h.run([{"id": "p", "text": "a [PAD] b"}], 0)
    h.check_tokens = lambda records: None  # one tokenizer for both, a smaller second embedding
    with pytest.raises(HarvestInputError, match=r"token id 259, past the vocabulary of model\(s\) \['m1'\]"):
        h.run([{"id": "p", "text": "a [PAD] b"}], 0)


def test_parquet_chats_with_timestamps_are_read_json_safe(tmp_path):
    import datetime

    import pyarrow as pa
    import pyarrow.parquet as pq

    from diffing.corpus import CorpusSpec, read_corpus

    ts = datetime.datetime(2024, 1, 2, 3, 4, 5)
    msgs = [[{"role": "user", "content": "Hi", "ts": ts}, {"role": "assistant", "content": "Yo", "ts": ts}]]
    pq.write_table(pa.table({"messages": msgs, "source": [0]}), tmp_path / "c.parquet")
    recs = read_corpus(CorpusSpec(uri=str(tmp_path / "c.parquet")))
    json.dumps(recs)  # shipped to Ray workers as JSON
    assert recs[0]["messages"][0]["ts"].startswith("2024-01-02") and recs[0]["source"] == "0"


def test_a_store_no_harvest_stamped_is_not_adopted(tmp_path, tiny_pair):
    import numpy as np

    from jobs.harvest import run_harvest

    store = tmp_path / "s"
    write_arrays(str(store), np.full((30, 2, 64), 7.0, np.float32), model_names=["m0", "m1"], shard_rows=10)
    recs = [{"id": f"t{i}", "text": f"doc {i}"} for i in range(3)]
    with pytest.raises(StoreError, match="no harvest stamped"):
        run_harvest(_cfg(list(tiny_pair), store, recs, tmp_path))


def test_manifests_that_do_not_match_their_shards_are_refused(tmp_path):
    import numpy as np

    write_arrays(str(tmp_path / "s"), np.ones((20, 2, 8), np.float32), model_names=["a", "b"], shard_rows=10)
    path = tmp_path / "s" / "manifest.json"
    good = json.loads(path.read_text())
    path.write_text(json.dumps({**good, "format_version": 2, "new_field": 1}))
    with pytest.raises(StoreError, match="format_version 2; this crossdiff reads 1"):
        open_store(str(tmp_path / "s"))
    path.write_text(json.dumps({**good, "d_model": 16}))
    with pytest.raises(StoreError, match="8 values but the manifest says d_model=16"):
        open_store(str(tmp_path / "s")).load()
    path.write_text(json.dumps(good)[:40])
    with pytest.raises(StoreError, match="not a JSON object"):
        open_store(str(tmp_path / "s"))


def test_overflowing_activations_name_the_model_and_the_fix(tmp_path, tiny_pair, monkeypatch):
    import diffing.harvest as harvest

    recs = [{"id": "t", "text": "hello world"}]
    h = Harvester(_cfg(list(tiny_pair), tmp_path / "s", recs, tmp_path))
    real = harvest.residual_after_layer
    calls = iter(range(100))

    def overflow(model, ids, mask, layer):
        out = real(model, ids, mask, layer)
        return out * float("inf") if next(calls) % 2 else out  # the second model overflows

    monkeypatch.setattr(harvest, "residual_after_layer", overflow)
    with pytest.raises(HarvestInputError, match="model 'm1' produced inf/NaN.*models.1.dtype"):
        h.run(recs, 0)


def test_context_longer_than_the_models_positions_is_refused(tmp_path):
    from transformers import GPT2Config, GPT2LMHeadModel

    from jobs.harvest import preflight

    gpt2 = _tiny(
        tmp_path,
        "gpt2",
        GPT2LMHeadModel(GPT2Config(vocab_size=259, n_embd=32, n_layer=2, n_head=2, n_positions=16)),
    )
    recs = [{"id": "t", "text": "hello"}]
    with pytest.raises(HarvestInputError, match="context_length=32 exceeds model 'm0'.s 16 positions"):
        preflight(_cfg([gpt2, gpt2], tmp_path / "s", recs, tmp_path), recs)


def test_broken_config_files_are_config_errors(tmp_path):
    from diffing.config import ConfigError, load_config
    from diffing.harvest import HarvestConfig as HC
    from jobs.pipeline_config import load_pipeline_config

    bad = tmp_path / "bad.yaml"
    bad.write_text("layer: 3\nmodels: [a, b\n")
    for load in (lambda p: load_config(HC, p), lambda p: load_pipeline_config(p)):
        with pytest.raises(ConfigError, match=r"bad.yaml: YAML error at line \d+, column \d+"):
            load(bad)
        with pytest.raises(ConfigError, match="is a directory"):
            load(tmp_path)
    nested = tmp_path / "pipe.yaml"
    nested.write_text("out: r\nharvest: {layer: 3}\nfit: {}\n")
    with pytest.raises(ConfigError, match="it is a pipeline config; run `crossdiff pipeline"):
        load_config(HC, nested)


def test_write_arrays_refuses_columns_that_would_clash(tmp_path):
    import numpy as np

    acts = np.ones((10, 2, 4), np.float32)
    for kw, match in (
        ({"model_names": ["a", "a"]}, "repeat a name"),
        ({"model_names": ["a", "b"], "extra": {"doc_id": list(range(10))}}, "would replace a store column"),
        ({"model_names": ["a", "b"], "extra": {"source": ["x"] * 3}}, "has 3 values for 10 tokens"),
    ):
        with pytest.raises(StoreError, match=match):
            write_arrays(str(tmp_path / "s"), acts, **kw)


def test_an_overwrite_clears_the_store_only_for_a_harvest_that_can_run(tmp_path, tiny_pair, monkeypatch):
    """A redo whose new config is broken leaves a (maybe shared) store alone; a valid one clears
    it and then says so (the pipeline marks the re-harvest resumable from there)."""
    import json

    from diffing.harvest import HarvestConfig
    from jobs.harvest import run_harvest

    class ReachedRay(Exception):
        pass

    def stop(address=None):
        raise ReachedRay

    monkeypatch.setattr("cluster.connect.ensure_ray", stop)
    store = tmp_path / "store"
    store.mkdir()
    (store / "manifest.json").write_text("{}")
    corpus = tmp_path / "c.jsonl"
    corpus.write_text(json.dumps({"id": "a", "text": "hello there, a short document"}))
    models = [{"name": "base", "path": str(tiny_pair[0])}, {"name": "ft", "path": str(tiny_pair[1])}]
    cleared: list = []

    def cfg(**kw):
        return HarvestConfig.model_validate(
            {"models": models, "layer": 1, "corpus": {"uri": str(corpus)}, "store": str(store), **kw}
        )

    with pytest.raises(Exception, match="out of range"):
        run_harvest(cfg(layer=99), overwrite=True, on_cleared=lambda: cleared.append(1))
    assert (store / "manifest.json").exists() and not cleared
    with pytest.raises(ReachedRay):
        run_harvest(cfg(), overwrite=True, on_cleared=lambda: cleared.append(1))
    assert not (store / "manifest.json").exists() and cleared == [1]


def test_a_stamp_cut_short_is_named_and_temp_files_of_killed_writes_go(tmp_path, tiny_pair):
    """harvest_config.json is written whole (atomic); one cut short anyway (an older crossdiff, a
    full disk) is an error naming the file, not 'Expecting value'. A store writer's `.tmp-*` files
    left by a killed process are removed when a harvest starts."""
    from diffing.store import StoreWriter
    from jobs.harvest import run_harvest

    store = tmp_path / "s"
    (store / "shards").mkdir(parents=True)
    (store / "harvest_config.json").write_text("")
    recs = [{"id": f"t{i}", "text": f"doc {i}"} for i in range(3)]
    with pytest.raises(StoreError, match="harvest_config.json is unreadable.*--overwrite"):
        run_harvest(_cfg(list(tiny_pair), store, recs, tmp_path))
    (store / "shards" / ".tmp-0a1b").write_bytes(b"half a shard")
    (store / ".tmp-9f").write_bytes(b"half a manifest")
    w = StoreWriter(str(store), model_names=["a", "b"], d_model=4)
    assert w.remove_temp_files() == 2 and not list(store.rglob(".tmp-*"))
    assert (store / "harvest_config.json").exists()  # only temporaries go


def test_a_pinned_revision_counts_and_an_unset_one_keeps_earlier_identities(tmp_path, tiny_pair):
    """models[].revision pins a hub model's commit; set, it is part of the harvest's identity; unset,
    the identity is the one harvests made before the field existed (they are not redone)."""
    from conftest import pipeline_dict

    from jobs.harvest import _config_hash
    from jobs.pipeline import PipelineConfig, with_defaults
    from jobs.stage_identity import stage_own

    cfg = _cfg(list(tiny_pair), tmp_path / "s", [{"id": "a", "text": "x"}], tmp_path)
    assert all(m.revision is None for m in cfg.models)
    pinned = cfg.model_copy(
        update={"models": [cfg.models[0].model_copy(update={"revision": "abc123"}), cfg.models[1]]}
    )
    assert _config_hash(cfg, "r") != _config_hash(pinned, "r")
    dumped = cfg.model_dump(
        mode="json", exclude={"ray": True, "device": True, "store": True, "corpus": {"uri"}}
    )
    for m in dumped["models"]:
        del m["revision"], m["trust_remote_code"]  # the dump before the fields existed
    dumped["records"] = "r"
    import hashlib

    assert (
        _config_hash(cfg, "r") == hashlib.sha256(json.dumps(dumped, sort_keys=True).encode()).hexdigest()[:16]
    )
    p = PipelineConfig.model_validate(with_defaults(pipeline_dict(str(tmp_path / "run"))))
    for legacy in (False, True):
        assert all("revision" not in m for m in stage_own(p, "harvest", legacy=legacy)["models"])
        assert all("trust_remote_code" not in m for m in stage_own(p, "harvest", legacy=legacy)["models"])


def test_the_records_hash_is_fed_one_record_at_a_time_and_unchanged():
    """Stores stamped with the whole-string formula keep their records_sha256."""
    import datetime
    import hashlib

    from jobs.harvest import _records_hash

    records = [
        {"id": "0", "source": "t", "text": 'héllo \u2028 "q"'},
        {
            "id": "1",
            "source": "c",
            "messages": [{"role": "user", "content": "x", "t": datetime.date(2024, 1, 1)}],
        },
    ]
    for recs in (records, records[:1]):
        old = hashlib.sha256(json.dumps(recs, sort_keys=True, default=str).encode()).hexdigest()
        assert _records_hash(recs) == old


def test_a_refused_harvest_change_names_only_what_changed_in_an_older_stamp(tmp_path):
    """Stamps written before models[].revision / trust_remote_code existed do not list the models."""
    from jobs.harvest import _stamp_changes

    cfg = HarvestConfig.model_validate(
        dict(models=[{"name": "a", "path": "/m/a"}, {"name": "b", "path": "/m/b"}], layer=4,
             corpus={"uri": str(tmp_path / "c.jsonl")}, store=str(tmp_path / "s"))
    )  # fmt: skip
    old = cfg.model_dump(mode="json") | {"layer": 3}
    old["models"] = [
        {k: v for k, v in m.items() if k not in ("revision", "trust_remote_code")} for m in old["models"]
    ]
    assert _stamp_changes(old, cfg, corpus_changed=False) == " (layer: 3 -> 4)"
