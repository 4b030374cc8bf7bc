"""Long documents are tokenised only as far as the harvest reads them, with the same ids as
tokenising them whole: checked on a byte-level BPE (GPT-2/SmolLM style), a SentencePiece-style
BPE without pre-tokenisation (Llama/Gemma style) and the tiny pair's byte tokenizer."""

import random

import pytest

from diffing.tokens import encode_truncated, tokenize_records

WORDS = "the quick brown fox jumps over lazy dog crosscoder latent décodeur français 数据 🙂".split()


def _text(rng: random.Random, n_words: int) -> str:
    parts = []
    for _ in range(n_words):
        r = rng.random()
        if r < 0.02:
            parts.append("x" * rng.randint(50, 3000))  # one very long "word" (a hash, base64)
        elif r < 0.04:
            parts.append(" " * rng.randint(5, 500) + "\n" * rng.randint(1, 5))
        else:
            parts.append(rng.choice(WORDS))
    return " ".join(parts)


def _bpe(kind: str):
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    rng = random.Random(0)
    corpus = [_text(rng, 100) for _ in range(100)]
    tok = Tokenizer(models.BPE(unk_token="<unk>" if kind == "sentencepiece" else None))
    if kind == "bytelevel":
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tok.decoder = decoders.ByteLevel()
        alphabet = pre_tokenizers.ByteLevel.alphabet()
    else:  # no pre-tokenisation: spaces become ▁ and merges may cross words
        tok.normalizer = normalizers.Replace(" ", "▁")
        alphabet = []
    trainer = trainers.BpeTrainer(
        vocab_size=800,
        special_tokens=["<unk>", "<s>", "</s>"],
        initial_alphabet=alphabet,
        show_progress=False,
    )
    tok.train_from_iterator(corpus, trainer)
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>")


@pytest.fixture(scope="module", params=["bytelevel", "sentencepiece", "tiny"])
def tokenizer(request, tiny_pair):
    if request.param == "tiny":
        from diffing.models import load_tokenizer

        return load_tokenizer(str(tiny_pair[0]))
    return _bpe(request.param)


@pytest.mark.parametrize("max_length", [8, 128, 1024])
def test_the_same_ids_as_tokenising_the_whole_text(tokenizer, max_length):
    rng = random.Random(max_length)
    for _ in range(4):
        text = _text(rng, rng.choice([20, 1_000, 8_000]))
        for special in (True, False):
            want = tokenizer(text, add_special_tokens=special, truncation=True, max_length=max_length)[
                "input_ids"
            ]
            assert (
                encode_truncated(tokenizer, text, add_special_tokens=special, max_length=max_length) == want
            )


def test_a_book_length_document_costs_what_its_kept_tokens_cost(tokenizer):
    text = _text(random.Random(1), 100_000)  # about a megabyte

    class Recording:  # the tokenizer, noting how much text each call is given
        def __init__(self, inner):
            self.inner, self.lengths = inner, []

        def __call__(self, text, *a, **kw):
            self.lengths.append(len(text))
            return self.inner(text, *a, **kw)

        def __getattr__(self, name):
            return getattr(self.inner, name)

    seen = Recording(tokenizer)
    (doc,) = tokenize_records(
        [{"id": "book", "text": text}], seen, context_length=128, drop_first_raw_tokens=1, doc_id_start=0
    )
    assert len(doc.ids) == 128
    assert doc.ids == tokenizer(text, truncation=True, max_length=128)["input_ids"]
    # the cost: only prefixes a small multiple of the kept tokens were tokenised, never the book
    assert seen.lengths and max(seen.lengths) <= 32 * 4096 < len(text) / 4, seen.lengths


def test_left_truncation_keeps_the_end_as_before(tokenizer):
    import copy

    left = copy.deepcopy(tokenizer)
    left.truncation_side = "left"
    text = _text(random.Random(3), 20_000)
    want = left(text, truncation=True, max_length=64)["input_ids"]
    assert encode_truncated(left, text, add_special_tokens=True, max_length=64) == want
