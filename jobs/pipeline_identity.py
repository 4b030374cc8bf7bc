"""Mixed into jobs.pipeline.Pipeline: a stage's identity (its config hash chained with the earlier
stages', and the older spellings still accepted), and whether the marker a run holds was written
for another config, corpus version or model contents."""

from __future__ import annotations

import hashlib
import json
from typing import Any

from jobs.pipeline_config import STAGES
from jobs.stage_identity import stage_own


def _hash(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:16]


class StageIdentity:
    """Needs `cfg` (PipelineConfig) and `run` (the local run directory)."""

    def stage_config(
        self,
        stage: str,
        legacy: bool = False,
        raw_paths: bool = False,
        raw_store: bool = False,
        fit_workers: bool = True,
    ) -> Any:
        own = stage_own(self.cfg, stage, legacy, raw_paths, raw_store, fit_workers)
        i = STAGES.index(stage)
        up = self.stage_config(STAGES[i - 1], legacy, raw_paths, raw_store, fit_workers)["hash"] if i else ""
        return {"own": own, "hash": _hash([own, up])}

    def _hashes(self, stage: str) -> tuple[str, ...]:
        """The identity written, then the older ones still accepted (see jobs/stage_identity.py)."""
        kws: list[dict] = [{}, {"raw_store": True}, {"raw_paths": True}, {"legacy": True}]
        if (
            STAGES.index(stage) >= STAGES.index("fit")
            and self.cfg.fit.distributed.workers > 0
            and self._fit_ddp_changed() is False
        ):  # a Ray Train fit marked before its DDP settings counted, made with today's ones
            kws += [kw | {"fit_workers": False} for kw in kws[:3]]
        return tuple(self.stage_config(stage, **kw)["hash"] for kw in kws)

    def _fit_ddp_changed(self) -> bool | None:
        """Whether the finished fit's run_config.json shows other DDP settings than this config's
        (None: nothing to read, so nothing to compare: a stamp-less fit's marker hash decides)."""
        from diffing.fit_identity import fit_changes

        try:
            old = json.loads((self.run / "run_config.json").read_text())
        except (OSError, ValueError):
            return None
        return any(c.startswith("distributed.") for c in fit_changes(old, self.cfg.fit, None))

    def _config_changed(self, stage: str, saved: dict) -> bool:
        """The marker was written for another config (or corpus, or a fit with other DDP settings
        under an identity that did not name them)."""
        return (
            saved.get("hash") not in self._hashes(stage)
            or self._corpus_changed(stage, saved)
            or (stage == "fit" and self._fit_ddp_changed() is True)
            or (stage == "harvest" and bool(self._models_changed()))
        )

    def _models_changed(self) -> list[str]:
        """The local model directories rewritten since the store's shards were computed from them
        (read once per pipeline call; a store without the record, or none yet, says nothing)."""
        if not hasattr(self, "_models_now"):
            from diffing.store import open_store
            from jobs.harvest_shards import models_changed

            try:
                meta = open_store(self.cfg.harvest.store).manifest.metadata
            except Exception:  # no finished store (yet): the harvest's own outputs decide
                meta = None
            self._models_now = models_changed(meta, self.cfg.harvest.models)
        return self._models_now

    def _corpus_changed(self, stage: str, saved: dict) -> bool:
        """The harvest's corpus file is not the one it read (prompts appended or edited in place;
        its URI, all the config names, is the same). Markers from before the stamp say nothing."""
        if stage != "harvest" or not saved.get("corpus"):
            return False
        now = self._corpus_stamp()
        return now is not None and now != saved["corpus"]

    def _corpus_stamp(self) -> str | None:
        """The corpus's version, read once per pipeline call (hashing a large local corpus)."""
        if not hasattr(self, "_corpus_version"):
            from jobs.stamps import corpus_stamp

            self._corpus_version = corpus_stamp(self.cfg.harvest.corpus.uri, self.cfg.harvest.corpus.format)
        return self._corpus_version

    def _exacts(self, stage: str) -> tuple[str, ...]:
        """What the fit's checkpoints resume under: the fit's own checkpoint hash (workers included
        for a Ray Train fit; not logging, checkpoint interval or device), although a finished fit
        stands for any of those; then the older spellings a running marker may hold (the whole
        config, before 2026-12-06). The first is written."""
        if stage != "fit":
            return ("",)
        from diffing.fit_identity import accepted_hashes

        fit = self.cfg.fit
        return (
            *accepted_hashes(fit, distributed=fit.distributed.workers > 0),
            _hash(fit.model_dump(mode="json")),
        )

    def _exact(self, stage: str) -> str:
        return self._exacts(stage)[0]
