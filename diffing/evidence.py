"""Data contracts between the analysis, labelling and report stages.

    RUN/latents.parquet            one row per latent (diffing.analysis), incl. a `group` column:
                                   "<model>-specific" for the selected model-specific latents,
                                   "baseline" for the random shared baseline, "" otherwise
    RUN/examples/<a>-<b>.jsonl     one LatentEvidence per line for latents [a, b) that have a group
    RUN/labels.jsonl               one LatentLabel per line, written by the label stage

Analyze writes evidence; the judge (serve/) reads the token strings and activations but never
the `source` tags (those are corpus metadata kept for evaluation against planted truth); the
report reads all three.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Annotated

from pydantic import BaseModel, ConfigDict, Field, StringConstraints, model_validator

EXAMPLES_DIR = "examples"
LABELS_FILE = "labels.jsonl"


MAX_TOKEN_CHARS = 1000  # one decoded token; a longer string is not a token


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class Example(_Model):
    """A token window around one activation of a latent."""

    tokens: list[Annotated[str, StringConstraints(max_length=MAX_TOKEN_CHARS)]] = Field(
        min_length=1,
        description=f"Token strings of the window, in order (decoded one by one; at most {MAX_TOKEN_CHARS} "
        "characters each).",
    )
    acts: list[Annotated[float, Field(allow_inf_nan=False)]] = Field(
        description="The latent's activation at each token (0 where it does not fire; finite)."
    )
    peak: int = Field(ge=0, description="Index in `tokens` of the token the window is centred on.")
    doc_id: int | None = Field(None, description="Store doc_id of the document.")
    pos: int | None = Field(None, description="Position of the peak token in its document.")
    source: str | None = Field(
        None, description="Corpus source tag (evaluation only; never shown to a judge)."
    )
    quantile: int | None = Field(None, ge=0, description="Activation-quantile bin, for quantile samples.")

    @model_validator(mode="after")
    def _check(self) -> Example:
        if len(self.tokens) != len(self.acts):
            raise ValueError(
                f"tokens ({len(self.tokens)}) and acts ({len(self.acts)}) must have one entry each"
            )
        if self.peak >= len(self.tokens):
            raise ValueError(f"peak={self.peak} is outside the window of {len(self.tokens)} tokens")
        return self

    @property
    def max_act(self) -> float:
        return max(self.acts, default=0.0)


class LatentEvidence(_Model):
    """Everything a judge (or a person) needs to explain one latent."""

    latent: int = Field(ge=0, description="Latent index in the crosscoder.")
    group: str = Field(description="Selection group: '<model>-specific' or 'baseline'.")
    stats: dict[str, float | None] = Field(
        default_factory=dict,
        description="Per-latent numbers: freq, mean_act, max_act, delta_norm, nu_eps, nu_r.",
    )
    top: list[Example] = Field(default_factory=list, description="Max-activating contexts, strongest first.")
    quantiles: list[Example] = Field(
        default_factory=list, description="Samples from activation quantiles (delphi style), `quantile` set."
    )
    negatives: list[Example] = Field(
        default_factory=list,
        description="Random contexts where the latent does not fire (for detection scoring).",
    )
    source_mass: dict[str, float] = Field(
        default_factory=dict, description="Share of the latent's activation mass per corpus source."
    )


class LatentLabel(_Model):
    """A judge's verdict on one latent."""

    latent: int = Field(ge=0)
    explanation: str = Field(description="One or two sentences: what the latent responds to.")
    category: str = Field(description="Primary category (a taxonomy member).")
    secondary: str | None = Field(None, description="Optional second category.")
    confidence: float = Field(ge=0.0, le=1.0, description="Judge's confidence in the primary category.")
    detection_score: float | None = Field(
        None, ge=0.0, le=1.0, description="Balanced accuracy of detection scoring, when asked."
    )
    judge_model: str = Field("", description="Model that produced the label.")
    prompt_version: str = Field("", description="Version of the labelling prompts.")
    cache_key: str = Field(
        "",
        description="Hash of what decides the label: evidence, context, prompt version, judge model, "
        "taxonomy, method settings, detection, (channel mode) the calibration set and a folded system message.",
    )


# ----------------------------------------------------------------------------------------------
# JSONL helpers (local paths; atomic: temp file + rename)


def write_jsonl(path: str | Path, items: Iterable[BaseModel]) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    with tmp.open("w") as f:
        for it in items:
            f.write(it.model_dump_json() + "\n")
    tmp.replace(path)


def read_jsonl(path: str | Path, cls: type[BaseModel]) -> list:
    path = Path(path)
    if not path.exists():
        return []
    out = []
    for i, line in enumerate(path.read_text().split("\n"), 1):
        if not line.strip():
            continue
        try:
            out.append(cls.model_validate(json.loads(line)))
        except ValueError as e:  # JSONDecodeError and pydantic's ValidationError
            first = e.errors()[0] if hasattr(e, "errors") else None
            what = f"{'.'.join(map(str, first['loc']))}: {first['msg']}" if first else str(e)
            raise ValueError(f"{path}:{i}: {what}; fix or delete that line and rerun") from None
    return out


def iter_evidence(run_dir: str | Path) -> Iterator[LatentEvidence]:
    """All evidence of a run, in latent order."""
    d = Path(run_dir) / EXAMPLES_DIR
    for p in sorted(d.glob("*.jsonl")):
        yield from read_jsonl(p, LatentEvidence)


def read_labels(run_dir: str | Path) -> dict[int, LatentLabel]:
    return {lab.latent: lab for lab in read_jsonl(Path(run_dir) / LABELS_FILE, LatentLabel)}


def fit_to_limits(ev: LatentEvidence, max_examples: int, max_window: int) -> LatentEvidence:
    """The evidence cut to what a labelling service accepts (its ``limits``): the first
    ``max_examples`` of each list, every window at most ``max_window`` tokens around its peak (an
    analysis with a wide ``window`` or a large ``n_top`` is labelled from what fits, not refused)."""

    def cut(ex: Example) -> Example:
        n = len(ex.tokens)
        if n <= max_window:
            return ex
        lo = max(0, min(ex.peak - max_window // 2, n - max_window))  # as the judge's prompt centres it
        sl = slice(lo, lo + max_window)
        return ex.model_copy(update={"tokens": ex.tokens[sl], "acts": ex.acts[sl], "peak": ex.peak - lo})

    lists = {name: getattr(ev, name) for name in ("top", "quantiles", "negatives")}
    if all(len(v) <= max_examples and all(len(x.tokens) <= max_window for x in v) for v in lists.values()):
        return ev
    return ev.model_copy(update={k: [cut(x) for x in v[:max_examples]] for k, v in lists.items()})


def visible_pieces(tokens: list[str], acts: list[float], peak: int = 0) -> tuple[list[str], list[float], int]:
    """A window's pieces as a reader sees them, and where its peak went. A token inside a character
    (byte-level BPE splits CJK, emoji and accents over tokens; its piece is empty) hands its
    activation on to the piece that completes the character; the bytes of a character cut off at
    the window's start or end (U+FFFD, or empty pieces left at the end) are dropped, their
    activation with them (it was not the neighbour's), only the peak moving to the nearest piece
    shown. So no mark or colour falls on nothing. A window with nothing visible is returned as is."""
    out: list[list] = []  # [piece, activation, holds the peak]
    carry: float | None = None
    carry_peak = False
    last = len(tokens) - 1
    for i, (t, a) in enumerate(zip(tokens, acts, strict=True)):
        cut = False
        if not out and t.startswith("\ufffd"):  # bytes of a character begun before the window
            t, cut = t.lstrip("\ufffd"), True
        if i == last and t.endswith("\ufffd"):  # ...or finished after it
            t, cut = t.rstrip("\ufffd"), True
        if not t:
            if not cut:
                carry = a if carry is None else max(carry, a)
            carry_peak = carry_peak or i == peak
            continue
        out.append([t, a if carry is None else max(a, carry), carry_peak or i == peak])
        carry, carry_peak = None, False
    if not out:
        return list(tokens), list(acts), peak
    if carry_peak:  # an unfinished character at the end held it
        out[-1][2] = True
    return [o[0] for o in out], [o[1] for o in out], next(j for j, o in enumerate(out) if o[2])
