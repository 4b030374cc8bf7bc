"""Evidence text: a window's token ids -> one string per token that joins to the window's text, for
byte-level BPE that splits characters over tokens and SentencePiece-style word-boundary markers."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from diffing.collect import token_decoder
from diffing.config import AnalysisConfig
from diffing.models import HarvestInputError


def _store(path=None):
    meta = {} if path is None else {"harvest": {"models": [{"path": str(path)}]}}
    return SimpleNamespace(manifest=SimpleNamespace(metadata=meta), uri="mem://store")


@pytest.fixture(scope="module")
def byte_tok_dir(tmp_path_factory):
    from diffing.embedded.tiny import byte_tokenizer

    d = tmp_path_factory.mktemp("bytes")
    byte_tokenizer().save_pretrained(d)
    return d


@pytest.fixture(scope="module")
def metaspace_tok_dir(tmp_path_factory):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<unk>": 0, "▁The": 1, "▁cat": 2, "▁sat": 3, "▁on": 4, "▁the": 5, "▁mat": 6}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Metaspace()
    tok.decoder = decoders.Metaspace()
    d = tmp_path_factory.mktemp("metaspace")
    PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>").save_pretrained(d)
    return d


def test_characters_split_over_byte_tokens_are_shown_whole(byte_tok_dir):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(byte_tok_dir)
    text = "Le café coûte 3 €, 日本語 🙂 !"
    ids = tok.encode(text, add_special_tokens=False)
    assert len(ids) > len(text)  # multi-byte characters span several tokens
    decode = token_decoder(_store(byte_tok_dir))
    pieces = decode(ids)
    assert len(pieces) == len(ids) and "".join(pieces) == text
    assert "\ufffd" not in "".join(pieces)
    # each character is shown on the token that completes it; the tokens before it show nothing
    n_e = len("é".encode())
    at = ids.index(tok.encode("é", add_special_tokens=False)[-1])
    assert pieces[at] == "é" and pieces[at - n_e + 1 : at] == [""] * (n_e - 1)
    # a window cut inside a character keeps all of its text (the broken bytes as U+FFFD)
    start = ids.index(tok.encode("🙂", add_special_tokens=False)[1])
    window = ids[start:]
    assert "".join(decode(window)) == tok.decode(window)
    # a window ending inside a character shows what it has on its last token
    end = ids.index(tok.encode("日", add_special_tokens=False)[1]) + 1
    assert "".join(decode(ids[:end])) == tok.decode(ids[:end])


def test_word_boundary_markers_become_spaces(metaspace_tok_dir):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(metaspace_tok_dir)
    ids = tok.encode("The cat sat on the mat", add_special_tokens=False)
    assert [tok.decode([i]) for i in ids][:3] == ["The", "cat", "sat"]  # per id: spaces lost
    pieces = token_decoder(_store(), tokenizer=str(metaspace_tok_dir))(ids)
    assert pieces == ["The", " cat", " sat", " on", " the", " mat"]
    assert token_decoder(_store(), tokenizer=str(metaspace_tok_dir))(ids[2:]) == [
        "sat",
        " on",
        " the",
        " mat",
    ]


def test_ascii_windows_keep_one_string_per_token_id(byte_tok_dir):
    decode = token_decoder(_store(byte_tok_dir))
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(byte_tok_dir)
    ids = tok.encode("plain text, no surprises", add_special_tokens=False)
    assert decode(ids) == [tok.decode([i]) for i in ids]


def test_a_tokenizer_this_machine_cannot_read_is_an_error_naming_the_fix(tmp_path):
    with pytest.raises(HarvestInputError, match="analyze.tokenizer"):
        token_decoder(_store(tmp_path / "gone" / "llama-3-8b"))
    with pytest.raises(HarvestInputError, match=r"analyze\.tokenizer\)"):
        token_decoder(_store(), tokenizer=str(tmp_path / "nowhere"))
    assert token_decoder(_store())([5, 7]) == ["<5>", "<7>"]  # a synthetic store names no model


def test_the_tokenizer_setting_is_operational():
    from diffing.analysis import _OPERATIONAL

    assert "tokenizer" in _OPERATIONAL and "tokenizer" in AnalysisConfig.model_fields


def test_legacy_space_clean_up_is_not_applied_token_by_token(tmp_path):
    """A tokenizer config with clean_up_tokenization_spaces (older Llama-3 configs) would rewrite
    " 'm" and " ." differently per token and per window: the tokens are shown as they are."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<unk>": 0, "▁I": 1, "▁'m": 2, "▁here": 3, "▁.": 4}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer, tok.decoder = pre_tokenizers.Metaspace(), decoders.Metaspace()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", clean_up_tokenization_spaces=True)
    fast.save_pretrained(tmp_path)
    assert fast.decode([1, 2, 3, 4]) == "I'm here."  # what the clean-up does
    pieces = token_decoder(_store(), tokenizer=str(tmp_path))([1, 2, 3, 4])
    assert pieces == ["I", " 'm", " here", " ."]


def test_a_tokenizer_other_than_the_harvested_one_is_refused(byte_tok_dir, metaspace_tok_dir):
    """analyze.tokenizer (or the model path, rewritten since) must read the store's ids as the
    harvest did: its vocabulary fingerprint is checked against the store's."""
    from transformers import AutoTokenizer

    from diffing.fingerprints import tokenizer_fingerprint

    fp = tokenizer_fingerprint(AutoTokenizer.from_pretrained(byte_tok_dir))
    meta = {"harvest": {"models": [{"name": "a", "path": str(byte_tok_dir)}]}, "tokenizers": {"a": fp}}
    store = SimpleNamespace(manifest=SimpleNamespace(metadata=meta), uri="mem://store")
    assert token_decoder(store)([72, 105]) and token_decoder(store, tokenizer=str(byte_tok_dir))
    with pytest.raises(HarvestInputError, match=r"analyze.tokenizer .* is not the tokenizer the store"):
        token_decoder(store, tokenizer=str(metaspace_tok_dir))
    assert tokenizer_fingerprint(AutoTokenizer.from_pretrained(metaspace_tok_dir)) != fp


def test_a_wrong_tokenizer_fails_before_the_statistics_pass(
    byte_tok_dir, metaspace_tok_dir, tmp_path, monkeypatch
):
    """The check runs when the analysis starts: a pass over a large store is not spent first."""
    from transformers import AutoTokenizer

    import diffing.analysis
    from diffing.fingerprints import tokenizer_fingerprint
    from jobs.analyze import run_analyze

    fp = tokenizer_fingerprint(AutoTokenizer.from_pretrained(byte_tok_dir))
    meta = {"harvest": {"models": [{"name": "a", "path": str(byte_tok_dir)}]}, "tokenizers": {"a": fp}}
    store = SimpleNamespace(manifest=SimpleNamespace(metadata=meta), uri="mem://store")

    def no_pass(*a, **k):
        raise AssertionError("the statistics pass ran before the tokenizer check")

    monkeypatch.setattr(diffing.analysis, "analyze_run", no_pass)
    with pytest.raises(HarvestInputError, match="is not the tokenizer the store"):
        run_analyze(tmp_path / "run", store, AnalysisConfig(tokenizer=str(metaspace_tok_dir)))
    with pytest.raises(AssertionError, match="statistics pass"):  # the right one passes the check
        run_analyze(tmp_path / "run", store, AnalysisConfig(tokenizer=str(byte_tok_dir)))


def test_split_characters_are_marked_and_coloured_whole(byte_tok_dir):
    """A latent peaking on an inner byte of 本 (byte-level BPE: three tokens, two empty pieces): the
    judge's prompt marks 本 itself, never an empty << >>, and the report's peak span holds 本; a
    window cut inside 🙂 or 本 shows no U+FFFD for the bytes it lacks."""
    from transformers import AutoTokenizer

    from diffing.evidence import Example
    from jobs.report.render import context_html
    from serve.prompts import render

    tok = AutoTokenizer.from_pretrained(byte_tok_dir)
    decode = token_decoder(_store(byte_tok_dir))
    ids = tok.encode("🙂 日本 ok", add_special_tokens=False)[1:]  # the window starts inside 🙂
    pieces = decode(ids)
    peak = len(tok.encode("🙂 日", add_special_tokens=False))  # 本's second byte (of `ids`, less 🙂's first)
    acts = [0.0] * len(ids)
    acts[peak] = 5.0
    assert pieces[peak] == "" and "\ufffd" in pieces[0] + pieces[1] + pieces[2] + pieces[3]
    shown = render(Example(tokens=pieces, acts=acts, peak=peak), n=len(pieces), threshold=1.0)
    assert shown == "日<<本>> ok", shown
    html = context_html(pieces, acts, peak, 5.0, "0,0,0")
    assert '<span class="pk" style="background:rgba(0,0,0,0.85)" title="5">本</span>' in html, html
    assert '"></span>' not in html and "\ufffd" not in html, html
    cut = ids[: peak + 1]  # ends inside 本
    tail = render(Example(tokens=decode(cut), acts=[0.0] * len(cut), peak=0), n=len(cut), threshold=None)
    assert tail == "日", tail


def test_control_characters_in_evidence_are_visible_in_the_report():
    """A NUL or an escape from the corpus: raw, NUL is an HTML parse error and the others vanish;
    shown as their symbols (a CR is a line end, as in CRLF text; tab and newline kept)."""
    from jobs.report.render import context_html

    html = context_html(["a\x00b", "\x1b[31m", "c\r\n", "\td\re"], [1.0, 0.0, 0.0, 0.0], 0, 1.0, "0,0,0")
    assert "\x00" not in html and "\x1b" not in html and "\r" not in html
    assert "a␀b" in html and "␛[31m" in html and "\td" in html
    assert html.count("↵") == 2  # CRLF one line end, a lone CR another


def test_visible_pieces_moves_only_what_belongs_to_a_character():
    """Unit cases: a cut-off character's bytes lend nothing to a neighbour (only the peak moves);
    inner bytes lend theirs to the character they complete; nothing visible is returned as is."""
    from diffing.evidence import visible_pieces

    assert visible_pieces(["\ufffd", "a", "b"], [9.0, 0.0, 0.0], 0) == (["a", "b"], [0.0, 0.0], 0)
    assert visible_pieces(["", "", "文", "x"], [0.1, 0.9, 0.2, 0.0], 1) == (["文", "x"], [0.9, 0.0], 0)
    assert visible_pieces(["a", "", ""], [0.0, 0.5, 0.3], 2) == (["a"], [0.0], 0)
    assert visible_pieces(["\ufffd"], [3.0], 0) == (["\ufffd"], [3.0], 0)
    assert visible_pieces(["a", "b"], [-1.0, -2.0], 1) == (["a", "b"], [-1.0, -2.0], 1)


def test_the_evidence_tokenizer_is_loaded_at_the_commit_the_shards_were_made_from(byte_tok_dir, monkeypatch):
    """A model named by a branch (`revision: main`) may have moved since the harvest: the
    store's recorded commit wins, and remote code is trusted only where the harvest trusted it."""
    import diffing.models as dm

    real, asked = dm.load_tokenizer, []
    monkeypatch.setattr(
        dm,
        "load_tokenizer",
        lambda path, rev=None, remote=False: asked.append((rev, remote)) or real(str(byte_tok_dir)),
    )
    model = {"name": "A", "path": "org/model", "revision": "main", "trust_remote_code": True}
    meta = {"harvest": {"models": [model]}, "revisions": {"A": "abc123"}}
    token_decoder(SimpleNamespace(manifest=SimpleNamespace(metadata=meta), uri="mem://s"))
    meta = {"harvest": {"models": [{**model, "trust_remote_code": False}]}}  # no commit recorded
    token_decoder(SimpleNamespace(manifest=SimpleNamespace(metadata=meta), uri="mem://s"))
    assert asked == [("abc123", True), ("main", False)]
