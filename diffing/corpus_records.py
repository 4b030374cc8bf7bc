"""What a corpus record must look like: a text or a chat (OpenAI-style messages, or ShareGPT's
turns), checked one record at a time; a bad one is an error naming the record, the field and
the fix. The files themselves are read in `diffing.corpus`."""

from __future__ import annotations

import json
from typing import TYPE_CHECKING, Any

from diffing.models import HarvestInputError

if TYPE_CHECKING:
    from diffing.corpus import CorpusSpec

# ShareGPT's {from, value} turns (human/gpt, as many datasets export chats) -> {role, content}
_SHAREGPT_ROLES = {
    "system": "system",
    "human": "user",
    "user": "user",
    "gpt": "assistant",
    "assistant": "assistant",
    "model": "assistant",
    "chatgpt": "assistant",
    "bing": "assistant",
    "bard": "assistant",
    "tool": "tool",
}


def _sharegpt_turn(m: Any, where: str) -> Any:
    """A ShareGPT turn {from, value} (no role/content) as {role, content}; other keys kept, other
    turns as given. Records in {role, content} form read as before, so no store's hash changes."""
    if not (isinstance(m, dict) and {"from", "value"} <= set(m) and "role" not in m and "content" not in m):
        return m
    who = m["from"]
    role = _SHAREGPT_ROLES.get(who.strip().lower()) if isinstance(who, str) else None
    if role is None:
        raise HarvestInputError(
            f"corpus {where}: a ShareGPT turn from {who!r}, which is none of "
            f"{sorted(_SHAREGPT_ROLES)}; convert the corpus to {{role, content}} messages"
        )
    rest = {k: v for k, v in m.items() if k not in ("from", "value")}
    return {"role": role, "content": m["value"], **rest}


def _messages(value: Any, where: str, spec: CorpusSpec) -> list[dict[str, Any]]:
    field = spec.messages_field
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except json.JSONDecodeError:
            raise HarvestInputError(
                f"corpus {where}: {field!r} is a string that is not JSON; it must be a list of "
                "{role, content} messages"
            ) from None
    if not isinstance(value, list):
        raise HarvestInputError(
            f"corpus {where}: {field!r} must be a list of {{role, content}} messages, got {type(value).__name__}"
        )
    if not value:
        raise HarvestInputError(f"corpus {where}: {field!r} is empty (and there is no {spec.text_field!r})")
    value = [_sharegpt_turn(m, f"{where}: {field}[{j}]") for j, m in enumerate(value)]
    for j, m in enumerate(value):
        if isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str):
            continue
        hint = ""
        if isinstance(m, dict) and "content" in m and not isinstance(m["content"], str):
            hint = " (content must be a string: no null tool-call turns or lists of content parts)"
        raise HarvestInputError(
            f"corpus {where}: {field}[{j}] must be {{role: str, content: str}}, got {str(m)[:120]}{hint}"
        )
    # A Parquet list<struct> column gives every turn every key of any turn (tool_calls: None on a
    # plain user turn); templates test `'tool_calls' in message`, so absent keys stay absent.
    value = [{k: v for k, v in m.items() if v is not None} for m in value]
    try:  # as given: extra keys (name, ...) are the template's to use
        json.dumps(value)
    except (TypeError, ValueError):  # ...but JSON-safe: a Parquet turn's timestamp becomes its text
        value = json.loads(json.dumps(value, default=str))
    return value


# columns of common chat and instruction datasets -> the setting that reads them
_KNOWN_FIELDS = (
    ("conversations", "a ShareGPT corpus: corpus.messages_field: conversations"),
    ("chosen", "a preference-pair corpus (UltraFeedback, SimPO's data): corpus.messages_field: chosen"),
    ("prompt", "prompts only: corpus.text_field: prompt"),
    ("instruction", "an instruction corpus: corpus.text_field: instruction"),
    ("question", "questions only: corpus.text_field: question"),
    ("content", "corpus.text_field: content"),
)


def _field_hint(r: dict) -> str:
    return next((f" ({hint})" for key, hint in _KNOWN_FIELDS if key in r), "")


def _record(r: Any, i: int, where: str, spec: CorpusSpec) -> dict[str, Any]:
    if not isinstance(r, dict):
        raise HarvestInputError(f"corpus {where}: a record must be a JSON object, got {type(r).__name__}")
    tf, mf = spec.text_field, spec.messages_field
    if tf not in r and mf not in r:
        hint = _field_hint(r)
        raise HarvestInputError(
            f"corpus {where} has neither a {tf!r} nor a {mf!r} field (it has {sorted(r)[:8]}); "
            f"set corpus.text_field / corpus.messages_field{hint}"
        )
    text, msgs = r.get(tf), r.get(mf)
    if isinstance(text, str) and (
        (isinstance(msgs, list | str) and not msgs)
        or (isinstance(msgs, str) and msgs.strip() in ("[]", "null"))
    ):
        msgs = None  # a mixed corpus's text rows with an empty messages column (JSON strings too)
    if msgs is not None:
        messages = _messages(msgs, where, spec)
    elif text is None:
        raise HarvestInputError(f"corpus {where}: {tf!r} is null (and there are no {mf!r})")
    elif not isinstance(text, str):
        raise HarvestInputError(f"corpus {where}: {tf!r} must be a string, got {type(text).__name__}")
    else:
        messages = None
    rid, src = r.get(spec.id_field), r.get(spec.source_field)
    return {  # as the reader has always returned them: a store's config hash covers these records
        "id": str(i if rid is None else rid),
        "source": "unknown" if src is None or src == "" else str(src),
        "text": text,
        "messages": messages,
    }
