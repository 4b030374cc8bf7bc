"""Inputs the embedded pair never produces: an empty shard, Parquet chats with tool-call columns,
chat templates that print today's date, models without BOS, tokenizers that truncate on the left,
corpora larger than the pre-launch tokenizer check."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.dataset as ds
import pyarrow.parquet as pq

from diffing.config import AnalysisConfig
from diffing.corpus import CorpusSpec, read_corpus
from diffing.embedded.tiny import byte_tokenizer
from diffing.examples import _doc_sorted
from diffing.models import load_tokenizer
from diffing.store import StoreWriter, open_store
from diffing.tokens import CHAT_DATE, render, tokenize_records
from jobs.harvest import agreement_sample

CHAT = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"}]


def test_an_empty_shard_keeps_the_store_one_readable_dataset(tmp_path):
    w = StoreWriter(str(tmp_path / "s"), model_names=["a", "b"], d_model=4, extra_columns=["source"])
    w.write_shard(
        "00000", np.zeros((0, 2, 4), np.float32), doc_ids=np.zeros(0, np.int64), extra={"source": []}
    )
    n = 12
    w.write_shard(
        "00001",
        np.ones((n, 2, 4), np.float32),
        doc_ids=np.repeat([5, 6], n // 2),
        positions=np.tile(np.arange(n // 2), 2),
        extra={"source": ["x"] * n},
    )
    w.finalize()
    # plain pyarrow, every shard as one dataset (the empty one first): one schema
    files = sorted(str(p) for p in (tmp_path / "s" / "shards").glob("*.parquet"))
    table = ds.dataset(files, format="parquet").to_table()
    assert table.num_rows == n and table.schema.field("source").type == pa.string()
    store = open_store(str(tmp_path / "s"))
    acts, meta = store.load()
    assert len(acts) == n
    # the evidence and source-mass passes read shard by shard: an empty one contributes nothing
    empty = pq.read_table(tmp_path / "s" / "shards" / "00000.parquet")
    rows = _doc_sorted(empty, AnalysisConfig(heldout="all"), store)
    assert all(len(v) == 0 for v in rows.values()) and {"doc", "edge", "source"} <= set(rows)


def test_parquet_chat_turns_lose_the_keys_other_turns_have(tmp_path):
    """A list<struct> column gives every turn every key: a plain turn's tool_calls: None would make
    a template that tests `'tool_calls' in message` take the tool branch."""
    turns = [
        [{"role": "user", "content": "Hi", "tool_calls": None}, {"role": "assistant", "content": "Yo"}],
        [{"role": "assistant", "content": "", "tool_calls": ["lookup()"]}],
    ]
    pq.write_table(pa.table({"messages": turns}), tmp_path / "c.parquet")
    recs = read_corpus(CorpusSpec(uri=str(tmp_path / "c.parquet")))
    assert recs[0]["messages"] == [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Yo"}]
    assert recs[1]["messages"] == [{"role": "assistant", "content": "", "tool_calls": ["lookup()"]}]


def test_templates_that_print_todays_date_render_a_fixed_one():
    tok = byte_tokenizer()
    tok.chat_template = (
        'Today: {{ strftime_now("%d %b %Y") }}\n{% for m in messages %}{{ m.content }}\n{% endfor %}'
    )
    text, raw = render({"messages": CHAT}, tok)
    assert not raw and text.startswith(f"Today: {CHAT_DATE.strftime('%d %b %Y')}\n")


def test_a_chat_never_keeps_its_first_token_bos_or_not():
    """Qwen has no BOS: its chats open with <|im_start|>, the attention sink, which is dropped too."""
    tok = byte_tokenizer()
    rec = {"messages": CHAT}
    with_bos = tokenize_records([rec], tok, context_length=64, drop_first_raw_tokens=0, doc_id_start=0)[0]
    tok.bos_token = None
    assert tok.bos_token_id is None
    no_bos = tokenize_records([rec], tok, context_length=64, drop_first_raw_tokens=0, doc_id_start=0)[0]
    assert no_bos.ids == with_bos.ids and no_bos.keep == with_bos.keep
    assert no_bos.keep[0] is False and all(no_bos.keep[1:])
    raw = tokenize_records(
        [{"text": "plain"}], tok, context_length=64, drop_first_raw_tokens=0, doc_id_start=0
    )
    assert all(raw[0].keep)  # raw text: drop_first_raw_tokens decides


def test_a_left_truncating_tokenizer_keeps_the_documents_beginning(tmp_path):
    tok = byte_tokenizer()
    tok.truncation_side = "left"
    tok.save_pretrained(tmp_path / "tok")
    loaded = load_tokenizer(str(tmp_path / "tok"))
    assert loaded.truncation_side == "right"
    doc = tokenize_records(
        [{"text": "abcdefghij" * 10}], loaded, context_length=8, drop_first_raw_tokens=2, doc_id_start=0
    )[0]
    assert loaded.convert_ids_to_tokens(doc.ids) == list("abcdefgh")
    assert doc.keep == [False, False] + [True] * 6  # the document's first two tokens, not its middle


def test_the_prelaunch_tokenizer_check_covers_the_whole_corpus():
    recs = [{"id": str(i)} for i in range(10_000)]
    sample = agreement_sample(recs)
    assert len(sample) == 4096 and sample[0]["id"] == "0" and int(sample[-1]["id"]) > 9_990
    small = recs[:300]
    assert agreement_sample(small) == small


def test_an_actor_without_a_gpu_of_its_own_is_refused_where_gpus_are_visible(monkeypatch):
    """At num_gpus_per_actor=0 Ray leaves the node's GPUs visible: every actor would load its models
    onto cuda:0. Refused with the fix, unless the harvest runs on CPU."""
    import pytest
    import torch

    from diffing.corpus import CorpusSpec
    from diffing.harvest import HarvestConfig, ModelSpec
    from diffing.models import HarvestInputError
    from jobs.harvest_actor import check_assigned_gpu

    def cfg(**kw):
        models = [ModelSpec(name="a", path="x"), ModelSpec(name="b", path="y")]
        return HarvestConfig(models=models, layer=0, corpus=CorpusSpec(uri="c"), store="s", **kw)

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 8)
    with pytest.raises(HarvestInputError, match="num_gpus_per_actor: 1"):
        check_assigned_gpu(cfg(), gpu_ids=[])
    check_assigned_gpu(cfg(), gpu_ids=[3])
    check_assigned_gpu(cfg(device="cpu"), gpu_ids=[])
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    check_assigned_gpu(cfg(), gpu_ids=[])  # a CPU node: nothing to share


def test_tokens_a_model_has_no_embedding_for_are_found_before_the_harvest():
    """A fine-tune's tokenizer with tokens its base model lacks would stop the harvest mid-way (on a
    GPU as a device-side assert): preflight names the record, the token and the model."""
    import pytest

    from diffing.embedded.tiny import byte_tokenizer
    from diffing.models import HarvestInputError
    from diffing.tokens import check_vocab

    tok = byte_tokenizer()
    recs = [{"id": "r1", "text": "plain text", "messages": None}]
    top = max(tok("plain text", add_special_tokens=False)["input_ids"])
    check_vocab(tok, recs, {"base": len(tok), "ft": len(tok)}, 64)
    check_vocab(tok, recs, {"base": None, "ft": None}, 64)  # configs without vocab_size: nothing to check
    with pytest.raises(
        HarvestInputError, match=r"record 'r1' has the token .* model\(s\) \['ft'\] embed only"
    ):
        check_vocab(tok, recs, {"base": len(tok), "ft": top}, 64)
