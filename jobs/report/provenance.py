"""The report's Provenance section: which models, layer and site, crosscoder, fit, judge and
software made the run, read from the files the stages left (anything absent is left out).

A report page is passed on without its run directory; without these a reader cannot tell which
checkpoints were compared, at which layer, or which judge and taxonomy named the latents.
Sources, first found wins: the store's harvest_config.json, else its manifest.json, else the
pipeline's pipeline.json (models, layer, site, revisions); crosscoder/cfg.json and run_config.json
(architecture, seed, steps; metrics.json's steps); label_settings.json, else label_config.json,
else the labels themselves (judge, prompt version, classification mode, taxonomy); the pipeline's
stage markers stages/<stage>.json and this process (jobs.provenance.environment: commit, versions).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

STAGES = ("harvest", "fit", "analyze", "label")


def _read(path: Path) -> dict[str, Any]:
    """A JSON object from a file; {} when missing or unreadable (provenance is best effort)."""
    try:
        d = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return d if isinstance(d, dict) else {}


def _roots(run: Path) -> tuple[Path, ...]:
    from jobs.compare import run_roots

    return run_roots(run)


def _store_dirs(run: Path) -> list[Path]:
    """Local directories the run's store may be at (a remote store is not read: no network here)."""
    out = []
    for f in ("analysis_config.json", "run_config.json"):
        s = _read(run / f).get("store")
        if isinstance(s, str) and s and "://" not in s:
            out += [Path(s), *(r / Path(s).name for r in _roots(run))]
    return [p for p in out if p.is_dir()]


def _harvest(run: Path) -> dict[str, Any]:
    """{models: [{name, path, revision}], layer, site} of the harvest the run's store came from."""
    for store in _store_dirs(run):
        cfg = _read(store / "harvest_config.json").get("config")
        man = _read(store / "manifest.json")
        meta = man.get("metadata") if isinstance(man.get("metadata"), dict) else {}
        h = cfg if isinstance(cfg, dict) else meta.get("harvest")
        if isinstance(h, dict):
            return _with_revisions(h, meta.get("revisions") or {})
    for root in _roots(run):
        h = _read(root / "pipeline.json").get("harvest")
        if isinstance(h, dict):
            return _with_revisions(h, {})
    return {}


def _with_revisions(h: dict[str, Any], resolved: dict[str, Any]) -> dict[str, Any]:
    models = []
    for m in h.get("models") or []:
        if isinstance(m, dict):
            rev = m.get("revision") or resolved.get(m.get("name"))
            models.append(
                {k: v for k, v in (("name", m.get("name")), ("path", m.get("path")), ("revision", rev)) if v}
            )
    return {
        k: v
        for k, v in (("models", models), ("layer", h.get("layer")), ("site", h.get("site")))
        if v not in (None, [])
    }


def _crosscoder(run: Path, metrics: dict[str, Any] | None) -> dict[str, Any]:
    rc = _read(run / "run_config.json")
    fit = rc.get("fit") if isinstance(rc.get("fit"), dict) else {}
    cfg = _read(run / "crosscoder" / "cfg.json") or (fit.get("crosscoder") or {})
    out = {k: cfg.get(k) for k in ("kind", "k", "n_latents", "d_model") if cfg.get(k) is not None}
    seed = (fit.get("train") or {}).get("seed") if isinstance(fit.get("train"), dict) else None
    if seed is not None:
        out["seed"] = seed
    steps = (metrics or {}).get("steps", rc.get("total_steps"))
    if steps is not None:
        out["steps"] = steps
    return out


def _judge(run: Path, labels: dict[int, dict]) -> dict[str, Any]:
    s = _read(run / "label_settings.json")
    cfg = _read(run / "label_config.json").get("service") or {}
    judge, method = (cfg.get("judge") or {}), (cfg.get("method") or {})
    out = {
        "model_id": s.get("service.judge.model_id", judge.get("model_id")),
        "prompt_version": s.get("prompt_version"),
        "classify_mode": s.get("service.method.classify_mode", method.get("classify_mode")),
        "taxonomy": s.get("service.taxonomy", cfg.get("taxonomy")),
        "taxonomy_fingerprint": s.get("taxonomy_fingerprint"),
    }
    for key, field in (("model_id", "judge_model"), ("prompt_version", "prompt_version")):
        seen = sorted({lab.get(field) for lab in labels.values() if lab.get(field)})
        if seen:  # what made the labels: with --endpoint the saved settings are the job's own service's
            out[key] = ", ".join(seen)
    endpoint = _read(run / "label_endpoint.json")
    if endpoint.get("remote"):  # the job's own service settings describe no judge that ran: its
        out |= {  # taxonomy as the endpoint named it, its method unknown here
            "endpoint": endpoint.get("url"),
            "taxonomy": endpoint.get("taxonomy_version"),
            "classify_mode": None,
            "taxonomy_fingerprint": None,
            "settings_fingerprint": endpoint.get("settings_fingerprint"),
        }
    return {k: v for k, v in out.items() if v}


def _software(env: dict[str, Any] | None) -> dict[str, Any]:
    """Commit and the versions that matter most, from an environment() record."""
    env = env or {}
    git, pkgs = env.get("git") or {}, env.get("packages") or {}
    out = {"commit": git.get("commit"), "dirty": git.get("dirty")}
    if not git and (where := env.get("installed_from")):  # an installed crossdiff (no checkout)
        out["commit"] = where.get("commit")
        out["installed_from"] = where.get("url") if not where.get("commit") else None
    out |= {p: pkgs.get(p) for p in ("crossdiff", "torch")}
    return {k: v for k, v in out.items() if v is not None}


def run_provenance(run: Path, metrics: dict | None, labels: dict[int, dict], report_env: dict) -> dict:
    """Everything the Provenance section shows; keys whose source is absent are left out."""
    software = {}
    for root in _roots(run):
        for stage in STAGES:
            if sw := _software(_read(root / "stages" / f"{stage}.json").get("environment")):
                software.setdefault(stage, sw)
    if sw := _software(report_env):
        software["report"] = sw
    out = {
        "harvest": _harvest(run),
        "crosscoder": _crosscoder(run, metrics),
        "judge": _judge(run, labels) if labels or (run / "label_settings.json").exists() else {},
        "software": software,
    }
    return {k: v for k, v in out.items() if v}


def rows(p: dict[str, Any]) -> list[tuple[str, str]]:
    """(field, value) lines of the section, shared by the HTML table and the Markdown list."""
    out: list[tuple[str, str]] = []
    h, cc, j = p.get("harvest") or {}, p.get("crosscoder") or {}, p.get("judge") or {}
    for m in h.get("models", []):
        rev = f" @ {m['revision']}" if m.get("revision") else ""
        out.append((f"model {m.get('name', '?')}", f"{m.get('path', '?')}{rev}"))
    if "layer" in h or "site" in h:
        out.append(("activations", ", ".join(x for x in (_kv("layer", h.get("layer")), h.get("site")) if x)))
    if arch := ", ".join(
        x
        for x in (
            cc.get("kind"),
            _kv("k", cc.get("k")),
            _kv("n_latents", cc.get("n_latents")),
            _kv("d_model", cc.get("d_model")),
            _kv("seed", cc.get("seed")),
        )
        if x
    ):
        out.append(("crosscoder", arch))
    if "steps" in cc:
        out.append(("fit", f"{cc['steps']} steps"))
    if j:
        judge = ", ".join(
            x
            for x in (
                j.get("model_id"),
                _kv("prompts", j.get("prompt_version")),
                _kv("classify_mode", j.get("classify_mode")),
            )
            if x
        )
        if judge:
            out.append(("judge", judge))
        if tax := j.get("taxonomy"):
            fp = j.get("taxonomy_fingerprint")
            out.append(("taxonomy", f"{tax}" + (f" (fingerprint {fp})" if fp else "")))
        if url := j.get("endpoint"):
            fp = j.get("settings_fingerprint")
            out.append(("labelled through", f"{url}" + (f" (settings fingerprint {fp})" if fp else "")))
    for stage, sw in (p.get("software") or {}).items():
        out.append((f"software ({stage})", _sw(sw)))
    return out


def _kv(k: str, v: Any) -> str:
    return f"{k} {v}" if v is not None and v != "" else ""


def _sw(sw: dict[str, Any]) -> str:
    parts = []
    if c := sw.get("commit"):
        parts.append(f"commit {c}" + (" (uncommitted changes)" if sw.get("dirty") else ""))
    if u := sw.get("installed_from"):
        parts.append(f"installed from {u}")
    parts += [f"{p} {sw[p]}" for p in ("crossdiff", "torch") if sw.get(p)]
    return ", ".join(parts)
