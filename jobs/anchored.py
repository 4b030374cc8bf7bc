"""`crossdiff anchored`: the anchored category shift between two runs.

The paper's route with two pairwise crosscoders: (pt, SimPO) and (pt, it) harvested, fitted, analysed
and labelled as two runs, then SimPO-specific latents of the first against it-specific latents of the
second (jobs/compare.py has the statistic; a pipeline with `comparisons` and `anchored` makes the same
section over one N-model crosscoder). The two runs must describe one base, at one site, labelled by
one judge with one taxonomy; what cannot be checked is said in the output's `warnings`.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from diffing.logs import get_logger

OUT_FILES = ("anchored.json", "anchored.md", "anchored.html")


class AnchoredError(ValueError):
    """Two runs whose specific latents cannot be compared (the message names the fix)."""


def run_pair(run: Path) -> tuple[str, str]:
    """(A, B) of a pairwise analysis, from its latents.parquet."""
    import pyarrow.parquet as pq

    path = run / "latents.parquet"
    if not path.exists():
        raise AnchoredError(f"{run} has no latents.parquet; analyse and label it first (`crossdiff analyze`)")
    meta = pq.read_schema(path).metadata or {}
    pair = meta.get(b"pair", b"").decode().split(",")
    if len(pair) != 2 or not all(pair):
        raise AnchoredError(
            f"{path} does not record its pair (written by an older crossdiff); redo its analysis"
        )
    return pair[0], pair[1]


def _json(path: Path) -> dict | None:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def _harvest(run: Path) -> dict | None:
    """The harvest config the run's store was written with (its manifest), else the one a pipeline
    run saved (the store may be deleted to save space); None where neither can be read."""
    import fsspec

    store = (_json(run / "analysis_config.json") or {}).get("store")
    try:
        with fsspec.open(f"{str(store).rstrip('/')}/manifest.json", "r") as f:
            manifest = json.load(f)
        harvest = (manifest.get("metadata") or {}).get("harvest")
        return harvest or {"layer": manifest.get("layer"), "site": manifest.get("site")}
    except (OSError, ValueError, TypeError, ImportError):  # no store, no access, or no fsspec backend
        pass
    from jobs.compare import run_roots

    for root in run_roots(run):
        harvest = (_json(root / "pipeline.json") or {}).get("harvest")
        if isinstance(harvest, dict):
            return harvest
    return None


def _corpus_sha256(run: Path) -> str | None:
    """The content hash of the corpus the run's store was harvested from (its harvest_config.json),
    whatever file it was read from; None where the store cannot be read."""
    import fsspec

    store = (_json(run / "analysis_config.json") or {}).get("store")
    try:
        with fsspec.open(f"{str(store).rstrip('/')}/harvest_config.json", "r") as f:
            return json.load(f).get("records_sha256")
    except (OSError, ValueError, TypeError, ImportError, AttributeError):
        return None


def check_comparable(s_run: Path, i_run: Path) -> list[str]:
    """Refuse two runs that do not share the base, the site or the labelling; returns warnings for
    what could not be checked or differs without making the comparison wrong."""
    if Path(s_run).resolve() == Path(i_run).resolve():
        raise AnchoredError(
            f"--s and --i name the same run ({s_run}): the anchored shift compares two fine-tunes' runs"
        )
    (sa, sb), (ia, ib) = run_pair(s_run), run_pair(i_run)
    warnings: list[str] = []
    hs, hi = _harvest(s_run), _harvest(i_run)
    if hs is None or hi is None:
        warnings.append("a run's store manifest could not be read: the shared base and site are unchecked")
    else:
        for key in ("layer", "site"):
            if hs.get(key) != hi.get(key):
                raise AnchoredError(
                    f"the runs read different {key}s ({s_run}: {hs.get(key)}, {i_run}: {hi.get(key)}); "
                    "the anchored shift compares latents of one site"
                )
        paths = [{m.get("name"): m.get("path") for m in h.get("models") or []} for h in (hs, hi)]
        base_s, base_i = paths[0].get(sa), paths[1].get(ia)
        if base_s is None or base_i is None:
            warnings.append("a run's manifest does not name its base model: the shared base is unchecked")
        elif base_s != base_i:
            raise AnchoredError(
                f"the two runs have different bases: {sa}={base_s} in {s_run}, {ia}={base_i} in {i_run}; the "
                "anchored shift compares two fine-tunes of one base (harvest both against the same base path)"
            )
        revs = [{m.get("name"): m.get("revision") for m in h.get("models") or []} for h in (hs, hi)]
        if paths[0].get(sb) is not None and (paths[0].get(sb), revs[0].get(sb)) == (
            paths[1].get(ib),
            revs[1].get(ib),
        ):
            raise AnchoredError(
                f"both runs diff the same fine-tune ({paths[0][sb]}) against the base: the anchored shift "
                "compares two different fine-tunes of one base"
            )
        stamps = _corpus_sha256(s_run), _corpus_sha256(i_run)
        same_corpus = (
            stamps[0] == stamps[1]  # the content, whatever file it was read from
            if None not in stamps
            else (hs.get("corpus") or {}).get("uri") == (hi.get("corpus") or {}).get("uri")
        )
        if not same_corpus:
            warnings.append(
                "the runs were harvested from different corpora: category shares also move with the prompts"
            )
    warnings += _check_same_labelling(s_run, i_run)
    if sb == ib:
        warnings.append(f"both runs call their fine-tune {sb!r}: the output names them by run directory")
    return warnings


def _check_same_labelling(s_run: Path, i_run: Path) -> list[str]:
    """One judge, taxonomy, prompt and method on both sides: the endpoint's settings fingerprint where
    both were labelled through one (`crossdiff label --endpoint`), else the local label settings less
    machine-local paths; and the judge model and prompt version every label records."""
    from diffing.evidence import read_labels
    from jobs.label_state import settings_diff

    def judged(run: Path) -> set[tuple[str, str]]:
        return {(lab.judge_model, lab.prompt_version) for lab in read_labels(run).values()}

    js, ji = judged(s_run), judged(i_run)
    if js and ji and js != ji:
        raise AnchoredError(
            f"the two runs were labelled by different judges or prompts ({sorted(js)} vs {sorted(ji)}); relabel "
            "one like the other (a category share means something only under one judge and taxonomy)"
        )
    es, ei = (_json(r / "label_endpoint.json") for r in (s_run, i_run))
    if es and ei:
        if es.get("settings_fingerprint") != ei.get("settings_fingerprint"):
            raise AnchoredError(
                "the two runs were labelled by endpoints with different settings (settings_fingerprint "
                f"{es.get('settings_fingerprint')} vs {ei.get('settings_fingerprint')}: taxonomy, method or "
                "judge); relabel one through the other's endpoint"
            )
        return []
    if es or ei:
        return [
            "one run was labelled through an endpoint, the other locally: that their taxonomy and method "
            "agree is unchecked (the judge model and prompt version agree)"
        ]
    ls, li = (_json(r / "label_settings.json") for r in (s_run, i_run))
    if ls is None or li is None:
        return ["a run has no label_settings.json: that both were labelled alike is unchecked"]
    for d in (ls, li):  # machine-local paths; the taxonomy's fingerprint and the judge's id stay
        d.pop("service.taxonomy", None)
        d.pop("service.judge.model_source", None)
    if diff := settings_diff(ls, li):
        raise AnchoredError(
            f"the two runs were labelled differently ({', '.join(diff)}); relabel one with the other's "
            "label settings (a category share means something only under one judge and taxonomy)"
        )
    return []


def _one_dictionary(s_run: str, i_run: str) -> bool:
    """Whether both are comparisons of one pipeline run (one crosscoder: latent ids are shared)."""
    import posixpath

    from jobs.rundir import is_remote

    def root(u: str) -> str:
        u = u.rstrip("/") if is_remote(u) else Path(u).resolve().as_posix()
        parent = posixpath.dirname(u)
        return posixpath.dirname(parent) if posixpath.basename(parent) == "compare" else u

    return root(str(s_run)) == root(str(i_run))


def write_anchored(s_run: str, i_run: str, out: str, opts: Any = None) -> dict:
    """OUT/anchored.{json,md,html}: the category shift of S_RUN's B-specific latents against
    I_RUN's B-specific ones. Runs and OUT may be local or remote (s3://, gs://)."""
    from jobs import jsonsafe
    from jobs.compare import anchored_between
    from jobs.label_state import write_atomic
    from jobs.report import render
    from jobs.report.config import ReportConfig
    from jobs.rundir import WEIGHTS, local_copy, reader_dir

    opts = opts or ReportConfig()
    log = get_logger("anchored", out=str(out))
    with (  # the two runs are only read: private copies, not held (their pipelines may still run)
        local_copy(s_run, reader_dir(s_run), skip=WEIGHTS, hold=False) as s_local,
        local_copy(i_run, reader_dir(i_run), skip=WEIGHTS, hold=False) as i_local,
        local_copy(out) as o_local,
    ):
        s_dir, i_dir = Path(s_local), Path(i_local)
        warnings = check_comparable(s_dir, i_dir)
        s_model, i_model = run_pair(s_dir)[1], run_pair(i_dir)[1]
        sec = anchored_between(
            (s_dir, s_model, str(s_run)),
            (i_dir, i_model, str(i_run)),
            opts=opts,
            shared_dictionary=_one_dictionary(str(s_run), str(i_run)),
        )
        if "data" not in sec:
            raise AnchoredError(f"{sec['markdown']}: label both runs first (`crossdiff label --run RUN`)")
        for w in warnings:
            log.warning("anchored.unchecked", detail=w)
        body = {
            "title": sec["title"],
            "s_run": str(s_run),
            "i_run": str(i_run),
            **sec["data"],
            "warnings": warnings,
            "report_config": opts.model_dump(mode="json"),
        }
        notes = "".join(f'<p class="muted">note: {render.esc(w)}</p>' for w in warnings)
        md = (
            f"# {sec['title']}\n\n"
            + "".join(f"- note: {w}\n" for w in warnings)
            + "\n"
            + sec["markdown"]
            + "\n"
        )
        o = Path(o_local)
        o.mkdir(parents=True, exist_ok=True)
        for name, text in zip(
            OUT_FILES,
            (
                jsonsafe.dumps(body, indent=2),  # standard JSON: NaN/inf as null
                md,
                render.page(sec["title"], [(sec["title"], notes + sec["html"])]),
            ),
            strict=True,
        ):
            write_atomic(o / name, text)
    log.info("anchored.done", s=str(s_run), i=str(i_run))
    return {"out": {n: f"{str(out).rstrip('/')}/{n}" for n in OUT_FILES}, "warnings": warnings}
