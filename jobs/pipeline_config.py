"""The pipeline config (`crossdiff pipeline --config`): one section per stage, composed and
validated here, plus the loader that applies a preset or file, `--out` and `--set` overrides, and the
generated reference in docs/configuration.md. The runner lives in jobs/pipeline.py."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import fsspec
from pydantic import Field, model_validator

from diffing.config import AnalysisConfig, FitConfig, Frozen, PathOrURL
from diffing.harvest import HarvestConfig
from jobs.label import LabelConfig
from jobs.report.config import ReportConfig
from jobs.rundir import default_work_dir, is_remote, join, ray_train_storage_problem

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


class TaskPlacement(Frozen):
    """Where a stage runs when the pipeline's driver (on a cluster: the head pod) is the wrong place."""

    num_gpus: float = Field(
        1.0,
        ge=0.0,
        description="GPUs the task holds; under `analyze.device: auto` the analysis runs on cuda.",
    )
    num_cpus: float = Field(1.0, ge=0.0, description="CPUs the task holds.")
    memory_gb: float | None = Field(
        None, gt=0.0, description="Host memory the task reserves, in GiB (Ray `memory`); None reserves none."
    )
    accelerator_type: str | None = Field(
        None, description="Ray accelerator type the node must have (e.g. H100, A100-80G); None: any."
    )


class PipelineConfig(Frozen):
    out: PathOrURL = Field(
        description="Run directory: a local path, or an object-storage URL (s3://, gs://) whose stages "
        "work in a local copy (`work_dir`) uploaded stage by stage; a remote run resumes on any machine."
    )
    work_dir: PathOrURL | None = Field(
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
    harvest: HarvestConfig = Field(
        description="Harvest stage; `store` defaults to OUT/store. Where `stages` leave the harvest out, "
        "`{store: S}` alone will do: models, layer and corpus are read from the store S."
    )
    fit: FitConfig = Field(default_factory=FitConfig, description="Crosscoder fit stage.")
    analyze: AnalysisConfig = Field(default_factory=AnalysisConfig, description="Analysis stage.")
    analyze_task: TaskPlacement | None = Field(
        None,
        description="Run the analyze stage as one Ray task holding these resources, e.g. {num_gpus: 1} "
        "(the driver of a cluster job sits on the head pod, which has no GPU; the Gemma-2-9b shape "
        "needs one). The task works on the run through `out`: a remote out is copied to "
        "$CROSSDIFF_CACHE on the task's node; a local out must be on a filesystem that node sees. "
        "None: in the driver process.",
    )
    label: LabelConfig = Field(
        default_factory=LabelConfig, description="Label stage (see docs/labelling.md)."
    )
    report: ReportConfig = Field(
        default_factory=ReportConfig,
        description="Report stage: cards shown, and the category shift's confidence intervals.",
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
        if (
            "fit" in self.stages
            and self.fit.distributed.workers
            and (problem := ray_train_storage_problem(self.out))
        ):
            raise ValueError(f"out: {problem} (fit.distributed.workers={self.fit.distributed.workers})")
        names = [m.name for m in self.harvest.models]
        if self.pair is not None and (any(p not in names for p in self.pair) or self.pair[0] == self.pair[1]):
            raise ValueError(f"pair={list(self.pair)} must name two different harvested models {names}")
        for p in self.comparisons or ():
            if any(m not in names for m in p) or p[0] == p[1]:
                raise ValueError(f"comparisons: {list(p)} must be two different harvested models {names}")
        if self.comparisons and self.pair is not None:  # `pairs` reads comparisons: pair would go unused
            raise ValueError(
                f"pair={list(self.pair)} and comparisons={[list(p) for p in self.comparisons]} are both set; "
                "set one (add the pair to comparisons to analyse it too)"
            )
        if self.anchored is not None:
            s_model, i_model = self.anchored
            if s_model == i_model:
                raise ValueError(f"anchored={list(self.anchored)}: S and I must be two different models")
            if not self.comparisons:
                raise ValueError(
                    f"anchored={list(self.anchored)} needs `comparisons` with a pair for each, e.g. "
                    f"[[BASE, {s_model}], [BASE, {i_model}]] (`pair` names a single comparison)"
                )
            bs = [p[1] for p in self.comparisons]
            for m in self.anchored:
                if bs.count(m) != 1:
                    raise ValueError(
                        f"anchored={list(self.anchored)}: {m!r} must be the B (second model) of exactly one "
                        f"of the comparisons {[list(p) for p in self.comparisons]}, found {bs.count(m)}"
                    )
            base_of = {b: a for a, b in self.comparisons}
            if base_of[s_model] != base_of[i_model]:  # Δ_c compares two fine-tunes against one base
                raise ValueError(
                    f"anchored={list(self.anchored)}: S and I must come from comparisons with the same base A, "
                    f"got [{base_of[s_model]}, {s_model}] and [{base_of[i_model]}, {i_model}]; e.g. "
                    f"comparisons: [[{base_of[i_model]}, {s_model}], [{base_of[i_model]}, {i_model}]]"
                )
        if "label" in self.stages and not self.analyze.evidence:  # the judge reads nothing else
            raise ValueError(
                "analyze.evidence: false leaves the label stage no examples to read; set analyze.evidence: "
                "true, or leave label (and report's labels) out of stages"
            )
        if self.work_dir is not None and not is_remote(self.out):
            raise ValueError(f"work_dir is only for a remote out (s3://, gs://); out={self.out} is local")
        if self.label.groups is not None:  # a group named after no model would go unlabelled, silently
            known = {f"{m}-specific" for p in self.pairs for m in p} | {"baseline"}
            if unknown := sorted(set(self.label.groups) - known):
                raise ValueError(
                    f"label.groups: {unknown} name no group of this run; its groups are {sorted(known)} "
                    "(<model>-specific for each model of a compared pair, and baseline)"
                )
            need = [f"{m}-specific" for m in self.anchored or ()]
            if missing := [g for g in need if g not in self.label.groups]:  # the section could never fill
                raise ValueError(
                    f"label.groups leaves out {missing}, which the anchored shift {list(self.anchored)} "
                    f"compares; add them to label.groups"
                )
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


def with_defaults(data: dict[str, Any], *, stand_in: bool = False) -> dict[str, Any]:
    """Fill derived defaults in a raw config dict before validation (harvest.store = OUT/store; a
    pipeline without its harvest stage: the harvest fields read from its store). `stand_in`: where
    that store cannot be read here (a submitting machine), stand-ins named after the models the
    config compares, so that the rest of the config is still checked."""
    data = json.loads(json.dumps(data))
    out = data.get("out")
    h = data.get("harvest")
    if out and isinstance(h, dict) and not h.get("store"):
        h["store"] = join(out, "store") if is_remote(out) else str(Path(out) / "store")
    try:
        _fill_from_store(data)
    except StoreUnreadable:
        if not stand_in:
            raise
        _stand_in(data)
    return data


def _stand_in(data: dict[str, Any]) -> None:
    """Placeholder harvest fields named after the models `pair`, `comparisons`, `anchored` and
    `label.groups` mention (at least two)."""
    names: list[str] = []
    for pair in [data.get("pair") or [], *(data.get("comparisons") or []), data.get("anchored") or []]:
        names += [n for n in pair if isinstance(n, str)]
    label = data.get("label") if isinstance(data.get("label"), dict) else {}
    groups = label.get("groups") or []
    names += [g.removesuffix("-specific") for g in groups if isinstance(g, str) and g.endswith("-specific")]
    names = list(dict.fromkeys(names))
    names += [n for n in ("A", "B") if n not in names][: max(0, 2 - len(names))]
    h = data["harvest"]
    h.setdefault("models", [{"name": n, "path": FROM_STORE} for n in names])
    h.setdefault("layer", 0)
    h.setdefault("corpus", {"uri": FROM_STORE})


# what stands for the model paths and the corpus of activations crossdiff did not harvest: the same
# however the store is spelled (the stages' identities hold these fields)
FROM_STORE = "(activations in harvest.store)"


class StoreUnreadable(ValueError):
    """`harvest: {store: S}` without the harvest stage, and neither S nor the run's pipeline.json
    says what the store holds."""


def _fill_from_store(data: dict[str, Any]) -> None:
    """A pipeline over a store it does not harvest (`stages` without harvest; your own activations,
    another run's store) needs only `harvest.store`: the harvest fields the config requires but no
    later stage reads (models, layer, corpus) come from the store, given ones win. A crossdiff
    harvest's store holds its config; a `write_arrays` store gives its model names and the layer it
    was written with (model paths and corpus: FROM_STORE). A store deleted since (after fit and
    analyze, to save space) is stood in for by the run's own pipeline.json."""
    h, stages = data.get("harvest"), data.get("stages")
    if not isinstance(h, dict) or not h.get("store") or not isinstance(stages, (list, tuple)):
        return
    need = [k for k in ("models", "layer", "corpus") if k not in h]
    if "harvest" in stages or not need:
        return
    store = str(h["store"])
    try:
        fills = _store_fills(store)
    except Exception as e:  # noqa: BLE001 - missing, no credentials here, not a store: say which field
        fills = _saved_fills(data.get("out"), store)
        if fills is None:
            raise StoreUnreadable(
                f"harvest.{need[0]}: not given, and a pipeline without its harvest stage reads it from "
                f"harvest.store {store}, which failed ({type(e).__name__}: {e}); give harvest.models, "
                "harvest.layer and harvest.corpus, or point harvest.store at the store"
            ) from None
    if "layer" in need and fills.get("layer") is None:
        raise ValueError(
            f"harvest.layer: not given, and the store {store} does not record its layer; set harvest.layer "
            "(the run's provenance shows it), or write the store with write_arrays(..., layer=L)"
        )
    h.update({k: fills[k] for k in need})


def _store_fills(store: str) -> dict[str, Any]:
    """models, layer and corpus from the store: its harvest config where it holds one (each field
    on its own, only the fields this crossdiff knows), else its model names and layer."""
    from diffing.corpus import CorpusSpec
    from diffing.harvest import ModelSpec
    from diffing.store import open_store

    manifest = open_store(store).manifest
    made = manifest.metadata.get("harvest")
    made = made if isinstance(made, dict) else {}
    fills: dict[str, Any] = {
        "models": [{"name": n, "path": FROM_STORE} for n in manifest.model_names],
        "layer": manifest.layer,
        "corpus": {"uri": FROM_STORE},
    }
    models = made.get("models")
    if isinstance(models, list) and [m.get("name") for m in models if isinstance(m, dict)] == list(
        manifest.model_names
    ):
        fills["models"] = [{k: v for k, v in m.items() if k in ModelSpec.model_fields} for m in models]
    if isinstance(made.get("layer"), int):
        fills["layer"] = made["layer"]
    if isinstance(made.get("corpus"), dict) and made["corpus"].get("uri"):
        fills["corpus"] = {k: v for k, v in made["corpus"].items() if k in CorpusSpec.model_fields}
    return fills


def _saved_fills(out: Any, store: str) -> dict[str, Any] | None:
    """The harvest fields of the run's own pipeline.json, if it names the same store."""
    if not out:
        return None
    try:
        fs, path = fsspec.core.url_to_fs(join(str(out), "pipeline.json"))
        saved = json.loads(fs.cat_file(path)).get("harvest") or {}
    except Exception:  # noqa: BLE001 - no run yet, or not readable here
        return None
    if saved.get("store") != store or not all(k in saved for k in ("models", "layer", "corpus")):
        return None
    return {k: saved[k] for k in ("models", "layer", "corpus")}


def load_pipeline_config(
    config: str | Path | None = None,
    *,
    preset: str | None = None,
    out: str | None = None,
    overrides: list[str] | tuple[str, ...] = (),
) -> PipelineConfig:
    """A preset or a YAML/JSON file, then `--out` and `--set` overrides, then validation."""
    from diffing.config import (
        ConfigError,
        expand_home,
        format_validation_error,
        read_config_file,
        validate_with_overrides,
    )

    if (config is None) == (preset is None):
        raise ConfigError("give exactly one of --config FILE or --preset NAME")
    out = expand_home(out)  # a preset writes its inputs under it before the config is validated
    if preset is not None:
        if out is None:
            raise ConfigError(f"--preset {preset} needs --out RUN (where the run goes)")
        from diffing.config_io import unknown_override_keys

        if bad := unknown_override_keys(PipelineConfig, overrides):  # before the preset builds models
            raise ConfigError(
                f"invalid config:\n  {', '.join(bad)}: unknown field; check the spelling (see docs/configuration.md)"
            )
        from jobs.presets import preset as make_preset

        data = make_preset(preset, out)
    else:
        data = read_config_file(config)
    if out is not None:
        data["out"] = str(out)
    try:
        return validate_with_overrides(
            lambda d: PipelineConfig.model_validate(with_defaults(d)), data, list(overrides)
        )
    except ValueError as e:
        raise ConfigError(format_validation_error(e) + _stage_hint(data)) from None


def _stage_hint(data: Any) -> str:
    """A stage's own config given to `crossdiff pipeline`: say where its fields go."""
    if not isinstance(data, dict) or "harvest" in data:
        return ""
    keys = set(data) - {"out"}
    for name, field in PipelineConfig.model_fields.items():
        sub = getattr(field.annotation, "model_fields", None)
        if sub and keys and keys <= set(sub):
            return (
                f"\n(this looks like a `{name}` stage config: a pipeline config nests it under `{name}:` "
                "beside the other stages, e.g. jobs/configs/gemma2-9b-pt-it-simpo.pipeline.yaml; or run "
                f"`crossdiff {name} --config` with it)"
            )
    return ""


def reference() -> str:
    """docs/configuration.md: every field of the pipeline config; each stage command
    (`crossdiff harvest|fit|analyze|label --config`) takes its section alone."""
    from diffing.config import config_reference

    note = (
        "The pipeline config nests one section per stage. Stage commands take a section alone: "
        "`crossdiff fit --config F` reads the fields listed under `fit.` without that prefix "
        "(`crosscoder.k`, `train.lr`, ...), and so do `harvest`, `analyze`, `label` and `report`, and "
        "`crossdiff serve` reads `label.service`. Relative "
        "paths (`out`, `harvest.store`, `harvest.corpus.uri`, model paths, `label.service.taxonomy`) "
        "are resolved against the directory crossdiff runs in, not the config file's (one that exists "
        "only next to the config file is named in a `config.relative_path` warning); on a cluster "
        "job that is the job's working directory, so give absolute or object-storage paths there. "
        "A pipeline whose `stages` leave the harvest out needs only `harvest.store`: the harvest's "
        "required `models`, `layer` and `corpus` are then read from that store."
    )
    text = config_reference({"pipeline": PipelineConfig})
    head, _, rest = text.partition("## `pipeline`")
    return f"{head}{note}\n\n## `pipeline`{rest}"
