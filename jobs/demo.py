"""`crossdiff demo`: the embedded pipeline (`run_demo`), and `--planted-dictionary`, the seconds-long
synthetic check: a planted-dictionary store, an in-process fit, the per-latent analysis, and a
check against the planted truth."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np


def run_planted_demo(out: Path, *, tokens: int = 300_000, seed: int = 0) -> dict:
    from diffing.analysis import analyze_run
    from diffing.config import AnalysisConfig, FitConfig
    from diffing.crosscoder import Crosscoder
    from diffing.fit import fit
    from diffing.logs import get_logger
    from diffing.store import StoreError, open_store, write_arrays
    from diffing.synthetic import make_planted, recovery_report

    log = get_logger("demo")
    log.info("demo.planted_dictionary", stages="planted store -> fit -> analyze -> recovery check")
    out = Path(out)
    planted = make_planted(64, seed=seed)
    store_uri = str(out / "store")
    try:
        store = open_store(store_uri)
        if store.model_names != list(planted.model_names) or store.d_model != planted.directions.shape[2]:
            raise ValueError(
                f"{store_uri} holds another store (models {store.model_names}, d_model {store.d_model}), "
                f"not the planted dictionary's ({list(planted.model_names)}, d_model {planted.directions.shape[2]}); "
                "pass another --out"
            )
    except StoreError:
        log.info("demo.store", tokens=tokens, features=planted.n_features)
        store = write_arrays(
            store_uri,
            planted.sample(tokens, seed=seed + 1),
            model_names=list(planted.model_names),
            doc_ids=np.arange(tokens),  # i.i.d. tokens: each its own document
            overwrite=True,
        )
    cfg = FitConfig.model_validate(
        {
            "crosscoder": {"n_latents": 256, "k": 4, "dead_after_tokens": 20_000},
            "train": {"lr": 1e-2, "epochs": 4, "seed": seed},
        }
    )
    # seconds long: a rerun checks again (the fit's "finished, pass --overwrite" is no flag of demo's)
    metrics = fit(store, cfg, out / "run", overwrite=True)
    table = analyze_run(out / "run", store, AnalysisConfig(), overwrite=True)
    model = Crosscoder.load(out / "run" / "crosscoder")
    report = recovery_report(
        planted,
        model.export_raw()["W_dec"].numpy(),
        np.asarray(table.column("class").to_pylist(), dtype=object),
    )
    summary = {
        "fit": {"fve": metrics["fve"], "l0": metrics["l0"]},
        "planted_truth": report,
        "run": str(out / "run"),
    }
    from jobs import jsonsafe

    (out / "demo_summary.json").write_text(jsonsafe.dumps(summary, indent=2))
    print(jsonsafe.dumps(summary, indent=2))
    print(f"\nlatents: {out / 'run' / 'latents.parquet'}\nsummary: {out / 'demo_summary.json'}")
    return summary


def run_demo(out: Path, overrides: list[str] | tuple[str, ...] = ()) -> dict:
    """`make demo`: the embedded preset through the whole pipeline; prints where the report is."""
    import time

    from jobs.pipeline import run_pipeline

    t0 = time.perf_counter()
    # a rerun after an update redoes only the stages whose config changed (and the ones after)
    res = run_pipeline(preset="embedded", out=str(out), overrides=overrides, redo_changed=True)
    out = Path(out)
    rep = json.loads((out / "report.json").read_text()) if (out / "report.json").exists() else {}
    planted = next((s.get("data") for s in rep.get("sections", []) if s.get("key") == "planted"), None)
    summary = {
        "run": str(out),
        "minutes": round((time.perf_counter() - t0) / 60, 1),
        "fit": {k: res.get("fit", {}).get(k) for k in ("fve", "l0", "dead_fraction")},
        "groups": res.get("analyze", {}).get("groups"),
        "labels": res.get("label", {}).get("categories"),
        "planted_truth": planted and {k: v for k, v in planted.items() if k not in ("targets",)},
    }
    from jobs import jsonsafe

    print(jsonsafe.dumps(summary, indent=2, default=str))
    print(f"\nreport: {(out / 'report.html').resolve()}")
    return summary
