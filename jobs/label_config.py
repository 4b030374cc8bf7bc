"""The label job's config (`crossdiff label`, the pipeline's `label` section)."""

from __future__ import annotations

from pydantic import Field, model_validator

from diffing.config import Frozen
from serve.settings import ServiceSettings


class LabelConfig(Frozen):
    groups: tuple[str, ...] | None = Field(
        None,
        min_length=1,
        description="Evidence groups to label (e.g. 'ft-specific', 'baseline'); unset: every group.",
    )
    batch_size: int = Field(8, ge=1, description="Latents per request.")
    concurrency: int = Field(4, ge=1, description="Requests in flight.")
    detection: bool = Field(False, description="Ask for detection scores (more judge calls per latent).")
    calibration_group: str | None = Field(
        "baseline",
        description="Channel classification (service.method.classify_mode: channel; with --endpoint, set it "
        "to the endpoint's mode): evidence group sent with every request as the calibration set, ordinary "
        "latents of the run (analyze's random shared baseline). None, or a group the run lacks: the "
        "service's fixed neutral text. Labelling that group itself calibrates it against itself.",
    )
    calibration_size: int = Field(
        64, ge=1, description="Most latents of calibration_group sent (in the run's order)."
    )
    max_attempts: int = Field(6, ge=1, description="Tries per batch before the run fails (rerun resumes).")
    backoff_s: float = Field(2.0, gt=0, description="First retry delay; doubles per attempt (with jitter).")
    max_backoff_s: float = Field(60.0, gt=0, description="Longest retry delay.")
    request_timeout_s: float = Field(900.0, gt=0, description="Client deadline per request.")
    token_env: str = Field(
        "CROSSDIFF_API_TOKEN", description="Environment variable with the endpoint's bearer token."
    )
    start_timeout_s: float = Field(
        900.0, gt=0, description="How long a local service may take to come up (vLLM start-up on CPU)."
    )
    service: ServiceSettings = Field(
        default_factory=ServiceSettings,
        description="Settings of the local service started without --endpoint.",
    )

    @model_validator(mode="after")
    def _check(self) -> LabelConfig:
        if self.max_backoff_s < self.backoff_s:
            raise ValueError("max_backoff_s must be >= backoff_s")
        if self.calibration_group and self.calibration_size > self.service.limits.max_calibration:
            raise ValueError(
                f"calibration_size={self.calibration_size} exceeds service.limits.max_calibration="
                f"{self.service.limits.max_calibration}"
            )
        if self.batch_size > self.service.limits.max_batch:
            raise ValueError(
                f"batch_size={self.batch_size} exceeds service.limits.max_batch={self.service.limits.max_batch}"
            )
        return self
