"""Bulk labelling: every evidence item of a run -> the labelling endpoint -> RUN/labels.jsonl.

    label_run(run_dir, LabelConfig(), endpoint=None)   # None: start a local service, stop it after

Bounded concurrency (`concurrency` requests of `batch_size` latents in flight), retries with
exponential backoff (honouring Retry-After) on 5xx/timeouts, a 413 splits the batch, resume
(latents already in labels.jsonl are skipped; a torn last line from a killed run is dropped; a run
whose label-deciding settings changed since is refused unless --overwrite, so one labels.jsonl never
mixes two judges, prompts or methods), and every finished batch is appended to labels.jsonl in one
write + fsync.
"""

from __future__ import annotations

import asyncio
import json
import os
import time
from collections import Counter
from pathlib import Path

import httpx

from diffing.evidence import LABELS_FILE, LatentEvidence, fit_to_limits, iter_evidence
from diffing.logs import get_logger
from jobs.label_client import LabelJobError, _post_batch, _within_endpoint_limits
from jobs.label_config import LabelConfig
from jobs.label_state import (  # noqa: F401  (re-exported: the labels file's state lives there)
    CONFIG_FILE,
    ENDPOINT_FILE,
    SETTINGS_FILE,
    LabelSettingsChanged,
    _append,
    _check_resumable,
    _read_endpoint_fingerprint,
    _write_endpoint_fingerprint,
    label_settings,
    read_labels_tolerant,
    write_atomic,
)
from serve.judge import redact_url
from serve.settings import ServiceSettings

log = get_logger("crossdiff.label")


async def _label_all(
    url: str,
    token: str | None,
    todo: list[LatentEvidence],
    cfg: LabelConfig,
    out: Path,
    calibration: list[dict],
    expect: set[tuple[str, str]] = frozenset(),
    endpoint_fp: str | None = None,
    record_fp: bool = True,
    remote: bool = True,
) -> int:
    """`expect`: (judge_model, prompt_version) of the labels already in `out` (resume); a response
    from another judge or prompt version stops the run before it appends anything. `endpoint_fp`:
    the settings fingerprint the endpoint answered with when `out` was begun (None: not known); a
    response with another one (another taxonomy or method behind the same URL) stops it too.
    `record_fp`: record the first fingerprint seen (False for a file begun without one: the current
    endpoint's would not describe its labels). `remote`: `url` is the user's endpoint, not a service
    this job started from its own config (the report then takes the taxonomy from the endpoint)."""
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    sem = asyncio.Semaphore(cfg.concurrency)
    done = 0
    t0 = time.monotonic()
    timeout = httpx.Timeout(cfg.request_timeout_s, connect=10.0)
    async with httpx.AsyncClient(base_url=url.rstrip("/"), headers=headers, timeout=timeout) as client:
        todo, calibration, size = await _within_endpoint_limits(client, todo, calibration, cfg)
        batches = [todo[i : i + size] for i in range(0, len(todo), size)]

        async def run(batch):
            nonlocal done
            nonlocal endpoint_fp
            async with sem:
                pairs = await _post_batch(client, batch, cfg, calibration)
            labels = [lab for lab, _, _ in pairs]
            got = {(lab.judge_model, lab.prompt_version) for lab in labels}
            if expect and not got <= expect:  # checked before anything is appended
                raise LabelSettingsChanged(
                    f"{out} holds labels by (judge, prompt version) {sorted(expect)} but the endpoint "
                    f"answers as {sorted(got - expect)}; resuming would mix them. Rerun with --overwrite "
                    f"to relabel every latent with this judge, or point at the judge that made them."
                )
            fps = {fp for _, fp, _ in pairs if fp}
            if len(fps) > 1:
                raise LabelSettingsChanged(
                    f"the endpoint's replicas answer with different settings fingerprints {sorted(fps)} "
                    "(another taxonomy, method or judge on some of them); labelling through it would mix "
                    f"two labellings in {out}. Deploy one configuration and rerun."
                )
            if endpoint_fp and fps - {endpoint_fp}:  # checked before anything is appended
                raise LabelSettingsChanged(
                    f"{out} holds labels made by an endpoint whose settings (taxonomy, method, judge, prompt) "
                    f"had the fingerprint {endpoint_fp}; it now answers with {sorted(fps - {endpoint_fp})}, so "
                    "resuming would mix two labellings. Rerun with --overwrite to relabel every latent with "
                    "the endpoint as it is, or restore its settings to resume."
                )
            if fps and not endpoint_fp and record_fp:
                endpoint_fp = next(iter(fps))
                _write_endpoint_fingerprint(
                    out.parent,
                    endpoint_fp,
                    url=redact_url(url),
                    judge_model=labels[0].judge_model if labels else None,
                    prompt_version=labels[0].prompt_version if labels else None,
                    taxonomy_version=pairs[0][2] if pairs else None,
                    remote=remote,
                )
            _append(out, labels)  # single-threaded event loop: appends never interleave
            done += len(labels)
            per_s = done / max(time.monotonic() - t0, 1e-9)
            log.info(
                "label.progress",
                run=str(out.parent),
                done=done,
                todo=len(todo),
                per_s=round(per_s, 2),
                eta_s=round((len(todo) - done) / max(per_s, 1e-9)),
            )

        tasks = [asyncio.ensure_future(run(b)) for b in batches]
        try:
            await asyncio.gather(*tasks)
        except BaseException:
            for t in tasks:
                t.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            raise
    return done


def calibration_set(evidence: list[LatentEvidence], cfg: LabelConfig) -> list[dict]:
    """The calibration latents sent with every request in channel mode: the first `calibration_size`
    of `calibration_group` (those with `channel_examples` top examples first, so each text is as
    long as a labelled latent's), trimmed to those top examples (all channel scoring reads)."""
    method = cfg.service.method
    if not cfg.calibration_group or method.classify_mode != "channel":
        return []
    n = method.channel_examples
    group = [e for e in evidence if e.group == cfg.calibration_group and e.top]
    chosen = sorted(group, key=lambda e: len(e.top) < n)[: cfg.calibration_size]  # stable: full ones first
    if not chosen:
        log.warning(
            "label.no_calibration",
            group=cfg.calibration_group,
            detail="no latent of this group has top examples; channel scoring uses the neutral text",
        )
    return [
        json.loads(
            e.model_copy(update={"top": e.top[:n], "quantiles": [], "negatives": []}).model_dump_json()
        )
        for e in chosen
    ]


def _selected(latents: Path) -> bool:
    """Whether an analysis selected latents to collect evidence for (True when it is missing)."""
    if not latents.exists():
        return True
    import pyarrow.parquet as pq

    groups = pq.read_table(latents, columns=["group"]).column("group").to_pylist()
    return any(g for g in groups)


def replica_settings(service: ServiceSettings) -> ServiceSettings:
    """The service settings as a local service's replicas need them: a relative taxonomy path made
    absolute here (replicas have their own working directory)."""
    if service.taxonomy and not Path(service.taxonomy).is_absolute():
        return service.model_copy(update={"taxonomy": str(Path(service.taxonomy).resolve())})
    return service


def check_endpoint(url: str | None) -> str | None:
    """An endpoint URL without http:// or https:// fails every request the same way; retrying for
    minutes and then suggesting a rerun helped no one."""
    if url is not None and not url.startswith(("http://", "https://")):
        from diffing.config import ConfigError

        raise ConfigError(f"endpoint {url!r} needs its scheme: http://{url} (or https://)")
    return url


def _check_groups(run_dir: Path, groups: tuple[str, ...] | None) -> None:
    """A group named after no model of the run (a typo) would label nothing and exit 0."""
    path = run_dir / "latents.parquet"
    if groups is None or not path.exists():
        return
    import pyarrow.parquet as pq

    from diffing.config import ConfigError

    models = [c.removeprefix("norm/") for c in pq.read_schema(path).names if c.startswith("norm/")]
    known = {f"{m}-specific" for m in models} | {"baseline"}
    if models and (unknown := sorted(set(groups) - known)):
        raise ConfigError(
            f"groups: {unknown} name no group of {run_dir}; its groups are {sorted(known)} "
            "(<model>-specific for each model, and baseline); e.g. --set 'groups=[ft-specific]'"
        )


def label_run(
    run_dir: str | Path,
    cfg: LabelConfig | dict | None = None,
    endpoint: str | None = None,
    *,
    overwrite: bool = False,
) -> dict:
    """Label every evidence item of RUN (RUN/examples/*.jsonl) into RUN/labels.jsonl; returns a summary.

    `cfg`: a LabelConfig or a dict of its fields. `endpoint`: None starts (and stops) a local
    service; else the URL of a running one (bearer token from $CROSSDIFF_API_TOKEN / cfg.token_env).
    """
    if not isinstance(cfg, LabelConfig):
        from diffing.config import ConfigError, format_validation_error

        try:
            cfg = LabelConfig.model_validate(cfg or {})
        except ValueError as e:
            raise ConfigError(format_validation_error(e)) from None
    run_dir = Path(run_dir)
    check_endpoint(endpoint)
    _check_groups(run_dir, cfg.groups)
    if not (run_dir / "examples").is_dir():
        if _selected(run_dir / "latents.parquet"):  # not analysed, or analysed without evidence
            raise FileNotFoundError(
                f"{run_dir}/examples does not exist: run `crossdiff analyze` with examples first"
            )
        # analysed, and it selected no latent (a fine-tune with no specific latent at these cuts)
        log.warning("label.nothing_to_label", run=str(run_dir), note="the analysis selected no latent")
    out = run_dir / LABELS_FILE
    if overwrite and out.exists():
        out.unlink()
    if not out.exists():  # a fresh labels file: the endpoint's settings are recorded anew
        (run_dir / ENDPOINT_FILE).unlink(missing_ok=True)
    lim = cfg.service.limits  # the local service's, or the defaults a remote one is assumed to keep
    every = [fit_to_limits(e, lim.max_examples, lim.max_window) for e in iter_evidence(run_dir)]
    evidence = [e for e in every if cfg.groups is None or e.group in cfg.groups]
    calibration = calibration_set(every, cfg)
    have = read_labels_tolerant(out)
    settings = label_settings(cfg)
    _check_resumable(run_dir, settings, have)
    # labels of older crossdiffs may lack these: then there is nothing to compare with
    expect = {(lab.judge_model, lab.prompt_version) for lab in have.values()}
    expect = set() if any("" in pair for pair in expect) else expect
    endpoint_fp = _read_endpoint_fingerprint(run_dir) if have else None
    record_fp = not have or endpoint_fp is not None  # a file begun without one stays without
    todo, seen = [], set()
    for e in evidence:  # one label per latent id: a repeated id (merged evidence files) is labelled once
        if e.latent not in have and e.latent not in seen:
            seen.add(e.latent)
            todo.append(e)
    if dups := sum(e.latent not in have for e in evidence) - len(todo):
        log.warning(
            "label.duplicate_latents", repeated=dups, note="the first evidence of each latent id is labelled"
        )
    write_atomic(run_dir / CONFIG_FILE, cfg.model_dump_json(indent=2))
    write_atomic(run_dir / SETTINGS_FILE, json.dumps(settings, indent=1, sort_keys=True))
    log.info("label.start", run=str(run_dir), total=len(evidence), done=len(have), todo=len(todo))
    if endpoint is None and (why := cfg.service.weak_judge()):
        log.warning("label.weak_judge", detail=why)
    if missing_groups := sorted(set(cfg.groups or ()) - {e.group for e in every}):
        log.warning("label.empty_groups", groups=missing_groups, have=sorted({e.group for e in every}))
    new = 0
    if todo:
        if endpoint:
            token = os.environ.get(cfg.token_env)
            new = asyncio.run(
                _label_all(endpoint, token, todo, cfg, out, calibration, expect, endpoint_fp, record_fp)
            )
        else:
            from serve.local import LocalService

            with LocalService(replica_settings(cfg.service), start_timeout_s=cfg.start_timeout_s) as svc:
                new = asyncio.run(
                    _label_all(
                        svc.url, svc.token, todo, cfg, out, calibration, expect, endpoint_fp, record_fp, False
                    )
                )
    labels = read_labels_tolerant(out)
    wanted = {e.latent for e in evidence}
    if missing := len(wanted - set(labels)):  # the stage is not done: its marker must not say so
        raise LabelJobError(
            f"{missing} of {len(wanted)} latents of {run_dir} have no label; rerun to label them"
        )
    out.touch()  # finished, also with nothing to label: the file says so (the pipeline checks it)
    cats = Counter(lab.category for k, lab in labels.items() if k in wanted)
    return {
        "run": str(run_dir),
        "labels": str(out),
        "total": len(evidence),
        "labelled_now": new,
        "skipped": len(evidence) - len(todo),
        "missing": 0,
        "categories": dict(sorted(cats.items())),
    }
