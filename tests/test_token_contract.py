"""Tokenisation and corpus edges the rest of the suite let through (mutation review of
diffing/tokens.py, corpus.py, corpus_records.py and batching.py, 2026-12-07): a character-level
stand-in tokenizer makes every id visible."""

from __future__ import annotations

import json
from types import SimpleNamespace

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from diffing.batching import length_regimes
from diffing.corpus import CorpusSpec, read_corpus
from diffing.models import HarvestInputError
from diffing.tokens import TokenizedDoc, check_tokenizers_agree, pad_batch, tokenize_records

BOS, EOS = 1, 2


class CharTok:
    """One id per character (its code point); BOS (id 1, the character \\x01) added to raw text;
    a chat template that writes that BOS character itself, as Llama's does."""

    bos_token_id = BOS
    chat_template = "stand-in"
    truncation_side = "right"

    def __init__(self, add_eos: bool = False):
        self.add_eos = add_eos

    def __call__(self, text, add_special_tokens=True, truncation=False, max_length=None):
        ids = [ord(c) for c in text]
        if add_special_tokens:
            ids = [BOS, *ids, *([EOS] if self.add_eos else [])]
        return {"input_ids": ids[:max_length] if truncation else ids}

    def apply_chat_template(self, msgs, tokenize=False, **kw):
        return "\x01" + "".join(f"<{m['role']}>{m['content']}" for m in msgs)

    def convert_ids_to_tokens(self, ids):
        return [chr(i) for i in ids]


def _docs(records, drop=0):
    return tokenize_records(
        records, CharTok(), context_length=64, drop_first_raw_tokens=drop, doc_id_start=10
    )


def test_a_chat_template_holding_bos_gets_no_second_one():
    (doc,) = _docs([{"messages": [{"role": "user", "content": "hi"}]}])
    assert doc.ids[:3] == [BOS, ord("<"), ord("u")]  # the template's own BOS, once
    assert doc.keep[0] is False and all(doc.keep[1:])


def test_raw_text_drops_bos_and_then_its_first_tokens():
    (doc,) = _docs([{"text": "abcdef", "source": "web"}], drop=2)
    assert doc.ids == [BOS, *map(ord, "abcdef")]
    assert doc.keep == [False, False, False, True, True, True, True]  # BOS, "a", "b" dropped
    assert (doc.doc_id, doc.source) == (10, "web")


def test_a_tokenizer_that_appends_eos_does_not_agree():
    with pytest.raises(HarvestInputError, match="tokenizers disagree: model 'b'.*at token 6"):
        check_tokenizers_agree([CharTok(), CharTok(add_eos=True)], [{"id": "r", "text": "hello"}], ["a", "b"])
    check_tokenizers_agree([CharTok(), CharTok()], [{"id": "r", "text": "hello"}], ["a", "b"])


def test_padding_is_masked():
    docs = [TokenizedDoc(0, [5, 6], [True] * 2, "", "0"), TokenizedDoc(1, [7, 8, 9, 3], [True] * 4, "", "1")]
    ids, mask = pad_batch(docs, pad_id=0)
    assert ids.tolist() == [[5, 6, 0, 0], [7, 8, 9, 3]]
    assert mask.tolist() == [[1, 1, 0, 0], [1, 1, 1, 1]]


@pytest.mark.parametrize("suffix", ["txt", "parquet", "json"])
def test_max_prompts_holds_for_every_format(tmp_path, suffix):
    path = tmp_path / f"c.{suffix}"
    texts = [f"doc {i}" for i in range(4)]
    if suffix == "txt":
        path.write_text("\n".join(texts) + "\n")
    elif suffix == "parquet":
        pq.write_table(pa.table({"text": texts}), path)
    else:  # one JSON array
        path.write_text(json.dumps([{"text": t} for t in texts]))
    got = read_corpus(CorpusSpec(uri=str(path), max_prompts=2))
    assert [r["text"] for r in got] == texts[:2]


def test_sharegpt_speakers_are_read_whatever_their_case_and_a_blank_source_is_unknown(tmp_path):
    turns = [{"from": "Human", "value": "Hi"}, {"from": "GPT", "value": "Hello"}]
    (tmp_path / "c.jsonl").write_text(json.dumps({"conversations": turns, "source": ""}) + "\n")
    (rec,) = read_corpus(CorpusSpec(uri=str(tmp_path / "c.jsonl"), messages_field="conversations"))
    assert rec["messages"] == [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}]
    assert rec["source"] == "unknown"


def test_rope_scaling_per_attention_type_and_in_a_nested_text_config():
    """Gemma 3 keeps one rope setting per attention type; multimodal wrappers keep the text
    model's config nested: a dynamic or LongRoPE setting in either still sets the regime."""
    per_type = SimpleNamespace(
        max_position_embeddings=64,
        rope_parameters={
            "full_attention": {"rope_type": "dynamic", "factor": 2.0},
            "sliding_attention": {"rope_type": "default"},
        },
    )
    assert length_regimes(per_type) == [(64, True)]
    text = SimpleNamespace(
        max_position_embeddings=128,
        rope_parameters={"rope_type": "longrope", "original_max_position_embeddings": 32},
    )
    wrapper = SimpleNamespace(get_text_config=lambda: text, rope_parameters=None)
    assert length_regimes(wrapper) == [(32, False)]
