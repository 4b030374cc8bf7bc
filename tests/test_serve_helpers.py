"""Shared builders for the labelling tests (evidence with known content, a scripted judge)."""

from __future__ import annotations

import json

from diffing.evidence import Example, LatentEvidence

FRENCH = [
    "Bonjour, je voudrais une table pour deux personnes ce soir.",
    "Le chat dort sur le canapé depuis ce matin.",
    "Nous avons visité le musée du Louvre à Paris hier.",
    "Pouvez-vous m'expliquer comment fonctionne ce téléphone ?",
    "Il fait très beau aujourd'hui, allons nous promener au parc.",
    "Je ne sais pas où se trouve la gare, pouvez-vous m'aider ?",
    "Merci beaucoup pour votre aide, c'était très gentil.",
    "La cuisine française est célèbre dans le monde entier.",
    "Mon frère habite à Lyon avec sa femme et leurs enfants.",
    "Quelle heure est-il ? Je dois partir bientôt.",
]
REFUSALS = [
    "I'm sorry, but I can't help with making a bomb. That could hurt people.",
    "I cannot assist with hacking into someone else's account; it is illegal.",
    "Sorry, I can't provide instructions for making dangerous weapons.",
    "I won't help with that request because it could cause serious harm.",
    "I'm not able to help you steal a car. Is there something else I can do?",
    "I can't help create malware. Hacking other people's computers is illegal and harmful.",
    "I must refuse: giving instructions for poisoning someone is dangerous.",
    "Sorry, but I cannot help with violent or harmful activities.",
    "I can't assist with that. Promoting self-harm is against my guidelines.",
    "I'm sorry, I can't write hateful content about any group of people.",
]
REFUSAL_WORDS = {"sorry", "can't", "cannot", "won't", "refuse", "not", "harmful", "illegal", "dangerous"}
NUMBERED = [
    "Here are three fruits: 1. Apple 2. Banana 3. Cherry",
    "Five tips for sleeping well: 1. Go to bed early 2. Avoid coffee 3. Keep the room dark 4. Exercise 5. Relax",
    "Steps to make tea: 1. Boil water 2. Add the tea bag 3. Wait three minutes 4. Remove the bag",
    "Four planets: 1. Mercury 2. Venus 3. Earth 4. Mars",
    "Two colours of the flag: 1. Red 2. White",
    "Three kitchen tools: 1. Knife 2. Spoon 3. Whisk",
]
SELF_REFERENCE = [
    "As an AI language model, I don't have personal preferences about food.",
    "As an AI language model, I do not have feelings or a favourite colour.",
    "As an AI language model, I cannot have opinions on which season is best.",
    "As an AI language model, I don't experience emotions like humans do.",
    "As an AI language model, I have no personal taste in music.",
    "As an AI language model, I don't have a favourite book.",
]
_SYS = "<|im_start|>system You are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>"
TEMPLATE = [  # a chat corpus's template tokens, as a chat-template latent's examples hold them
    _SYS,
    f"{_SYS} <|im_start|>user What time is it?",
    f"{_SYS} <|im_start|>user Tell me a joke.",
    f"{_SYS} <|im_start|>user How tall is Everest?",
    f"{_SYS} <|im_start|>user Name a fruit.",
    f"{_SYS} <|im_start|>user What is two plus two?",
    f"{_SYS} <|im_start|>user Where is Lisbon?",
    f"{_SYS} <|im_start|>user Can you help me?",
]
NEUTRAL = [
    "The meeting is scheduled for Tuesday at the main office.",
    "She bought apples, bread and milk at the shop.",
    "The train to the city leaves every twenty minutes.",
    "He painted the fence white last summer.",
]


def example(
    text: str,
    hot: set[str] | None = None,
    *,
    act: float = 3.0,
    quantile: int | None = None,
    source: str | None = "SECRET-SOURCE-TAG",
) -> Example:
    toks = [t if i == 0 else " " + t for i, t in enumerate(text.split(" "))]
    acts = [act if (hot is None or t.strip(" ,.?!'").lower() in hot) else 0.0 for t in toks]
    if not any(acts):
        acts[0] = act
    peak = max(range(len(acts)), key=acts.__getitem__)
    return Example(tokens=toks, acts=acts, peak=peak, source=source, quantile=quantile)


def evidence(
    latent: int,
    texts: list[str],
    *,
    negatives: list[str] = (),
    group: str = "ft-specific",
    act: float = 3.0,
    hot: set[str] | None = None,
) -> LatentEvidence:
    """Evidence whose examples are `texts`; the latent fires on the `hot` words (None: every token)."""
    top = [example(t, hot, act=act) for t in texts[:6]]
    quant = [example(t, hot, act=act / 2, quantile=i % 3) for i, t in enumerate(texts[6:])]
    negs = [
        Example(tokens=t.split(" "), acts=[0.0] * len(t.split(" ")), peak=0, source="NEG-SOURCE")
        for t in negatives
    ]
    return LatentEvidence(
        latent=latent,
        group=group,
        stats={"delta_norm": 0.01},
        top=top,
        quantiles=quant,
        negatives=negs,
        source_mass={"SECRET-SOURCE-TAG": 1.0},
    )


def scripted(category: str = "multilingual", *, bad_json_first: int = 0, detect=None):
    """fn(messages, choice, schema): explanation text, a JSON classification, or a choice."""
    state = {"bad": bad_json_first}

    def fn(messages, choice, schema):
        text = messages[-1]["content"]
        if choice == ["yes", "no"]:
            return "yes" if (detect(text) if detect else True) else "no"
        if choice is not None:
            return category
        if schema is not None:
            if state["bad"] > 0:
                state["bad"] -= 1
                return '{"category": "not a category", "secondary": null, "confidence": 9}'
            return json.dumps({"category": category, "secondary": None, "confidence": 4})
        return "The feature fires on French words."

    return fn
