"""The labelling endpoint's client side: one batch posted with retries (backoff honouring
Retry-After, a 413 split in halves, a judge failing twice on one input given up), and the
evidence cut to the limits the endpoint announces."""

from __future__ import annotations

import asyncio
import json
import random

import httpx

from diffing.evidence import LatentEvidence, LatentLabel, fit_to_limits
from diffing.logs import get_logger
from jobs.label_config import LabelConfig

log = get_logger("crossdiff.label")


class LabelJobError(RuntimeError):
    """The endpoint kept failing; labels written so far are kept, rerun to resume. `retryable`:
    the endpoint was unreachable or kept failing (a later rerun may succeed), not a rejected input."""

    def __init__(self, msg: str, *, retryable: bool = False):
        super().__init__(msg)
        self.retryable = retryable

    def __reduce__(self):  # keeps `retryable` across processes (Ray re-raises pickled errors)
        return (_label_job_error, (str(self), self.retryable))


def _label_job_error(msg: str, retryable: bool) -> LabelJobError:
    return LabelJobError(msg, retryable=retryable)


def _retry_delay(cfg: LabelConfig, attempt: int, resp: httpx.Response | None) -> float:
    if resp is not None and resp.headers.get("retry-after", "").isdigit():
        return min(cfg.max_backoff_s, float(resp.headers["retry-after"]))
    return min(cfg.max_backoff_s, cfg.backoff_s * 2**attempt) * (0.5 + random.random() / 2)


async def _post_batch(
    client: httpx.AsyncClient, batch: list[LatentEvidence], cfg: LabelConfig, calibration: list[dict]
) -> list[tuple[LatentLabel, str, str]]:
    """The batch's labels, each with the endpoint's settings fingerprint ("" from an older service)
    and its taxonomy version."""
    body = {"latents": [json.loads(e.model_dump_json()) for e in batch], "detection": cfg.detection}
    if calibration:
        body["calibration"] = calibration
    last = "no attempt"
    for attempt in range(cfg.max_attempts):
        resp = None
        try:
            resp = await client.post("/v1/labels", json=body)
        except httpx.HTTPError as e:
            last = f"{type(e).__name__}: {e}"
        else:
            if resp.status_code == 200:
                body = resp.json()
                fp, tax = str(body.get("settings_fingerprint") or ""), str(body.get("taxonomy_version") or "")
                return [(LatentLabel.model_validate(x), fp, tax) for x in body["labels"]]
            if resp.status_code == 413 and len(batch) > 1:  # too big: split
                half = len(batch) // 2
                return [
                    *await _post_batch(client, batch[:half], cfg, calibration),
                    *await _post_batch(client, batch[half:], cfg, calibration),
                ]
            last = f"{resp.status_code}: {resp.text[:300]}"
            # 408: a proxy's request timeout (Serve's x-request-timeout-seconds), worth another try
            if resp.status_code < 500 and resp.status_code not in (408, 429):
                raise LabelJobError(f"the endpoint rejected latents {[e.latent for e in batch]}: {last}")
            if (
                resp.status_code == 502 and attempt >= 1
            ):  # the judge failed on this input twice: it will again
                raise LabelJobError(f"the judge failed twice on latents {[e.latent for e in batch]}: {last}")
        delay = _retry_delay(cfg, attempt, resp)
        log.warning("label.retry", attempt=attempt + 1, delay_s=round(delay, 1), error=last[:200])
        await asyncio.sleep(delay)
    raise LabelJobError(
        f"latents {[e.latent for e in batch]} failed {cfg.max_attempts} times (last: {last}); rerun to resume",
        retryable=True,
    )


async def _within_endpoint_limits(
    client: httpx.AsyncClient, todo: list[LatentEvidence], calibration: list[dict], cfg: LabelConfig
) -> tuple[list[LatentEvidence], list[dict], int]:
    """The evidence cut to what the endpoint takes (GET /v1/limits; a service without it keeps
    the config's `service.limits`), and the batch size it allows: a remote service with smaller
    limits labels what fits instead of refusing every request."""
    resp = None
    try:
        resp = await client.get("/v1/limits")
        lim = resp.json() if resp.status_code == 200 else None
        n_ex, width, most, n_cal = (
            int(lim[k]) for k in ("max_examples", "max_window", "max_batch", "max_calibration")
        )
    except (httpx.HTTPError, ValueError, TypeError, KeyError) as e:
        if resp is None or resp.status_code not in (404, 405):  # not an older service: say so
            why = f"HTTP {resp.status_code}" if resp is not None else f"{type(e).__name__}: {e}"
            log.warning("label.limits_unknown", error=why[:200], using="the config's service.limits")
        return todo, calibration, cfg.batch_size
    if len(calibration) > n_cal:
        raise LabelJobError(
            f"the endpoint takes at most {n_cal} calibration latents (its limits.max_calibration) and this "
            f"run sends {len(calibration)}: set calibration_size <= {n_cal}"
        )
    todo = [fit_to_limits(e, n_ex, width) for e in todo]
    calibration = [
        json.loads(fit_to_limits(LatentEvidence.model_validate(c), n_ex, width).model_dump_json())
        for c in calibration
    ]
    if most < cfg.batch_size:
        log.info(
            "label.endpoint_limits",
            batch_size=most,
            note=f"the endpoint's max_batch ({cfg.batch_size} asked)",
        )
    return todo, calibration, min(cfg.batch_size, most)
