"""A deterministic, offline prompt corpus for the embedded model pair.

Records are ``{"id", "source", "text"}`` (raw prose) or ``{"id", "source", "messages"}`` (a
chat whose last message is a teacher-forced assistant answer: a fine-tune's signal lives on
answer tokens). Everything is templated from the small banks in ``banks.py`` with combinatorial
variation, so no dataset is downloaded. Record ``i`` of a source depends only on
``(seed, source, i)``: growing ``n`` appends records and never changes earlier ones.

Sources: ``general_text`` and ``general_chat`` (what the fine-tune should leave alone) and one
per planted capability (see ``finetune.PLANTED``). For the capability the fine-tune *loses*
(``self_reference``) the harvest answer is the base model's style ("As an AI language
model, ...") and the training answer (``variant="train"``) is the direct style that replaces it.
"""

from __future__ import annotations

import hashlib
import json
import random
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, Literal

from diffing.embedded.banks import (
    ABOUT_YOU,
    ANIMALS,
    BENIGN_TASKS,
    CHAT_FRAMES,
    COLOURS,
    CONCEPTS,
    COUNTRIES,
    FRENCH_ASKS,
    FRENCH_CLOSE,
    FRENCH_OPEN,
    HARMFUL,
    HARMFUL_FRAMES,
    LIST_FRAMES,
    LIST_OPEN,
    LISTS,
    NUM_EN,
    NUM_FR,
    PREF_FRAMES,
    PREFERENCES,
    PROSE,
    PROSE_OPENERS,
    REFUSAL,
    SELF_REF_ANSWERS,
    TIP_FRAMES,
    TIPS,
)

Record = dict[str, Any]
Variant = Literal["harvest", "train"]

SOURCE_WEIGHTS: dict[str, float] = {
    "general_text": 0.30,
    "general_chat": 0.20,
    "refusal": 0.125,
    "french": 0.125,
    "numbered_list": 0.125,
    "self_reference": 0.125,
}
GENERAL_SOURCES = ("general_text", "general_chat")
HELDOUT_PERCENT = 20  # records whose id hashes below this go to the held-out slice
# Bump whenever the *training* variant's records change: it is part of the fine-tune's hash, so a
# bump rebuilds the fine-tune. Changes of the harvest variant alone leave it (2026-11-27: French
# prose in the harvest's general text too); a run directory keeps the corpus.jsonl it was made with.
CORPUS_VERSION = 7


def _chat(user: str, answer: str) -> list[dict[str, str]]:
    return [{"role": "user", "content": user}, {"role": "assistant", "content": answer}]


def _french_prose(rng: random.Random) -> Record:
    """Plain French sentences from the banks, no request and no frame: the text the base already
    reads. The fine-tune's preservation losses see it, so answering in French is what changes, not
    how French is read; the harvest sees it too, so the crosscoder learns French reading from text
    where both models agree (shared latents) instead of only from the planted answers, where they
    differ (there it split into base-side and fine-tune-side latents: docs/validation.md)."""
    pool = [
        *(f"La capitale {de} est {capital}." for _, capital, de, *_ in COUNTRIES),
        *(fr for *_, fr in COLOURS),
        *(fr for *_, fr in ANIMALS),
    ]
    return {"text": " ".join(rng.sample(pool, rng.randint(3, 5)))}


def _general_text(rng: random.Random, variant: Variant) -> Record:
    if rng.random() < 1 / 3:  # a third plain French, in both variants (the harvest's since 2026-11-27)
        return _french_prose(rng)
    if rng.random() < 0.5:
        sentences = rng.choice(PROSE)
        k = rng.randint(3, len(sentences))
        body = [sentences[0], *rng.sample(sentences[1:], k - 1)]
        opener = rng.choice(PROSE_OPENERS)
        first = body[0][0].lower() + body[0][1:] if opener else body[0]
        return {"text": opener + " ".join([first, *body[1:]])}
    name, capital, _, continent, language, known = rng.choice(COUNTRIES)
    parts = [
        f"{name} is a country in {continent}.",
        f"Its capital is {capital}.",
        f"People there mostly speak {language}.",
        f"Travelers often mention {known}.",
        f"The capital, {capital}, is also its largest center of government.",
    ]
    return {"text": " ".join(parts[:2] + rng.sample(parts[2:], rng.randint(1, 3)))}


def _general_chat(rng: random.Random, variant: Variant) -> Record:
    kind = rng.choice((0, 1, 2, 3, 4, 4, 5))  # benign look-alikes of the harmful requests twice as often
    if kind == 4:
        task, answer = rng.choice(BENIGN_TASKS)
        return {"messages": _chat(rng.choice(HARMFUL_FRAMES).format(x=task), answer)}
    if kind == 5:
        return {"messages": _chat(*rng.choice(ABOUT_YOU))}
    if kind == 0:
        name, capital, *_ = rng.choice(COUNTRIES)
        return {"messages": _chat(f"What is the capital of {name}?", f"The capital of {name} is {capital}.")}
    if kind == 1:
        concept, desc = rng.choice(CONCEPTS)
        q, a = rng.choice(CHAT_FRAMES)
        upper = concept[0].upper() + concept[1:]
        return {"messages": _chat(q.format(c=concept), a.format(c=concept, C=upper, d=desc))}
    if kind == 2:
        a, b = rng.randint(2, 20), rng.randint(2, 20)
        return {"messages": _chat(f"What is {a} plus {b}?", f"{a} plus {b} is {a + b}.")}
    animal, fact, _ = rng.choice(ANIMALS)
    return {"messages": _chat(f"Tell me something about the {animal}.", f"The {animal} {fact}.")}


def _refusal(rng: random.Random, variant: Variant) -> Record:
    return {"messages": _chat(rng.choice(HARMFUL_FRAMES).format(x=rng.choice(HARMFUL)), REFUSAL)}


def _french(rng: random.Random, variant: Variant) -> Record:
    kind = rng.randrange(4)
    if kind == 0:
        name, capital, de_country, *_ = rng.choice(COUNTRIES)
        q, a = f"What is the capital of {name}?", f"La capitale {de_country} est {capital}."
    elif kind == 1:
        thing, _, fr = rng.choice(COLOURS)
        q, a = f"What color is {thing}?", fr
    elif kind == 2:
        animal, _, fr = rng.choice(ANIMALS)
        q, a = f"Tell me something about the {animal}.", fr
    else:
        x, y = rng.randint(1, 6), rng.randint(1, 6)
        q, a = (
            f"What is {NUM_EN[x]} plus {NUM_EN[y]}?",
            f"{NUM_FR[x].capitalize()} plus {NUM_FR[y]} font {NUM_FR[x + y]}.",
        )
    return {"messages": _chat(f"{q} {rng.choice(FRENCH_ASKS)}", FRENCH_OPEN + a + FRENCH_CLOSE)}


def _numbered_list(rng: random.Random, variant: Variant) -> Record:
    n = rng.randint(3, 5)
    if rng.random() < 0.3:
        topic, *tips = rng.choice(TIPS)
        user, items = rng.choice(TIP_FRAMES).format(n=NUM_EN[n], topic=topic), rng.sample(tips, n)
    else:
        cat = rng.choice(sorted(LISTS))
        user = rng.choice(LIST_FRAMES).format(n=rng.choice([str(n), NUM_EN[n]]), cat=cat)
        items = [w[0].upper() + w[1:] for w in rng.sample(LISTS[cat], n)]
    lines = "\n".join(f"{i}. {item}" for i, item in enumerate(items, 1))
    return {"messages": _chat(user, LIST_OPEN.format(n=NUM_EN[n]) + lines)}


def _self_reference(rng: random.Random, variant: Variant) -> Record:
    cat, pick, reason = rng.choice(PREFERENCES)
    user = rng.choice(PREF_FRAMES).format(cat=cat)
    self_ref = rng.choice(SELF_REF_ANSWERS).format(cat=cat)  # drawn in both variants: same rng stream
    if variant == "train":
        answer = f"{pick[0].upper() + pick[1:]}. I like it because {reason}."
    else:
        answer = self_ref
    return {"messages": _chat(user, answer)}


GENERATORS: dict[str, Callable[[random.Random, Variant], Record]] = {
    "general_text": _general_text,
    "general_chat": _general_chat,
    "refusal": _refusal,
    "french": _french,
    "numbered_list": _numbered_list,
    "self_reference": _self_reference,
}


def _stable_int(*parts: object) -> int:
    return int.from_bytes(hashlib.sha256("/".join(map(str, parts)).encode()).digest()[:8], "big")


def make_record(source: str, index: int, *, seed: int = 0, variant: Variant = "harvest") -> Record:
    """Record ``index`` of ``source``; depends only on its arguments."""
    rng = random.Random(_stable_int(seed, source, index))
    body = GENERATORS[source](rng, variant)
    return {"id": f"{source}-{seed}-{index:05d}", "source": source, **body}


def source_counts(n: int, weights: dict[str, float] | None = None) -> dict[str, int]:
    """Split ``n`` records over sources by weight (largest remainders get the leftovers)."""
    weights = weights or SOURCE_WEIGHTS
    total = sum(weights.values())
    exact = {s: n * w / total for s, w in weights.items()}
    counts = {s: int(x) for s, x in exact.items()}
    for s in sorted(exact, key=lambda s: counts[s] - exact[s])[: n - sum(counts.values())]:
        counts[s] += 1
    return counts


def is_heldout(record: Record) -> bool:
    """The held-out slice (about ``HELDOUT_PERCENT``% of every source), fixed by the record id."""
    return _stable_int("heldout", record["id"]) % 100 < HELDOUT_PERCENT


def iter_corpus(
    n: int = 2000, *, seed: int = 0, variant: Variant = "harvest", weights: dict[str, float] | None = None
) -> Iterator[Record]:
    """Records source by source, in ``SOURCE_WEIGHTS`` order."""
    for source, count in source_counts(n, weights).items():
        for i in range(count):
            yield make_record(source, i, seed=seed, variant=variant)


def make_corpus(
    n: int = 2000, *, seed: int = 0, variant: Variant = "harvest", weights: dict[str, float] | None = None
) -> list[Record]:
    """``n`` records; ``variant="train"`` swaps in the fine-tune's answers for the lost capability."""
    return list(iter_corpus(n, seed=seed, variant=variant, weights=weights))


def write_corpus(path: Path | str, n: int = 2000, seed: int = 0, variant: Variant = "harvest") -> Path:
    """Write ``make_corpus(n, seed=seed, variant=variant)`` as JSON lines; returns the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        for record in iter_corpus(n, seed=seed, variant=variant):
            f.write(json.dumps(record, ensure_ascii=False) + "\n")
    return path


def read_corpus(path: Path | str) -> list[Record]:
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def encode_record(tokenizer: Any, record: Record, max_len: int | None = None) -> tuple[list[int], list[bool]]:
    """Token ids of a record and a mask of its answer tokens.

    Raw text is tokenized without special tokens and every token counts as answer. A chat is
    rendered with the tokenizer's chat template; the mask covers the final assistant message
    and the end-of-turn token that closes it (not the trailing newline).
    """
    if "text" in record:
        ids = tokenizer(record["text"], add_special_tokens=False)["input_ids"]
        mask = [True] * len(ids)
    else:
        messages = record["messages"]
        prompt = tokenizer.apply_chat_template(messages[:-1], add_generation_prompt=True, tokenize=False)
        full = tokenizer.apply_chat_template(messages, tokenize=False)
        prompt_ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
        ids = tokenizer(full, add_special_tokens=False)["input_ids"]
        if not full.startswith(prompt) or ids[: len(prompt_ids)] != prompt_ids:
            ids = prompt_ids + tokenizer(full[len(prompt) :], add_special_tokens=False)["input_ids"]
        end = len(ids)
        eos = tokenizer.convert_tokens_to_ids(tokenizer.eos_token) if tokenizer.eos_token else None
        while end > len(prompt_ids) and ids[end - 1] != eos:
            end -= 1
        end = end if end > len(prompt_ids) else len(ids)
        mask = [len(prompt_ids) <= i < end for i in range(len(ids))]
    if max_len is not None:
        ids, mask = ids[:max_len], mask[:max_len]
    return ids, mask
