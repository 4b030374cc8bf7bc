"""What names each pipeline stage's outputs (the stage hash in RUN/stages/<stage>.json): its
config minus how it runs, chained with the stages before it by jobs.pipeline.Pipeline.stage_config.
`legacy` gives the identity before 2026-12-06, still accepted so runs finished then are not redone."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from diffing.harvest import unpinned_as_before
from jobs.pipeline_config import PipelineConfig, _label_identity
from serve.taxonomy import load_taxonomy


def stage_own(
    cfg: PipelineConfig,
    stage: str,
    legacy: bool = False,
    raw_paths: bool = False,
    raw_store: bool = False,
    fit_workers: bool = True,
) -> Any:
    """What decides a stage's outputs: its config minus how it runs (harvest actors, logging,
    request limits) and the run's own location. `legacy`: the identity before 2026-12-06, still
    accepted so runs finished then are not redone; `raw_paths`: a corpus inside the run named as
    typed (the identity until the seventh session of 2026-12-06), likewise accepted; `raw_store`: a
    remote run's default store named as typed (its identity until the eighth session), likewise;
    `fit_workers` False: a Ray Train fit's DDP settings left out (the identity until 2026-12-07's
    eleventh session), accepted only where the run's run_config.json shows the same ones."""
    c = cfg
    if legacy:
        legacy_harvest = c.harvest.model_dump(mode="json", exclude={"ray", "device"})
        legacy_harvest["models"] = [unpinned_as_before(m) for m in legacy_harvest["models"]]
        return {
            "harvest": legacy_harvest,
            "fit": c.fit.model_dump(mode="json", exclude={"distributed"}),
            "analyze": {
                # fields added since (tokenizer, source_mass) were not in it
                "analyze": c.analyze.model_dump(mode="json", exclude={"device", "tokenizer", "source_mass"}),
                "pairs": c.pairs,
            },
            "label": {
                **_label_identity(c.label),
                "taxonomy": load_taxonomy(c.label.service.taxonomy).fingerprint,
            },
            "report": report_identity(cfg),
        }[stage]
    if stage == "harvest":
        h = c.harvest.model_dump(mode="json", exclude={"ray", "device"})
        h["models"] = [unpinned_as_before(m) for m in h["models"]]
        if not c.remote and h["store"] == str(Path(c.out) / "store"):
            h["store"] = "OUT/store"  # the default: the same run moved or named relatively
        if c.remote and not (raw_paths or raw_store) and h["store"] == c.out.rstrip("/") + "/store":
            h["store"] = "OUT/store"  # likewise a bucket's run copied to another prefix or bucket
        if not raw_paths and (inside := _inside_out(c, h["corpus"]["uri"])) is not None:
            h["corpus"]["uri"] = (
                f"OUT/{inside}"  # the presets' corpus lives in the run (its content is stamped)
            )
        return h
    if stage == "fit":
        from diffing.fit_identity import effective_distributed

        own = c.fit.model_dump(
            mode="json",
            exclude={"distributed": True, "train": {"log_every", "checkpoint_every", "device"}},
        )
        if fit_workers and (d := effective_distributed(c.fit)) is not None:
            own["distributed"] = d  # DDP workers decide which rows each rank sees (in-process: as before)
            del own["train"]["shuffle_buffer_rows"]  # the in-process reader's; Ray Train has its own
        return own
    if stage == "analyze":
        from diffing.analysis import _OPERATIONAL

        return {"analyze": c.analyze.model_dump(mode="json", exclude=_OPERATIONAL), "pairs": c.pairs}
    if stage == "label":
        from jobs.label import label_settings

        return {**label_settings(c.label), "groups": list(c.label.groups or [])}
    return report_identity(cfg)


def _inside_out(cfg: PipelineConfig, uri: str) -> str | None:
    """`uri` relative to the run's `out`, when it lies inside it; else None."""
    from jobs.rundir import is_remote

    if cfg.remote or is_remote(uri):
        root = cfg.out.rstrip("/") + "/"
        return uri[len(root) :] if cfg.remote and uri.startswith(root) else None
    try:
        return Path(uri).relative_to(Path(cfg.out)).as_posix()
    except ValueError:
        return None


def report_identity(cfg: PipelineConfig) -> dict:
    """The report's settings count only where they differ from the defaults, so reports made
    before they existed stay done (also under the legacy identity)."""
    from jobs.report.config import ReportConfig

    c = cfg
    own = {"planted": c.planted, "anchored": c.anchored}
    if c.report != ReportConfig():
        own["report"] = c.report.model_dump(mode="json")
    return own


def _flat(d: Any, prefix: str = "") -> dict[str, Any]:
    if not isinstance(d, dict) or not d:
        return {prefix.rstrip("."): d}
    out: dict[str, Any] = {}
    for k, v in d.items():
        out.update(_flat(v, f"{prefix}{k}."))
    return out


def changed_fields(saved: Path, cfg: PipelineConfig, stage: str) -> str:
    """ " (fit.train.lr: 0.0005 -> 0.01)": what differs in the stage's identity (or, where its own
    settings are the same, in the first earlier stage's) between the run's pipeline.json, the
    config of the call that made its outputs, and ``cfg``; "" where that file cannot be read, and
    a note that nothing in the config differs where its settings are the same."""
    import json

    from jobs.pipeline_config import STAGES

    try:
        old = PipelineConfig.model_validate(json.loads(saved.read_text()))
    except (OSError, ValueError):
        return ""
    for s in [stage, *STAGES[: STAGES.index(stage)]]:
        try:
            was, now = _flat(stage_own(old, s)), _flat(stage_own(cfg, s))
        except Exception:  # noqa: BLE001 - a taxonomy no longer readable, say: name nothing
            return ""
        keys = sorted(k for k in was.keys() | now.keys() if was.get(k) != now.get(k))
        if keys:
            name = {k: k if k.startswith(f"{s}.") else f"{s}.{k}" for k in keys}  # analyze's own nests
            shown = "; ".join(
                f"{name[k]}: {json.dumps(was.get(k))} -> {json.dumps(now.get(k))}" for k in keys[:5]
            )
            more = f"; and {len(keys) - 5} more" if len(keys) > 5 else ""
            return f" ({'an earlier stage: ' if s != stage else ''}{shown}{more})"[:800]
    return (
        " (no setting differs from the run's pipeline.json: what changed is outside the config, such as "
        "the contents of a file it names (a taxonomy), or how this version of crossdiff reads a setting "
        "(`~` in a path, say))"
    )
