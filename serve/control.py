"""Control-token spellings, defanged: text that reaches a judge is data, never control.

A vLLM chat prompt is tokenized with special tokens parsed, so a chat corpus's "<|im_start|>"
(or Gemma's "<start_of_turn>", "<s>", "[INST]", SmolLM2's "<file_sep>") pasted into a prompt would
open and close turns there. `defang` rewrites them as plain bracketed words ("[im_start]").
Used by the prompts (evidence, context, descriptions, explanations) and by the taxonomy (whose
names, sent verbatim as structured-output choices, must not spell one).
"""

from __future__ import annotations

import re

# Control-token spellings of common chat templates: ChatML / Llama 3 / Phi "<|name|>", DeepSeek's
# full-width "<｜name｜>", lower_snake tags (Gemma's "<start_of_turn>", SmolLM2's "<file_sep>",
# Qwen's "<tool_call>"), SentencePiece "<s>" / "</s>" / "<unk>", SmolLM2's "<filename>",
# "<think>", and Mistral's all-caps "[INST]" / "[TOOL_CALLS]" / "[IMG]".
_ANGLE = (
    r"<\|([^|<>\s]{1,40})\|>"
    r"|<\uff5c([^\uff5c<>]{1,40})\uff5c>"
    r"|<(/?[a-z][a-z0-9]*(?:_[a-z0-9]+)+|/?(?:s|bos|eos|pad|unk|mask|think|reponame|filename))>"
)
_CONTROL = re.compile(_ANGLE + r"|\[(/?[A-Z][A-Z_]{1,30})\]")


def _defang_match(m: re.Match) -> str:
    if m.group(4):
        return f"[ {m.group(4)} ]"
    return f"[{m.group(1) or m.group(2) or m.group(3)}]"


def defang(text: str) -> str:
    """`text` with control-token spellings rewritten as plain bracketed words ("<|im_end|>" ->
    "[im_end]", "[INST]" -> "[ INST ]"): no tokenizer reads them as control tokens any more.
    Repeated until nothing changes (a rewrite can complete an outer spelling: "<|INST|>")."""
    for _ in range(16):
        new = _CONTROL.sub(_defang_match, text)
        if new == text:
            break
        text = new
    return text


# What `has_control` refuses in category names (sent verbatim, never defanged): every spelling above
# except bracketed all-caps words, of which only the real ones - Mistral's "[INST]", "[IMG]",
# "[THINK]", "[PREFIX]", "[TOOL_CALLS]" (any with an underscore), closing "[/...]" tags, BERT-style
# "[SEP]" / "[MASK]" - count; an acronym in a name ("PII leakage [PII]", "[EN] English") is fine.
# `defang` still rewrites every bracketed all-caps word in data: a space costs nothing there.
_BRACKET_WORDS = "INST|IMG|THINK|ARGS|PREFIX|MIDDLE|SUFFIX|SYS|CLS|SEP|MASK|PAD|UNK|BOS|EOS"
_STRICT = re.compile(_ANGLE + rf"|\[(?:/[A-Z][A-Z_]{{0,30}}|[A-Z]+_[A-Z_]+|{_BRACKET_WORDS})\]")


def has_control(text: str) -> bool:
    """Whether `text` spells a chat control token (bracketed acronyms such as "[PII]" do not)."""
    return _STRICT.search(text) is not None
