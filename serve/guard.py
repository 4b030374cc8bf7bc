"""What the labelling API checks before a request reaches the judge: the ASGI `Guard` (bearer auth,
body size) and the per-request limits, with the error body every refusal shares."""

from __future__ import annotations

import hmac
from typing import TYPE_CHECKING

from fastapi.responses import JSONResponse

from serve.protocol import ErrorBody, LabelRequest
from serve.settings import ServiceSettings

if TYPE_CHECKING:
    from serve.app import Service

PUBLIC_PATHS = ("/healthz", "/livez", "/docs", "/openapi.json", "/redoc", "/docs/oauth2-redirect")


def _error(
    status: int, detail: str, field: str | None = None, retry_after: int | None = None
) -> JSONResponse:
    headers = {"Retry-After": str(retry_after)} if retry_after else None
    return JSONResponse(
        ErrorBody(detail=detail, field=field).model_dump(), status_code=status, headers=headers
    )


class Guard:
    """ASGI middleware: bearer auth (401) and the body-size limit (413) before any parsing."""

    def __init__(self, app, service: Service):
        self.app = app
        self.service = service

    async def __call__(self, scope, receive, send):
        if scope["type"] == "websocket":  # no route takes one; refused before any auth question
            return await send({"type": "websocket.close", "code": 1008})
        if scope["type"] != "http":  # lifespan
            return await self.app(scope, receive, send)
        path = scope.get("path", "")
        root = scope.get("root_path", "")  # Ray Serve keeps its route prefix in `path`, and sets root_path
        if root and path.startswith(root):
            path = path[len(root) :] or "/"
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope.get("headers", [])}
        token = self.service.token
        if token and not path.startswith(PUBLIC_PATHS):
            got = headers.get("authorization", "")
            scheme, _, cred = got.partition(" ")
            # header bytes came in as latin-1: back to those bytes, compared with the token's UTF-8
            cred_bytes = cred.strip(" \t").encode("latin-1")  # str.strip() would eat UTF-8 bytes (\xa0)
            if scheme.lower() != "bearer" or not hmac.compare_digest(cred_bytes, token.encode()):
                resp = _error(
                    401, "missing or wrong bearer token (Authorization: Bearer <token>)", "Authorization"
                )
                resp.headers["WWW-Authenticate"] = "Bearer"
                return await resp(scope, receive, send)
        if scope.get("method") not in ("POST", "PUT", "PATCH"):
            return await self.app(scope, receive, send)
        limit = self.service.settings.limits.max_body_bytes
        too_big = _error(
            413, f"request body exceeds limits.max_body_bytes={limit}; send fewer latents", "body"
        )
        cl = headers.get("content-length")
        if cl is not None:
            if not cl.isdigit():
                return await _error(400, "invalid Content-Length", "Content-Length")(scope, receive, send)
            if int(cl) > limit:
                return await too_big(scope, receive, send)
        chunks, total, more = [], 0, True
        while more:
            msg = await receive()
            if msg["type"] == "http.disconnect":
                return
            body = msg.get("body", b"")
            total += len(body)
            if total > limit:
                return await too_big(scope, receive, send)
            chunks.append(body)
            more = msg.get("more_body", False)
        data, replayed = b"".join(chunks), False

        async def replay():
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": data, "more_body": False}
            return await receive()

        return await self.app(scope, replay, send)


def _check_limits(req: LabelRequest, settings: ServiceSettings) -> JSONResponse | None:
    lim = settings.limits
    for field, items, most, name in (
        ("latents", req.latents, lim.max_batch, "max_batch"),
        ("calibration", req.calibration, lim.max_calibration, "max_calibration"),
    ):
        if len(items) > most:
            return _error(422, f"{field} has {len(items)} items; the limit is limits.{name}={most}", field)
    for field, items in (("latents", req.latents), ("calibration", req.calibration)):
        for i, ev in enumerate(items):
            for name in ("top", "quantiles", "negatives"):
                exs = getattr(ev, name)
                where = f"{field}.{i}.{name}"
                if len(exs) > lim.max_examples:
                    return _error(
                        422,
                        f"{where} has {len(exs)} examples; the limit is limits.max_examples={lim.max_examples}",
                        where,
                    )
                for j, ex in enumerate(exs):
                    if len(ex.tokens) > lim.max_window:
                        return _error(
                            422,
                            f"{where}.{j}.tokens has {len(ex.tokens)} tokens; the limit is "
                            f"limits.max_window={lim.max_window}",
                            f"{where}.{j}.tokens",
                        )
    return None


def _parse_error(cause: BaseException | None) -> str:
    """What was wrong with a body FastAPI could not parse (its own 400 says only that it could not)."""
    if isinstance(cause, UnicodeDecodeError):
        return (
            f"body: not valid UTF-8 (byte {cause.start}: {cause.reason}); send a JSON object encoded as UTF-8"
        )
    if isinstance(cause, RecursionError):
        return "body: JSON nested too deeply to parse; send a JSON object of the documented shape"
    reason = f"{type(cause).__name__}: {str(cause)[:200]}" if cause is not None else "unknown error"
    return f"body: could not be parsed as JSON ({reason}); send a JSON object encoded as UTF-8"
