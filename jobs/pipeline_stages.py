"""What each pipeline stage calls (harvest, fit, analyze, label, report), as methods of
jobs.pipeline.Pipeline: the orchestration (markers, identities, resume, sync) lives there, the
stages' own wiring here."""

from __future__ import annotations

from contextlib import nullcontext
from pathlib import Path


def check_crosscoder_fits(cfg) -> None:
    """Before a harvest the fit will follow: the crosscoder resolved with the models' width, so a
    setting it refuses (k above n_latents, say) fails now, not after hours of harvest. Models whose
    config cannot be read here are left to the harvest's own checks."""
    from transformers import AutoConfig

    widths = set()
    for m in cfg.harvest.models:
        try:
            mc = AutoConfig.from_pretrained(
                m.path,
                trust_remote_code=m.trust_remote_code,
                local_files_only=True,  # a directory or the hub cache: no network wait before the harvest
                **({"revision": m.revision} if m.revision else {}),
            )
        except Exception:  # noqa: BLE001 - not built yet (a preset), not reachable: the harvest says
            return
        widths.add(getattr(mc, "text_config", mc).hidden_size)
    if len(widths) != 1:
        return  # the harvest's preflight names it
    names = tuple(m.name for m in cfg.harvest.models)
    try:
        cfg.fit.crosscoder.resolve(n_models=len(names), d_model=widths.pop(), model_names=names)
    except ValueError as e:
        raise ValueError(f"fit: {e}; found before the harvest, nothing was run") from None


def _check_store_models(cfg) -> None:
    """A store the run did not harvest (your own activations, another run's) must hold the models
    `harvest.models` names, in its order: the fit takes the store's names and the analysis the
    config's, so a mismatch failed only after the fit."""
    from diffing.store import StoreError, open_store

    try:
        have = open_store(cfg.harvest.store).model_names
    except StoreError:
        return  # no finished store: store_gone or the harvest says
    want = [m.name for m in cfg.harvest.models]
    if list(have) != want:
        raise ValueError(
            f"harvest.store {cfg.harvest.store} holds the models {list(have)} but harvest.models names {want}; "
            "name the models as the store does, in its order (nothing was run)"
        )


def preflight(p, to_run: list[str], overwrite: bool) -> None:
    """Pipeline `p`'s refusals before anything is written (a fit or analysis without its data, a
    crosscoder the models cannot take, an unreadable taxonomy), and which weights a remote run's
    mirror brings down for the stages `to_run`."""
    from jobs.rundir import WEIGHTS, RunMirror
    from jobs.stage_outputs import store_gone

    if why := store_gone(p, to_run):  # fit or analyze would run without their data
        raise ValueError(why)
    if "harvest" not in to_run and {"fit", "analyze"} & set(to_run):
        _check_store_models(p.cfg)
    if "harvest" in to_run and "fit" in to_run:
        check_crosscoder_fits(p.cfg)
    if "label" in to_run and p.cfg.label.service.taxonomy:  # before hours of harvest and fit
        from serve.taxonomy import load_taxonomy

        load_taxonomy(p.cfg.label.service.taxonomy)
    if p.mirror is not None:
        # an in-process fit writes the weights here, analyze in this process reads them: sync
        # those too (a Ray Train fit writes the bucket; a placed analysis copies them to its node)
        if ("fit" in to_run and p.cfg.fit.distributed.workers == 0) or (
            "analyze" in to_run and p.cfg.analyze_task is None
        ):
            p.mirror = RunMirror(p.cfg.out, p.run, guard=p.mirror.guard)
            if not (overwrite and "fit" in to_run):  # a refit from scratch never reads the old ones
                p.mirror.pull()
        else:  # label and report read the analysis: a Gemma-sized crosscoder stays in the bucket
            p.log.info("pipeline.weights_left_remote", stages=to_run, skipped=list(WEIGHTS))


class StageRunners:
    """Mixed into Pipeline: each `_<stage>(overwrite)` runs one stage and returns its summary."""

    def _harvest(self, overwrite: bool) -> dict:
        from jobs.harvest import run_harvest

        m = run_harvest(
            self.cfg.harvest, overwrite=overwrite, address=self.address, on_cleared=self._on_cleared
        )
        from diffing.fit_identity import manifest_fingerprint

        # the content's fingerprint: a store shared with another run and redone there since is
        # refused before this run fits or analyses it (jobs.stage_outputs.store_gone)
        return {
            "store": self.cfg.harvest.store,
            "rows": m.n_rows,
            "shards": len(m.shards),
            "fingerprint": manifest_fingerprint(m),
        }

    def _fit(self, overwrite: bool) -> dict:
        from jobs.fit import in_process_or_ray

        # a Ray Train fit of a remote run checkpoints to the remote itself (shared by every node) and
        # is copied down for an analysis in this process (not for a placed one: the mirror skips the
        # weights then); an in-process fit writes the local copy, pushed after the stage
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
        from jobs.analyze_task import analyze_in_task, analyze_pairs

        if self.cfg.analyze_task is not None:  # on a node with the resources, e.g. a GPU worker
            if self.mirror is not None:  # the task starts from the bucket: it holds all this copy has
                self.mirror.push()
            # a redo was cleared before this stage started (clear_stage), so the task resumes, also
            # when Ray retries it after a lost node, instead of clearing what an attempt uploaded
            out = analyze_in_task(self.cfg, self.run, overwrite=False, address=self.address)
            if self.mirror is not None:  # the task uploaded its outputs: label and report read them here
                self.mirror.pull()
        else:
            out = analyze_pairs(
                self.run, self.cfg, self.cfg.harvest.store, overwrite=overwrite, address=self.address
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
            from jobs.label import replica_settings
            from serve.local import LocalService

            svc_ctx = LocalService(replica_settings(cfg.service), start_timeout_s=cfg.start_timeout_s)
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

                sections.append(planted_section(d, self.cfg.planted, pair, opts=self.cfg.report))
            if self.cfg.anchored:
                from jobs.compare import anchored_section

                sections.append(anchored_section(by_b, *self.cfg.anchored, opts=self.cfg.report))
            out["-vs-".join(pair)] = write_report(d, extra_sections=sections, opts=self.cfg.report)
        if len(dirs) > 1:  # RUN/report.* = the report of the anchored S comparison (or the first)
            main = by_b[self.cfg.anchored[0]] if self.cfg.anchored else next(iter(dirs.values()))
            for name in (REPORT_HTML, REPORT_JSON, REPORT_MD):
                shutil.copyfile(main / name, self.run / name)
        return out if len(out) > 1 else next(iter(out.values()))
