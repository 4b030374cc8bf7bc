"""Typed, frozen configs for the crosscoder and its training.

Every field carries one help string; every cross-field rule is checked in one place
(the model validators below), so a bad config fails before any work with the field's name
and the fix. Configs are saved next to every artifact they produce.
"""

from __future__ import annotations

import math
import os
from typing import Annotated, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, ValidationError, model_validator


def expand_home(value: str | None) -> str | None:
    """`~/x` is the home directory's x, as a shell would read it (which it does not after
    `--out=` or in a config file); URLs and other paths unchanged."""
    return os.path.expanduser(value) if isinstance(value, str) and value.startswith("~") else value


# a local path or a URL, `~` expanded: code that resolves paths and fsspec (which expands it) then agree
PathOrURL = Annotated[str, AfterValidator(expand_home)]


class Frozen(BaseModel):
    """Base for all configs: immutable, unknown keys rejected."""

    # infinity ("no limit") is saved as "Infinity", not as null, so a saved config reloads as itself
    model_config = ConfigDict(frozen=True, extra="forbid", validate_default=True, ser_json_inf_nan="strings")

    @model_validator(mode="after")
    def _no_nan(self) -> Frozen:
        """NaN means nothing in a config (it fails every comparison); infinity stays allowed, as
        "no limit" in the fields that are limits."""
        for name, value in self:
            if isinstance(value, float) and math.isnan(value):
                raise ValueError(f"{name}: NaN is not a value; give a number")
        return self


class CrosscoderConfig(Frozen):
    kind: Literal["batchtopk", "l1"] = Field(
        "batchtopk",
        description="Sparsity mechanism: BatchTopK (default) or an L1 penalty weighted by decoder norms.",
    )
    n_models: int | None = Field(
        None,
        ge=2,
        description="Number of models sharing the dictionary (2 for a pair). Default: from the store.",
    )
    d_model: int | None = Field(None, ge=1, description="Activation width. Default: from the store.")
    model_names: tuple[str, ...] | None = Field(
        None, description="One name per model, in store order. Default: from the store."
    )
    n_latents: int | None = Field(
        None, ge=1, description="Dictionary size. Default: expansion_factor * d_model."
    )
    expansion_factor: int = Field(
        8, ge=1, description="n_latents = expansion_factor * d_model when n_latents is unset."
    )
    k: int = Field(
        32, ge=1, description="BatchTopK: mean active latents per token (k * batch entries kept per batch)."
    )
    k_anneal_start: int | None = Field(
        None,
        ge=1,
        description="BatchTopK: start k here and anneal linearly to k over k_anneal_frac of training.",
    )
    k_anneal_frac: float = Field(
        0.1, ge=0.0, le=1.0, description="Fraction of training over which k is annealed."
    )
    auxk_alpha: float = Field(
        1 / 32,
        allow_inf_nan=False,
        ge=0.0,
        description="Weight of the AuxK loss on dead latents (0 disables).",
    )
    aux_k: int | None = Field(
        None,
        ge=1,
        description="AuxK: dead latents used per token. Default: n_models * d_model // 2, at most n_latents // 2.",
    )
    dead_after_tokens: int = Field(
        1_000_000, ge=1, description="A latent that has not fired for this many tokens counts as dead."
    )
    threshold_momentum: float = Field(
        0.99, ge=0.0, lt=1.0, description="EMA momentum of the BatchTopK inference threshold."
    )
    l1_coeff: float = Field(
        2.0, allow_inf_nan=False, ge=0.0, description="L1: weight of sum_l f_l * sum_m ||d_m,l||."
    )
    l1_warmup_frac: float = Field(
        0.05, ge=0.0, le=1.0, description="L1: fraction of training to ramp l1_coeff up from 0."
    )
    dec_init_norm: float = Field(
        0.1,
        allow_inf_nan=False,
        gt=0.0,
        description="Initial norm of each per-model decoder row (the encoder starts as its transpose).",
    )

    @model_validator(mode="after")
    def _check(self) -> CrosscoderConfig:
        if self.model_names is not None:
            if len(set(self.model_names)) != len(self.model_names):
                raise ValueError(f"crosscoder.model_names must be unique, got {list(self.model_names)}")
            if self.n_models is not None and len(self.model_names) != self.n_models:
                raise ValueError(
                    f"crosscoder.model_names has {len(self.model_names)} names but crosscoder.n_models="
                    f"{self.n_models}; give one name per model"
                )
        if self.k_anneal_start is not None and self.k_anneal_start < self.k:
            raise ValueError("crosscoder.k_anneal_start must be >= crosscoder.k (k is annealed downwards)")
        if self.n_latents is not None and self.kind == "batchtopk" and self.k > self.n_latents:
            raise ValueError(f"crosscoder.k={self.k} exceeds crosscoder.n_latents={self.n_latents}; lower k")
        return self

    def resolve(self, *, n_models: int, d_model: int, model_names: tuple[str, ...]) -> CrosscoderConfig:
        """Fill the data-dependent fields from a store; fails if explicit values disagree with it."""
        for name, have, want in (("n_models", self.n_models, n_models), ("d_model", self.d_model, d_model)):
            if have is not None and have != want:
                raise ValueError(
                    f"crosscoder.{name}={have} but the store has {name}={want}; drop the override"
                )
        if self.model_names is not None and tuple(self.model_names) != tuple(model_names):
            raise ValueError(
                f"crosscoder.model_names={list(self.model_names)} but the store holds {list(model_names)}"
            )
        n_latents = self.n_latents or self.expansion_factor * d_model
        try:
            return self.model_copy(
                update=dict(
                    n_models=n_models,
                    d_model=d_model,
                    model_names=tuple(model_names),
                    n_latents=n_latents,
                    aux_k=self.aux_k or max(1, min(n_latents // 2, n_models * d_model // 2)),
                )
            ).validated()
        except ValidationError as e:  # one line naming the fields, not pydantic's dump of the config
            why = "; ".join(str(err["msg"]).removeprefix("Value error, ") for err in e.errors())
            src = (
                f"crosscoder.n_latents = expansion_factor {self.expansion_factor} x d_model {d_model} = {n_latents}"
                if self.n_latents is None
                else f"d_model {d_model}"
            )
            raise ValueError(f"{why} ({src})") from None

    @property
    def is_resolved(self) -> bool:
        return None not in (self.n_models, self.d_model, self.model_names, self.n_latents, self.aux_k)

    def validated(self) -> CrosscoderConfig:
        return type(self).model_validate(self.model_dump())


class TrainConfig(Frozen):
    batch_size: int = Field(1024, ge=1, description="Tokens per optimizer step (global, across all workers).")
    lr: float = Field(5e-4, allow_inf_nan=False, gt=0.0, description="Peak Adam learning rate.")
    steps: int | None = Field(
        None, ge=1, description="Optimizer steps. Default: epochs passes over the store."
    )
    epochs: float = Field(
        1.0, allow_inf_nan=False, gt=0.0, description="Passes over the store when steps is unset."
    )
    warmup_frac: float = Field(0.05, ge=0.0, le=1.0, description="Linear LR warm-up, as a fraction of steps.")
    decay_frac: float = Field(
        0.2, ge=0.0, le=1.0, description="Linear LR decay to 0 over this final fraction."
    )
    grad_clip: float | None = Field(1.0, gt=0.0, description="Global grad-norm clip (None disables).")
    adam_betas: tuple[float, float] = Field((0.9, 0.999), description="Adam (beta1, beta2), each in [0, 1).")
    seed: int = Field(0, ge=0, description="Seed for initialisation, data order and AuxK tie-breaks.")
    shuffle_buffer_rows: int = Field(
        262_144,
        ge=1,
        description="In-process fit (workers 0): rows held in the streaming shuffle buffer (memory = rows * "
        "n_models * d_model * the store's bytes per value). Ray Train fits use distributed.shuffle_buffer_rows.",
    )
    log_every: int = Field(50, ge=1, description="Steps between metric log lines.")
    checkpoint_every: int = Field(1000, ge=1, description="Steps between resumable checkpoints.")
    eval_tokens: int = Field(
        65_536,
        ge=0,
        description="Tokens used for the final FVE / L0 / dead evaluation (0: the whole store, which "
        "at the Gemma shape is hours on one process).",
    )
    device: Literal["auto", "cpu", "cuda"] = Field(
        "auto",
        description="In-process fit: where to train; auto picks cuda if present. Ray Train fits place "
        "workers by distributed.use_gpu.",
    )
    bf16_autocast: bool = Field(True, description="Use bf16 autocast on GPU (master weights stay fp32).")

    @model_validator(mode="after")
    def _check(self) -> TrainConfig:
        if self.warmup_frac + self.decay_frac > 1.0:
            raise ValueError("train.warmup_frac + train.decay_frac must be <= 1")
        if not all(0.0 <= b < 1.0 for b in self.adam_betas):
            raise ValueError(
                f"train.adam_betas={list(self.adam_betas)}: each must be in [0, 1), e.g. [0.9, 0.999]"
            )
        return self


class AnalysisConfig(Frozen):
    only_low: float = Field(
        0.1, ge=0.0, le=0.5, description="Δnorm below this: specific to the second model."
    )
    only_high: float = Field(
        0.9, ge=0.5, le=1.0, description="Δnorm above this: specific to the first model."
    )
    shared_low: float = Field(
        0.4, ge=0.0, le=0.5, description="Δnorm in [shared_low, 1 - shared_low]: shared."
    )
    nu_eps_max: float = Field(
        0.2,
        ge=0.0,
        description="Latent Scaling: robust model-only needs |ν^ε| below this (crossdiff's "
        "default cut, not a value from the papers; see docs/analysis.md).",
    )
    nu_r_max: float = Field(
        0.5,
        ge=0.0,
        description="Latent Scaling: robust model-only needs |ν^r| below this (crossdiff's "
        "default cut, not a value from the papers; see docs/analysis.md).",
    )
    max_tokens: int = Field(
        262_144, ge=1, description="Tokens of the store read for frequencies and Latent Scaling."
    )
    tail_frac: float = Field(
        0.02, ge=0.0, le=0.5, description="Also score the lowest/highest tail_frac of live latents by Δnorm."
    )
    batch_size: int = Field(4096, ge=1, description="Tokens per encoding batch.")
    device: Literal["auto", "cpu", "cuda"] = Field(
        "auto",
        description="Where latent statistics, Latent Scaling and the splice's full models run (auto: "
        "cuda if present); the Gemma-2-9b shape needs a GPU (about 10 TFLOP of encoding per 4,096-token "
        "batch).",
    )
    # -- selection of model-specific latents (the `group` column) ---------------------------
    selection: Literal["class", "tail", "both"] = Field(
        "both",
        description="Model-specific latents: 'class' = robust <model>-only by absolute Δnorm, 'tail' = "
        "rank-based Δnorm tails (tail_frac), 'both' = their union (never empty on small fine-tunes).",
    )
    max_per_group: int | None = Field(
        None,
        ge=1,
        description="Keep at most this many latents per model-specific group, most robust "
        "(smallest max(|ν^ε| / nu_eps_max, |ν^r| / nu_r_max)) first. None keeps all.",
    )
    baseline_seed: int = Field(
        0, ge=0, description="Seed of the random shared baseline (same size as the largest group)."
    )
    # -- latent evidence (RUN/examples/) ----------------------------------------------------
    evidence: bool = Field(
        True, description="Collect max-activating / quantile / negative contexts per selected latent."
    )
    source_mass: Literal["auto", "always", "never"] = Field(
        "auto",
        description="RUN/source_mass.parquet: every latent's activation mass per corpus source over the "
        "held-out rows (the planted-truth check's reference rate; the selected latents' own source mass "
        "is in their evidence either way). It encodes every latent over every held-out row: seconds on "
        "the demo, CPU-hours at the Gemma-2-9b shape. auto: only for a pipeline with a `planted` check "
        "(a `planted` added to an analysed run finds no file and the check falls back to the sampled "
        "baseline: `crossdiff analyze` on the run with source_mass=always computes only the mass).",
    )
    heldout: Literal["hash", "last_shards", "all"] = Field(
        "hash",
        description="Rows used for evidence: 'hash' = docs whose doc_id hashes below heldout_frac, "
        "'last_shards' = the last heldout_frac of shards, 'all' = the whole store.",
    )
    heldout_frac: float = Field(
        0.2, gt=0.0, le=1.0, description="Share of docs / shards held out for evidence."
    )
    evidence_max_tokens: int = Field(
        1_000_000,
        ge=1,
        description="Stop adding held-out shards once about this many held-out rows are covered.",
    )
    n_top: int = Field(20, ge=1, description="Max-activating contexts per latent (one per document).")
    window: int = Field(16, ge=0, description="Tokens kept either side of the peak in every context.")
    n_quantiles: int = Field(
        5, ge=1, description="Activation-quantile bins for quantile samples (delphi style)."
    )
    per_quantile: int = Field(4, ge=0, description="Contexts sampled from every quantile bin.")
    reservoir: int = Field(
        512,
        ge=1,
        description="Activating documents kept per latent (uniform sample) to estimate quantile bins.",
    )
    n_negatives: int = Field(10, ge=0, description="Random contexts where the latent does not fire.")
    tokenizer: str | None = Field(
        None,
        description="Tokenizer (local directory or cached hub id) that turns the evidence's token ids "
        "into text. Default: the first harvested model's path, as the harvest saw it; set this when "
        "the analysis runs where that path does not exist. Its vocabulary must be the harvested one "
        "(checked against the store's fingerprint, where the store has one).",
    )
    evidence_seed: int = Field(0, description="Seed of the held-out hash and all evidence sampling.")
    latents_per_file: int = Field(
        1024, ge=1, description="Latent-index range per RUN/examples/<a>-<b>.jsonl file (the unit of resume)."
    )
    latents_per_pass: int = Field(
        512, ge=1, description="Selected latents encoded per pass over the held-out store (bounds memory)."
    )
    evidence_workers: int = Field(
        0,
        ge=0,
        description="Ray Data tasks' concurrency for the evidence pass; 0 runs in-process without Ray.",
    )
    # -- splice evaluation (RUN/splice.json) ------------------------------------------------
    splice: bool = Field(False, description="Also run the splice evaluation (needs the harvest models).")
    splice_prompts: int = Field(32, ge=1, description="Held-out documents used as splice prompts.")
    splice_max_len: int = Field(256, ge=2, description="Tokens per splice prompt (longer ones are cut).")
    splice_skip_first: int = Field(
        1, ge=0, description="Leave the first tokens of each prompt unspliced (BOS / attention sinks)."
    )

    @model_validator(mode="after")
    def _check(self) -> AnalysisConfig:
        # the shared band must lie between the model-only bands, or it silently takes their latents
        if self.shared_low < self.only_low or 1 - self.shared_low > self.only_high:
            raise ValueError(
                f"shared_low={self.shared_low} puts the shared band [{self.shared_low}, "
                f"{1 - self.shared_low:g}] over the model-only ones (below only_low={self.only_low}, above "
                f"only_high={self.only_high}); keep only_low <= shared_low and 1 - shared_low <= only_high"
            )
        return self


class DistributedConfig(Frozen):
    workers: int = Field(
        0,
        ge=0,
        description="Ray Train DDP workers; 0 trains in-process without Ray. Another count is another fit "
        "(each rank sees other rows): a finished fit stands only for its own.",
    )
    use_gpu: bool = Field(False, description="One GPU per worker (NCCL); else CPU workers (gloo).")
    cpus_per_worker: float = Field(
        1.0, allow_inf_nan=False, gt=0.0, description="CPUs reserved per training worker."
    )
    max_failures: int = Field(
        2, ge=-1, description="Worker-group restarts from the last checkpoint (-1: unlimited)."
    )
    num_to_keep: int = Field(2, ge=1, description="Checkpoints kept in the run's storage.")
    shuffle_buffer_rows: int = Field(
        65_536, ge=0, description="Ray Data local shuffle buffer per worker (0: none)."
    )
    prefetch_batches: int = Field(
        4,
        ge=0,
        description="Batches read ahead, overlapping reads with steps: by each worker's Ray Data "
        "iterator, or in-process (workers 0) by a background thread (0: read on the training thread).",
    )


class FitConfig(Frozen):
    crosscoder: CrosscoderConfig = Field(
        default_factory=CrosscoderConfig, description="Crosscoder architecture."
    )
    train: TrainConfig = Field(default_factory=TrainConfig, description="Optimisation.")
    distributed: DistributedConfig = Field(
        default_factory=DistributedConfig, description="Ray Train DDP settings."
    )

    @model_validator(mode="after")
    def _check(self) -> FitConfig:
        w = self.distributed.workers
        if w > 1 and self.train.batch_size % w:
            raise ValueError(
                f"train.batch_size={self.train.batch_size} must be divisible by distributed.workers={w} "
                "(each worker takes an equal share of the global batch)"
            )
        return self


# Loading, overrides and errors live in diffing/config_io.py; imported from here as they always were.
from diffing.config_io import (  # noqa: E402
    ConfigError,
    apply_overrides,
    config_reference,
    format_validation_error,
    load_config,
    read_config_file,
    validate_with_overrides,
)

__all__ = [
    "AnalysisConfig", "ConfigError", "CrosscoderConfig", "DistributedConfig", "FitConfig", "Frozen",
    "TrainConfig", "apply_overrides", "config_reference", "format_validation_error", "load_config",
    "read_config_file", "validate_with_overrides",
]  # fmt: skip
