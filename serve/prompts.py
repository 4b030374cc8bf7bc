"""The labelling prompts (delphi style) and the structured-output schemas.

1. Explain: the judge reads the max-activating and quantile examples, activating tokens marked
   <<like this>>, and writes one sentence about what the latent responds to.
2. Classify: the judge reads the explanation, a few examples and the taxonomy and answers with
   structured output: a JSON object (category, secondary, confidence 1-5) or a `choice` over the
   category names. Output is re-validated with pydantic; invalid output is retried.
   Or (`channel`, for small judges): no answer is generated; for each category the judge scores
   log p(top examples | "write snippets about <description>") minus the same for neutral English
   text, and the highest wins (noisy-channel prompting, Min et al. 2022, with a calibration baseline).
3. Detect (optional): for held-out activating and non-activating examples the judge answers
   yes/no (a `choice`) to "does the latent fire here?"; the score is the balanced accuracy.

The judge never sees `source` tags, group names or statistics: only token strings and where the
latent fires. Evidence and taxonomy text are data, never control: spellings of control tokens are
shown defanged (`serve.control`), so an example cannot open a turn inside the judge's prompt.
Bump PROMPT_VERSION whenever a prompt or schema changes (it is part of cache keys).
"""

from __future__ import annotations

import re
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, create_model

from diffing.evidence import Example, LatentEvidence, visible_pieces
from serve.control import defang, has_control
from serve.judge import JudgeError
from serve.taxonomy import Taxonomy

# not bumped for visible_pieces (2026-12-07): it changes only windows with a character split over
# tokens, and a bump is a changed label config for every finished run (a full relabel to rerun)
PROMPT_VERSION = "delphi-v5"
SYSTEM = (
    "You are an interpretability researcher. You study one feature of a language model at a time "
    "and describe, briefly and concretely, what text makes the feature fire."
)
# Answers start with these words (the judge continues them): small judges stay on task.
EXPLAIN_PREFILL = "These snippets are all"
CLASSIFY_PREFILL = "The feature belongs to the category:"
CONFIDENCE_LEVELS = (1, 2, 3, 4, 5)  # 1: a guess ... 5: certain; confidence = level / 5


_OPEN, _CLOSE = "\ue000", "\ue001"  # private-use sentinels for the << >> marks


_JOINERS = ("\u200c", "\u200d")  # ZWNJ, ZWJ: part of Persian words and emoji sequences
_MARK_RUN = re.compile(r"([<>])(?=[<>])")


def _clean(tok: str) -> str:
    """Printable text: control and other invisible characters become spaces (bidi overrides and
    tag characters could hide text from a reader), the joiners ZWNJ/ZWJ stay; a token's own runs of
    < or > (C++ ``<<``, CUDA ``<<<``) are spaced so they never read as the activation marks."""
    tok = _MARK_RUN.sub(r"\1 ", tok.replace("\n", " "))
    return "".join(ch if ch.isprintable() or ch == " " or ch in _JOINERS else " " for ch in tok)


def window(ex: Example, n: int) -> tuple[list[str], list[float]]:
    """At most n tokens of the example, centred on its peak."""
    if len(ex.tokens) <= n:
        return list(ex.tokens), list(ex.acts)
    lo = max(0, min(ex.peak - n // 2, len(ex.tokens) - n))
    return list(ex.tokens[lo : lo + n]), list(ex.acts[lo : lo + n])


def render(ex: Example, *, n: int, threshold: float | None) -> str:
    """The example as text; tokens with activation >= threshold wrapped in << >> (None: no marks)."""
    toks, acts, _ = visible_pieces(*window(ex, n))
    out = []
    for t, a in zip(toks, acts, strict=True):
        t = _clean(t)  # printable only: the mark sentinels below cannot occur in it
        if threshold is not None and a > 0 and a >= threshold:
            lead, core = t[: len(t) - len(t.lstrip())], t.strip() or t
            # the marks' own < > must not complete a spelling ("s" -> "<<s>>" holds "<s>")
            shown = defang(core)
            edge = shown[:1] in ("<", "|", "/", "\uff5c") or shown[-1:] in (">", "|", "\uff5c")
            pad = " " if edge or has_control(f"<{shown}>") else ""
            out.append(f"{lead}{_OPEN}{pad}{core}{pad}{_CLOSE}")
        else:
            out.append(t)
    # defang the joined text (a control token may be spelled over several tokens), then mark, and
    # defang again in case marks and neighbours still spell one (never seen after the padding)
    return defang(defang("".join(out)).replace(_OPEN, "<<").replace(_CLOSE, ">>")).strip()


def latent_max(ev: LatentEvidence) -> float:
    return max((ex.max_act for ex in (*ev.top, *ev.quantiles)), default=0.0)


def split_for_detection(ev: LatentEvidence, k: int) -> tuple[list[Example], list[Example], list[Example]]:
    """(examples to explain from, held-out positives, negatives) for detection scoring."""
    pool = list(ev.quantiles) if len(ev.quantiles) > k else list(ev.top)
    held = pool[-k:] if len(pool) > k else []
    held_ids = {id(x) for x in held}
    explain = [x for x in (*ev.top, *ev.quantiles) if id(x) not in held_ids]
    return explain, held, list(ev.negatives[:k])


def explain_messages(
    ev: LatentEvidence, examples: list[Example], cfg, context: str | None = None
) -> list[dict[str, str]]:
    thr = cfg.highlight_frac * latent_max(ev)
    in_top = {id(x) for x in ev.top}  # by the list an example came from, not by its `quantile` field
    top = [x for x in examples if id(x) in in_top][: cfg.explain_top]
    quant = [x for x in examples if id(x) not in in_top][: cfg.explain_quantiles]
    lines = [f"{i + 1}. {render(x, n=cfg.window_tokens, threshold=thr)}" for i, x in enumerate(top + quant)]
    note = f"Context: {defang(context.strip())}\n\n" if context else ""
    user = (
        f"{note}Here are text snippets where the feature fires. The tokens where it fires are marked "
        "<<like this>>.\n\n" + "\n".join(lines) + "\n\nIn one sentence, what do the marked tokens and "
        "their snippets have in common? Answer in one short sentence."
    )
    return [{"role": "system", "content": SYSTEM}, {"role": "user", "content": user}]


def clean_explanation(text: str) -> str:
    """The first sentence of the judge's answer, whitespace collapsed, quotes stripped."""
    text = " ".join(text.strip().split()).strip("\"' ")
    text = text.split(". ")[0].rstrip(".").strip()
    return f"{text[:400]}." if text else ""


def classify_messages(
    ev: LatentEvidence,
    examples: list[Example],
    explanation: str,
    taxonomy: Taxonomy,
    cfg,
    mode: Literal["json", "choice"],
) -> list[dict[str, str]]:
    thr = cfg.highlight_frac * latent_max(ev)
    shown = examples[: cfg.classify_examples]
    ex_lines = "\n".join(f"- {render(x, n=cfg.window_tokens, threshold=thr)}" for x in shown)
    cats = "\n".join(f"- {c.name}: {defang(c.description)}" for c in taxonomy.categories)
    if mode == "json":
        ask = (
            'Answer with a JSON object: "category" (the best category), "secondary" (another fitting '
            'category or null) and "confidence" (1 = a guess, 5 = certain).'
        )
    else:
        ask = "Answer with the name of the best category only."
    # The taxonomy comes first: every latent's prompt then starts with the same tokens (system +
    # categories), which vLLM's prefix cache computes once instead of once per latent.
    user = (
        f"Categories:\n{cats}\n\n"
        f"A feature of a language model fires on these snippets (firing tokens marked <<like this>>):\n"
        f"{ex_lines}\n\nExplanation of the feature: {defang(explanation)}\n\n"
        f"Which of the categories above describes the feature best? {ask}"
    )
    return [{"role": "system", "content": SYSTEM}, {"role": "user", "content": user}]


# Channel prompts carry their own system message: without one, chat templates such as SmolLM2's
# or Qwen's insert a default system prompt ("You are a helpful AI assistant named SmolLM, ..."),
# which every category's request would then share and which latents of chat corpora fire on, so
# their examples were likely under *every* request and the calibration term alone decided
# (delphi-v4; measured in docs/validation.md).
CHANNEL_SYSTEM = "You write short text snippets on the topic you are given."


def channel_messages(description: str) -> list[dict[str, str]]:
    """Channel classification: the request under which the judge would write text of a category."""
    return [
        {"role": "system", "content": CHANNEL_SYSTEM},
        {"role": "user", "content": f"Write a few short text snippets. Topic: {defang(description)}"},
    ]


# Neutral English scored under every category's request: its log-probability is the baseline each
# latent's examples are compared against, so a request that makes *any* text likelier (a generic
# description) gains nothing (contextual calibration for the channel direction).
CHANNEL_BASELINE = (
    "The library opens at nine on weekdays.\nWe planted tomatoes in the garden last spring.\n"
    "The bus was late again this morning.\nShe keeps her keys in a small blue box."
)


def channel_text(ev: LatentEvidence, cfg) -> str:
    """The text scored under each category: the top examples around their peaks, one per line, unmarked
    (the quantile samples, highest bin first, for evidence whose top examples are missing or show
    nothing but whitespace); "" when neither shows any text."""
    by_bin = sorted(ev.quantiles, key=lambda x: -(x.quantile if x.quantile is not None else -1))
    for shown in (ev.top, by_bin):  # top examples of whitespace alone: the quantile samples
        lines = [
            render(x, n=cfg.channel_window_tokens, threshold=None) for x in shown[: cfg.channel_examples]
        ]
        text = "\n".join(lines)
        if text.strip():
            return text
    return ""


def classification_model(taxonomy: Taxonomy) -> type[BaseModel]:
    """Pydantic model of the JSON answer (its JSON schema is the structured-output schema)."""
    cat = Literal[tuple(taxonomy.names)]  # type: ignore[valid-type]
    return create_model(
        "Classification",
        __config__=ConfigDict(extra="forbid"),
        category=(cat, Field(description="Best category.")),
        secondary=(cat | None, Field(description="Second category or null.")),
        confidence=(Literal[CONFIDENCE_LEVELS], Field(description="1 = a guess, 5 = certain.")),  # type: ignore[valid-type]
    )


def classification_schema(taxonomy: Taxonomy) -> dict:
    schema = classification_model(taxonomy).model_json_schema()
    schema.pop("title", None)
    return schema


def detect_messages(explanation: str, ex: Example, cfg) -> list[dict[str, str]]:
    text = render(ex, n=cfg.window_tokens, threshold=None)
    user = (
        f"Feature explanation: {defang(explanation)}\n\nText: {text}\n\n"
        "Does the feature fire anywhere in this text? Answer yes or no."
    )
    return [{"role": "system", "content": SYSTEM}, {"role": "user", "content": user}]


DETECT_CHOICES = ["yes", "no"]


def balanced_accuracy(pos_pred: list[bool], neg_pred: list[bool]) -> float | None:
    """Mean of the hit rate on activating and the correct-rejection rate on non-activating examples."""
    if not pos_pred or not neg_pred:
        return None
    tpr = sum(pos_pred) / len(pos_pred)
    tnr = sum(not p for p in neg_pred) / len(neg_pred)
    return 0.5 * (tpr + tnr)


class Explained(BaseModel):
    """Internal: a validated explanation."""

    model_config = ConfigDict(frozen=True)
    text: str = Field(min_length=1, max_length=400)


# What chat templates without a system role answer (through vLLM's 400): Gemma 2 "System role
# not supported", early Mistral "Conversation roles must alternate user/assistant/...".
_NO_SYSTEM_ROLE = re.compile(
    r"system.{0,30}(not supported|unsupported|not allowed)|roles must alternate", re.I
)


# What judges answer when a prompt does not fit their context window (vLLM: "This model's maximum
# context length is N tokens", "The decoder prompt (length N) is longer than the maximum model
# length of M", "Input prompt (N tokens) is too long and exceeds limit of M").
_TOO_LONG = re.compile(
    r"maximum context length|maximum model length|prompt .{0,40}too long|too many tokens", re.I
)


def prompt_too_long(e: Exception) -> bool:
    return isinstance(e, JudgeError) and bool(_TOO_LONG.search(str(e)))


class TaxonomyTooLong(JudgeError):
    """The classification prompt overflows the judge's context window even with the least evidence:
    the taxonomy's category block is what does not fit, so every latent would fail the same way (the
    request fails, 502, instead of labelling every latent with the fallback category)."""

    def __init__(self, taxonomy: Taxonomy):
        chars = sum(len(c.name) + len(c.description) for c in taxonomy.categories)
        super().__init__(
            f"the taxonomy's {len(taxonomy.categories)} categories ({chars} characters of names and "
            "descriptions) do not fit the judge's context window: the classification prompt overflows "
            "it even with a single example; shorten the category descriptions (or use fewer categories) "
            "or serve the judge with a larger max_model_len"
        )


def shrink(ev: LatentEvidence) -> LatentEvidence | None:
    """The evidence with half of each example list (at least one top or quantile example kept); None
    when nothing is left to drop."""
    n_top, n_q = len(ev.top), len(ev.quantiles)
    if n_top + n_q <= 1:
        return None
    top = ev.top[: max(1, n_top // 2)] if n_top else []
    quantiles = ev.quantiles[: n_q // 2] if n_top else ev.quantiles[: max(1, n_q // 2)]
    return ev.model_copy(
        update={"top": top, "quantiles": quantiles, "negatives": ev.negatives[: len(ev.negatives) // 2]}
    )


def fold_system(messages: list[dict[str, str]]) -> list[dict[str, str]]:
    """The messages without a system message: its text leads the first user message instead."""
    if not messages or messages[0]["role"] != "system":
        return messages
    system, rest = messages[0]["content"], list(messages[1:])
    for i, m in enumerate(rest):
        if m["role"] == "user":
            rest[i] = {**m, "content": f"{system}\n\n{m['content']}"}
            return rest
    return [{"role": "user", "content": system}, *rest]
