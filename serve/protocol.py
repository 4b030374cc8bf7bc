"""Request and response models of the labelling API (version 1: everything under /v1).

A request carries latents as `diffing.evidence.LatentEvidence` (what Analyze writes to
RUN/examples/*.jsonl) plus an optional free-text context; a response carries one
`diffing.evidence.LatentLabel` per latent, in request order. The `source` tags of examples are
accepted (so evidence can be posted as written) but never shown to the judge and never part of
a cache key.
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from diffing.evidence import LatentEvidence, LatentLabel
from serve.taxonomy import Category

API_VERSION = "v1"


class LatentItem(LatentEvidence):
    """One latent to label: its evidence, plus optional context for the judge."""

    context: str | None = Field(
        None, max_length=2000, description="Optional note for the judge (e.g. what the corpus is)."
    )


class LabelRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    latents: list[LatentItem] = Field(
        min_length=1, description="Latents to label (at most limits.max_batch)."
    )
    detection: bool = Field(
        False, description="Also score the explanation by detection on held-out examples (balanced accuracy)."
    )
    calibration: list[LatentEvidence] = Field(
        default_factory=list,
        description="Channel classification only (ignored otherwise): evidence of ordinary latents of the "
        "same run, e.g. its random shared baseline (at most limits.max_calibration; only their top "
        "examples are read). Each category's score is then measured against these latents' text "
        "instead of a fixed neutral English text. Part of the cache key in channel mode.",
    )


class LabelResponse(BaseModel):
    model_config = ConfigDict(extra="forbid")

    api_version: str = API_VERSION
    labels: list[LatentLabel] = Field(description="One label per requested latent, in request order.")
    judge_model: str
    prompt_version: str
    taxonomy_version: str
    settings_fingerprint: str = Field(
        "",
        description="Hash of what decides every label of this service besides the request: judge and "
        "its setup, prompt version, the exact taxonomy, the method. A client resuming a labels file "
        "compares it to tell that the endpoint now labels differently.",
    )
    cached: int = Field(0, description="How many labels came from the cache.")


class TaxonomyResponse(BaseModel):
    api_version: str = API_VERSION
    version: str
    categories: list[Category]


class LimitsResponse(BaseModel):
    """What one request may hold (the service's `limits`): a client cuts its evidence to these."""

    api_version: str = API_VERSION
    max_batch: int = Field(description="Most latents per request.")
    max_calibration: int = Field(description="Most calibration latents per request.")
    max_examples: int = Field(description="Most examples per list (top, quantiles, negatives).")
    max_window: int = Field(description="Most tokens per example window.")
    max_body_bytes: int = Field(description="Largest request body.")


class Health(BaseModel):
    status: str = Field(description="ok, or unavailable when the judge does not answer.")
    judge_model: str
    detail: str | None = None


class ErrorBody(BaseModel):
    detail: str = Field(description="What went wrong and what to do about it.")
    field: str | None = Field(None, description="The offending request field, when there is one.")
    errors: list[dict[str, Any]] | None = Field(
        None, description="Request validation (422): every error, as {loc, msg, type}."
    )
