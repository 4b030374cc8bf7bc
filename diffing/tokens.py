"""Tokens for harvesting: every model must read the same ids from the same text.

Records are rendered once (chats through the reference model's chat template, raw text as is),
tokenised identically for every model, cut at ``context_length`` and padded on the right; the
checks fail naming the model, the record and the first differing tokens.
"""

from __future__ import annotations

import datetime
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from diffing.models import HarvestInputError


@dataclass
class TokenizedDoc:
    doc_id: int
    ids: list[int]
    keep: list[bool]  # False for BOS and the first raw-text tokens
    source: str
    record_id: str


CHAT_DATE = datetime.date(2024, 1, 1)


def _chat_date(fmt: str) -> str:
    """Templates that print today's date (Llama 3.2/3.3: ``strftime_now("%d %b %Y")``) get a fixed
    one, so a harvest resumed on another day renders the same tokens."""
    return CHAT_DATE.strftime(fmt)


def render(record: dict[str, Any], tokenizer) -> tuple[str, bool]:
    """Text to tokenise and whether it is raw text (True) or a chat transcript (False)."""
    if record.get("messages") is not None:
        msgs = record["messages"]
        if not isinstance(msgs, list) or not all(
            isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)
            for m in msgs
        ):
            raise HarvestInputError(
                f"record {record.get('id')!r}: `messages` must be a list of {{role: str, content: str}}"
            )
        if getattr(tokenizer, "chat_template", None) is None:
            raise HarvestInputError(
                f"record {record.get('id')!r} is a chat (`messages`) but no model's tokenizer has a chat "
                "template; give the corpus as raw `text`, or use a model directory with one"
            )
        try:
            return tokenizer.apply_chat_template(msgs, tokenize=False, strftime_now=_chat_date), False
        except Exception as e:  # jinja2's TemplateError (raise_exception in the template) and friends
            hint = "; Gemma's, for one, has no system role and needs user/assistant turns that alternate"
            raise HarvestInputError(
                f"record {record.get('id')!r}: the model's chat template rejects its messages "
                f"({type(e).__name__}: {e}){hint if 'role' in str(e).lower() else ''}"
            ) from None
    text = record.get("text")
    if not isinstance(text, str):
        raise HarvestInputError(f"record {record.get('id')!r} has neither a `text` string nor `messages`")
    return text, True


def encode_truncated(tokenizer, text: str, *, add_special_tokens: bool, max_length: int) -> list[int]:
    """``tokenizer(text, truncation=True, max_length=max_length)["input_ids"]`` without tokenising
    all of a long text (a book-length document took a second per megabyte for 128 tokens kept):
    growing prefixes are tokenised until one holds ``max_length`` tokens with a margin to spare,
    since cutting a text changes only the tokens next to the cut."""
    n = max(4096, 32 * max_length)
    while n < len(text) and getattr(tokenizer, "truncation_side", "right") == "right":
        head = text[:n]
        if len(tokenizer(head, add_special_tokens=False)["input_ids"]) >= max_length + 64:
            text = head
            break
        n *= 4
    return tokenizer(text, add_special_tokens=add_special_tokens, truncation=True, max_length=max_length)[
        "input_ids"
    ]


def tokenize_records(
    records: Sequence[dict[str, Any]],
    tokenizer,
    *,
    context_length: int,
    drop_first_raw_tokens: int,
    doc_id_start: int,
) -> list[TokenizedDoc]:
    """Tokenise records; chat transcripts keep their template tokens, raw text loses its first
    `drop_first_raw_tokens` tokens (attention-sink outliers), and BOS is never kept. A chat's first
    token is never kept either: BOS, or the template's opening token where there is no BOS
    (Qwen's ``<|im_start|>``), the attention sink of the transcript."""
    docs = []
    bos = tokenizer.bos_token_id
    for i, rec in enumerate(records):
        text, raw = render(rec, tokenizer)
        add_special = raw  # chat templates already contain their special tokens
        ids = encode_truncated(tokenizer, text, add_special_tokens=add_special, max_length=context_length)
        keep = [True] * len(ids)
        first = 0
        if ids and ((bos is not None and ids[0] == bos) or not raw):
            keep[0] = False
            first = 1
        if raw:
            for j in range(first, min(len(ids), first + drop_first_raw_tokens)):
                keep[j] = False
        docs.append(
            TokenizedDoc(
                doc_id_start + i, ids, keep, str(rec.get("source", "")), str(rec.get("id", doc_id_start + i))
            )
        )
    return docs


def share_chat_template(tokenizers: Sequence[Any], names: Sequence[str]) -> str | None:
    """Chats are rendered once, with the first model's chat template, and every model reads those
    tokens. A first model without a template (a base model ships none) borrows the first template
    among the others; -> the name of the model whose template renders chats (None: no model has one)."""
    if not tokenizers:
        return None
    for tok, name in zip(tokenizers, names, strict=True):
        if getattr(tok, "chat_template", None) is not None:
            if tok is not tokenizers[0] and getattr(tokenizers[0], "chat_template", None) is None:
                tokenizers[0].chat_template = tok.chat_template
            return name
    return None


def _first_difference(a: list[int], b: list[int]) -> int:
    return next((i for i, (x, y) in enumerate(zip(a, b, strict=False)) if x != y), min(len(a), len(b)))


def _ids(tok, text: str, add_special: bool, max_length: int | None) -> list[int]:
    if max_length is None:
        return tok(text, add_special_tokens=add_special)["input_ids"]
    return encode_truncated(tok, text, add_special_tokens=add_special, max_length=max_length)


def check_vocab(
    tok, records: Sequence[dict[str, Any]], vocab_sizes: dict[str, int | None], max_length: int | None = None
) -> None:
    """Every token id the harvest feeds (the records as `tok` reads them) must have a row in every
    model's embedding: a tokenizer with tokens its model lacks (a special token added for a chat
    template, say) fails mid-harvest, on a GPU as a device-side assert. Fail here, naming both."""
    limits = {n: v for n, v in vocab_sizes.items() if v}
    if not limits:
        return
    smallest = min(limits.values())
    for rec in records:
        text, raw = render(rec, tok)
        ids = _ids(tok, text, raw, max_length)
        if ids and max(ids) >= smallest:
            bad = max(ids)
            lacking = sorted(n for n, v in limits.items() if bad >= v)
            raise HarvestInputError(
                f"record {rec.get('id')!r} has the token {tok.convert_ids_to_tokens(bad)!r} (id {bad}), but "
                f"model(s) {lacking} embed only {min(limits[n] for n in lacking)} tokens (config vocab_size): "
                "the tokenizer has tokens the model lacks (one added for a chat template?); use a tokenizer "
                "and chat template every model was trained with"
            )


def check_tokenizers_agree(
    tokenizers: Sequence[Any],
    records: Sequence[dict[str, Any]],
    names: Sequence[str],
    max_length: int | None = None,
) -> None:
    """Every model must read the same token ids from the text the harvest feeds them (chats rendered by
    the first model's template, raw text with special tokens; the first `max_length` tokens, what the
    harvest keeps); fail naming the model, the record and the first position where the ids differ."""
    if len(tokenizers) < 2:
        return
    ref_tok = tokenizers[0]
    for rec in records:
        text, raw = render(rec, ref_tok)
        ref = _ids(ref_tok, text, raw, max_length)
        for tok, name in zip(tokenizers[1:], names[1:], strict=True):
            ids = _ids(tok, text, raw, max_length)
            if ids == ref:
                continue
            i = _first_difference(ref, ids)
            shown = [  # the ids too: two vocabularies may spell different ids alike
                f"{n!r} has ids {x[i : i + 3]} = {t.convert_ids_to_tokens(x[i : i + 3])}"
                if i < len(x)
                else f"{n!r} ends"
                for n, t, x in ((names[0], ref_tok, ref), (name, tok, ids))
            ]
            why = ""
            if i == 0 and raw and (ref[1:] == ids or ids[1:] == ref):
                why = " (one tokenizer adds a BOS token, the other does not: check add_bos_token)"
            raise HarvestInputError(
                f"tokenizers disagree: model {name!r} reads record {rec.get('id')!r} as other token ids than "
                f"{names[0]!r}: at token {i}, {' and '.join(shown)}{why}; a crosscoder needs the same tokens "
                "in every model (use models that share one tokenizer)"
            )


def pad_batch(docs: Sequence[TokenizedDoc], pad_id: int) -> tuple[Tensor, Tensor]:
    """Right-padded input_ids and attention_mask [B, T]."""
    T = max(len(d.ids) for d in docs)
    ids = torch.full((len(docs), T), pad_id, dtype=torch.long)
    mask = torch.zeros((len(docs), T), dtype=torch.long)
    for i, d in enumerate(docs):
        ids[i, : len(d.ids)] = torch.tensor(d.ids)
        mask[i, : len(d.ids)] = 1
    return ids, mask
