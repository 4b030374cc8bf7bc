"""Batches of documents for the harvest's forward passes, and where a batch's length matters.

A forward pass pads its batch to the longest document. For most models a document's activations do
not depend on that padding (the attention mask hides it). Some rotary embeddings are rescaled by
transformers from the batch's longest position instead:
- LongRoPE (Phi-3-mini-128k, Phi-3.5-mini, Phi-4-mini) uses its short factors up to
  ``original_max_position_embeddings`` tokens and its long factors past it;
- dynamic NTK scaling recomputes the frequencies for every length past ``max_position_embeddings``.
A short document batched with a long one would be read with the long one's positions (0.5
relative error measured on a tiny Phi-3). ``length_batches`` keeps each document's batch in its
own length regime, so its activations are those of the document run alone.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any


def length_regimes(model: Any) -> list[tuple[int, bool]]:
    """[(L, alone)]: past L tokens the model's rotary embedding depends on the batch's length;
    ``alone``: past L every length differs (dynamic NTK), so such a document runs by itself.
    Empty where positions do not depend on the batch."""
    cfg = getattr(model, "config", model)
    cfg = cfg.get_text_config() if hasattr(cfg, "get_text_config") else cfg  # Gemma 3: nested
    params = getattr(cfg, "rope_parameters", None) or getattr(cfg, "rope_scaling", None) or {}
    if not isinstance(params, dict):
        return []
    # per attention type (Gemma 3: {"sliding_attention": {...}, "full_attention": {...}}) or one
    groups = (
        list(params.values()) if params and all(isinstance(v, dict) for v in params.values()) else [params]
    )
    out: list[tuple[int, bool]] = []
    for p in groups:
        kind = str(p.get("rope_type") or p.get("type") or "")
        if kind == "longrope":
            n = p.get("original_max_position_embeddings") or getattr(
                cfg, "original_max_position_embeddings", None
            )
            out.append((int(n or cfg.max_position_embeddings), False))
        elif "dynamic" in kind:
            out.append((int(cfg.max_position_embeddings), True))
    return sorted(set(out))


def length_batches(
    docs: Sequence[Any], batch_prompts: int, regimes: Sequence[tuple[int, bool]] = ()
) -> list[list]:
    """Documents (with ``.ids``) sorted by length into batches of at most ``batch_prompts`` (less
    padding); no batch mixes documents from two sides of a ``length_regimes`` boundary, and a
    document past an ``alone`` boundary gets a batch of its own."""

    def side(n: int) -> tuple[bool, ...]:
        return tuple(n > limit for limit, _ in regimes)

    def alone(n: int) -> bool:
        return any(n > limit and a for limit, a in regimes)

    batches: list[list] = []
    for d in sorted((d for d in docs if d.ids), key=lambda d: len(d.ids)):
        n = len(d.ids)
        cur = batches[-1] if batches else None
        if cur is None or len(cur) >= batch_prompts or side(len(cur[0].ids)) != side(n) or alone(n):
            batches.append([d])
        else:
            cur.append(d)
    return batches
