"""Per-latent analysis of a fitted crosscoder: which latents exist in only one model?

Δnorm (Minder et al. 2025's max-normalised form of Lindsey et al. 2024's relative decoder norm)
for a pair (A, B) of models:

    Δnorm_l = ½ ((‖d_A,l‖ − ‖d_B,l‖) / max(‖d_A,l‖, ‖d_B,l‖) + 1)      1 → A-only, 0 → B-only

Latent Scaling (Minder et al. 2025) checks that a latent which looks specific to model T is not
an artefact of the sparsity penalty: how much of its direction d = d_{T,l} does model m really
carry where the latent fires? With f = f_l(x), the closed-form least-squares fit of β f d to a
target y_m(x) is

    β_m = Σ_x f ⟨d, y_m⟩ / (‖d‖² Σ_x f²)

with two targets: the error target y^ε_m = x_m − x̂_m + f d_{m,l} (what the crosscoder leaves
unexplained, plus this latent's own term) and the reconstruction target y^r_m = x̂_m − b_dec,m
(the whole reconstruction, this latent included). In the target model T both β are ~1. In the
reference model R, β^ε measures the direction left in R's error (the sparsity penalty shrank
d_R,l to zero although R carries it: "complete shrinkage"), β^r the direction that other
latents rebuild in R ("latent decoupling"). ν^ε = β^ε_R / β^ε_T and ν^r = β^r_R / β^r_T: both
small in magnitude means the latent is truly specific to T ("robust"). T is the pair's model
with the stronger decoder, also inside a crosscoder of more models. One deviation from the
authors' code: their reconstruction target keeps b_dec (it is `decode(f)`); here it is left out,
so a bias along d does not count as the reference model carrying the latent (β^r differs by
Σf⟨d, b_dec⟩ / (‖d‖² Σf²)).
The β fits run in one streaming pass, for every latent at once (diffing.scaling).
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa
from torch import Tensor

from diffing.analysis_identity import (  # noqa: F401  (their home was here)
    _OPERATIONAL,
    _legacy_fit_digest,
    check_same_analysis,
    fit_digest,
)
from diffing.config import AnalysisConfig
from diffing.crosscoder import Crosscoder
from diffing.models import resolve_device
from diffing.scaling import LatentStats, latent_stats, scaling_targets


def delta_norm(norms: Tensor | np.ndarray, a: int = 0, b: int = 1) -> np.ndarray:
    """Δnorm [L] from decoder norms [M, L]."""
    n = np.asarray(norms, dtype=np.float64)
    na, nb = n[a], n[b]
    return 0.5 * ((na - nb) / np.maximum(np.maximum(na, nb), 1e-12) + 1.0)


def decoder_cosine(W_dec: Tensor | np.ndarray, a: int = 0, b: int = 1) -> np.ndarray:
    """cos(d_A,l, d_B,l) [L]; 0 where either row is zero. In float64, 8,192 latents at a time (the
    whole W_dec in float64 is 13 GB at the Gemma-2-9b shape)."""
    W = W_dec.detach().cpu() if isinstance(W_dec, Tensor) else W_dec
    out = []
    for lo in range(0, W.shape[1], 8192):
        da = np.asarray(W[a, lo : lo + 8192], dtype=np.float64)
        db = np.asarray(W[b, lo : lo + 8192], dtype=np.float64)
        denom = np.linalg.norm(da, axis=-1) * np.linalg.norm(db, axis=-1)
        out.append(np.where(denom > 0, (da * db).sum(-1) / np.maximum(denom, 1e-24), 0.0))
    return np.concatenate(out) if out else np.zeros(0)


def pair_writes(norms: np.ndarray, a: int, b: int, cfg: AnalysisConfig) -> np.ndarray:
    """[L] whether the pair (a, b) writes the latent at all: its stronger decoder is not below the
    only-cut relative to the strongest model's (always, for two models). A latent of a third model
    only is neither pair model's, whatever the ratio of their two tiny norms."""
    n = np.asarray(norms, dtype=np.float64)
    rel = n / np.maximum(n.max(0, keepdims=True), 1e-12)
    return (
        np.maximum(rel[a], rel[b]) >= min(2 * cfg.only_low, 1.0)
        if n.shape[0] > 2
        else np.ones(n.shape[1], bool)
    )


def classify(
    norms: Tensor | np.ndarray,
    model_names: list[str],
    cfg: AnalysisConfig,
    pair: tuple[int, int] | None = None,
) -> np.ndarray:
    """shared / <model>-only / other per latent, from relative decoder norms r_m = ‖d_m‖ / max_m ‖d_m‖.

    For two models, or a `pair` (a, b) of model indices, this is exactly the Δnorm rule of that
    pair (A-only: Δnorm > only_high, B-only: Δnorm < only_low, shared: Δnorm in [shared_low,
    1 - shared_low]); for more models without a pair, a latent is m-only when every other model's
    relative norm is below the stricter of the pair rule's two cuts, and shared when all are above.
    """
    n = np.asarray(norms, dtype=np.float64)
    if n.ndim != 2 or n.shape[0] != len(model_names):
        raise ValueError(f"norms must be [n_models={len(model_names)}, n_latents], got {list(n.shape)}")
    rel = n / np.maximum(n.max(0, keepdims=True), 1e-12)  # [M, L]
    M, L = rel.shape
    if M == 2 or pair is not None:  # one pair's Δnorm (the thresholds may be asymmetric)
        a, b = pair or (0, 1)
        dn = delta_norm(n, a, b)
        out = np.full(L, "other", dtype=object)
        out[dn > cfg.only_high] = f"{model_names[a]}-only"
        out[dn < cfg.only_low] = f"{model_names[b]}-only"
        out[(dn >= cfg.shared_low) & (dn <= 1 - cfg.shared_low)] = "shared"
        out[~pair_writes(n, a, b, cfg)] = "other"  # another model's latent: the pair barely writes it
        return out
    # Δnorm < only_low (or > only_high)  <=>  the other norm < 2 * only_low (2 * (1 - only_high)) of
    # the largest; without a pair both sides are "the other", so the stricter cut applies
    only_cut = 2 * min(cfg.only_low, 1 - cfg.only_high)
    shared_cut = 1 - 2 * (0.5 - cfg.shared_low)
    out = np.full(L, "other", dtype=object)
    top = rel.argmax(0)
    for m in range(M):
        others = np.delete(rel, m, axis=0)
        out[(top == m) & (others < only_cut).all(0)] = f"{model_names[m]}-only"
    out[(rel >= shared_cut).all(0)] = "shared"
    return out


def _stat_batches(store, cfg: AnalysisConfig):
    """The batches latent statistics read: see ActivationStore.shards_for_sample."""
    order = store.shards_for_sample(cfg.max_tokens)
    return store.iter_batches(cfg.batch_size, shuffle=False, drop_last=False, shard_indices=order)


def latent_table(
    model: Crosscoder, stats: LatentStats, cfg: AnalysisConfig, pair: tuple[str, str] | None = None
) -> pa.Table:
    """All per-latent numbers as an Arrow table (one row per latent)."""
    names = list(model.cfg.model_names)
    a_name, b_name = pair or (names[0], names[1])
    if a_name == b_name:
        raise ValueError(f"analysis pair needs two different models, got {a_name!r} twice")
    for nm in (a_name, b_name):
        if nm not in names:
            raise ValueError(f"analysis pair names {nm!r}, not one of the crosscoder's models {names}")
    a, b = names.index(a_name), names.index(b_name)
    norms = model.decoder_norms().detach().cpu().numpy()  # [M, L]
    L = norms.shape[1]
    dn = delta_norm(norms, a, b)
    cls = classify(norms, names, cfg, pair=(a, b))
    live = stats.freq > 0
    cls = np.where(live, cls, "dead")

    # ν: target T = the pair's stronger decoder (β was measured along it), reference R = the other
    # the targets β was measured along. They are taken from the stats, not recomputed: a latent whose
    # two decoder norms tie to float32 rounding (one that never trained) can pick the other model
    # when its norms are summed in another order, on another device
    if stats.target is None:
        target = scaling_targets(norms, a, b)
    elif (stats.pair is not None and set(stats.pair) != {a, b}) or not np.isin(stats.target, (a, b)).all():
        raise ValueError(
            f"latent_stats measured β for another pair than {[a_name, b_name]}; pass pair=({a}, {b})"
        )
    else:
        target = np.asarray(stats.target)
    ref = np.where(target == a, b, a)
    idx = np.arange(L)
    bt_e, br_e = stats.beta_eps[target, idx], stats.beta_eps[ref, idx]
    bt_r, br_r = stats.beta_r[target, idx], stats.beta_r[ref, idx]
    with np.errstate(divide="ignore", invalid="ignore"):
        nu_eps = np.where(np.abs(bt_e) > 1e-9, br_e / bt_e, np.nan)
        nu_r = np.where(np.abs(bt_r) > 1e-9, br_r / bt_r, np.nan)
    # |ν|: a reference model that carries the direction reversed (β_R < 0) does not lack it
    robust = live & (np.abs(nu_eps) < cfg.nu_eps_max) & (np.abs(nu_r) < cfg.nu_r_max)
    robust = robust & np.array([c.endswith("-only") for c in cls])

    # rank-based tails of live latents by Δnorm (small fine-tunes have no absolute-threshold class)
    tail = np.full(L, "", dtype=object)
    live_pair = live & pair_writes(norms, a, b, cfg)  # Δnorm ranks (and samples) the pair's latents
    live_idx = np.flatnonzero(live_pair)
    # at most half each (tail_frac may be 0.5): a latent is never in both tails
    n_tail = min(int(round(cfg.tail_frac * len(live_idx))), len(live_idx) // 2)
    if n_tail:
        order = live_idx[np.argsort(dn[live_idx], kind="stable")]
        tail[order[:n_tail]] = "low"
        tail[order[-n_tail:]] = "high"

    group = select_latents(dn, cls, robust, tail, nu_eps, nu_r, live_pair, cfg, (a_name, b_name))
    cols = {
        "latent": pa.array(idx.astype(np.int64)),
        "delta_norm": pa.array(dn),
        "cosine": pa.array(decoder_cosine(model.W_dec.detach().cpu().numpy(), a, b)),
        "freq": pa.array(stats.freq.astype(np.float64)),
        "mean_act": pa.array(stats.mean_act.astype(np.float64)),
        "max_act": pa.array(stats.max_act.astype(np.float64)),
        "nu_eps": pa.array(nu_eps),
        "nu_r": pa.array(nu_r),
        "class": pa.array(cls.astype(str)),
        "robust": pa.array(robust),
        "tail": pa.array(tail.astype(str)),
        "scaling_target": pa.array([names[t] for t in target]),
        "group": pa.array(group.astype(str)),
    }
    for m, nm in enumerate(names):
        cols[f"norm/{nm}"] = pa.array(norms[m].astype(np.float64))
        cols[f"beta_eps/{nm}"] = pa.array(stats.beta_eps[m])
        cols[f"beta_r/{nm}"] = pa.array(stats.beta_r[m])
    meta = {"pair": f"{a_name},{b_name}", "n_tokens": str(stats.n_tokens), "config": cfg.model_dump_json()}
    return pa.table(cols).replace_schema_metadata(meta)


def robustness(nu_eps: np.ndarray, nu_r: np.ndarray, eps_max: float = 1.0, r_max: float = 1.0) -> np.ndarray:
    """Ranking score for model-specific candidates: max(|ν^ε| / eps_max, |ν^r| / r_max), smaller =
    more specific; NaN -> inf. With the analysis's cuts (`nu_eps_max`, `nu_r_max`) a score below 1
    is exactly a robust latent, so robust latents rank first whichever ν is the larger."""
    eps_max, r_max = max(eps_max, 1e-12), max(r_max, 1e-12)  # a cut of 0: nothing is robust by it
    with np.errstate(invalid="ignore"):  # np.maximum keeps a NaN of either (np.fmax dropped it)
        score = np.maximum(
            np.abs(np.asarray(nu_eps, np.float64)) / eps_max, np.abs(np.asarray(nu_r, np.float64)) / r_max
        )
    return np.where(np.isnan(score), np.inf, score)


def select_latents(
    delta_norm: np.ndarray,
    classes: np.ndarray,
    robust: np.ndarray,
    tail: np.ndarray,
    nu_eps: np.ndarray,
    nu_r: np.ndarray,
    live: np.ndarray,
    cfg: AnalysisConfig,
    pair: tuple[str, str],
) -> np.ndarray:
    """The `group` of every latent: "<A>-specific", "<B>-specific", "baseline" or "".

    Candidates for A (the pair's first model) are the robust "A-only" latents (selection "class"),
    the high Δnorm tail (selection "tail"), or both; B likewise with "B-only" and the low tail.
    Candidates are re-ranked by Latent Scaling (smallest max(|ν^ε| / nu_eps_max, |ν^r| / nu_r_max)
    first: the robust ones, then the nearest to the cuts) and cut to
    `max_per_group`. The baseline is a seeded random sample of live latents with mid Δnorm
    (in [shared_low, 1 - shared_low]) that are no candidate of either side (also not one cut by
    `max_per_group` or left out by `selection`), as large as the larger group.
    """
    a, b = pair
    L = len(delta_norm)
    classes = np.asarray(classes, dtype=object)
    tail = np.asarray(tail, dtype=object)
    live = np.asarray(live, bool)
    score = robustness(nu_eps, nu_r, cfg.nu_eps_max, cfg.nu_r_max)
    group = np.full(L, "", dtype=object)
    sizes = []
    candidates = np.zeros(L, bool)  # of either side, kept or cut: never "random shared" latents
    for name, side in ((a, "high"), (b, "low")):
        by_class = live & np.asarray(robust, bool) & (classes == f"{name}-only")
        by_tail = live & (tail == side)
        candidates |= by_class | by_tail
        cand = {"class": by_class, "tail": by_tail, "both": by_class | by_tail}[cfg.selection]
        cand = cand & (group == "")
        idx = np.flatnonzero(cand)
        idx = idx[np.lexsort((idx, score[idx]))]  # most robust first, ties by index
        if cfg.max_per_group is not None:
            idx = idx[: cfg.max_per_group]
        group[idx] = f"{name}-specific"
        sizes.append(len(idx))
    lo = cfg.shared_low
    dn = np.asarray(delta_norm, np.float64)
    pool = np.flatnonzero(live & (group == "") & ~candidates & (dn >= lo) & (dn <= 1 - lo))
    n_base = min(max(sizes, default=0), len(pool))
    if n_base:
        rng = np.random.default_rng(cfg.baseline_seed)
        group[np.sort(rng.choice(pool, size=n_base, replace=False))] = "baseline"
    return group


# settings that change no result (how the work is batched or spread, where the harvest's tokenizer
# is read from), left out of the rerun check
# settings that change how, or whether, work is done, but not latents.parquet or the evidence
def analyze_run(
    run_dir, store, cfg: AnalysisConfig, *, pair: tuple[str, str] | None = None, overwrite: bool = False
):
    """Analyse a finished fit run over `store`; writes RUN/latents.parquet (skipped when present)."""
    import json
    from pathlib import Path

    import pyarrow.parquet as pq

    from diffing.logs import get_logger

    run = Path(run_dir)
    out = run / "latents.parquet"
    log = get_logger("analyze", run=str(run))
    if out.exists() and not overwrite:
        check_same_analysis(out, cfg, pair, run=run)
        log.info("analyze.skip", reason="latents.parquet exists; pass --overwrite to redo")
        return pq.read_table(out)
    if not (run / "crosscoder" / "cfg.json").exists():
        raise FileNotFoundError(f"{run} has no fitted crosscoder (run `crossdiff fit --out {run}` first)")
    model = Crosscoder.load(run / "crosscoder", device=resolve_device(cfg.device, "analyze.device"))
    fit = fit_digest(run)  # the weights just loaded (hashed once per file version in a process)
    if list(model.cfg.model_names) != list(store.model_names) or model.cfg.d_model != store.d_model:
        raise ValueError(
            f"store {store.uri} holds models {store.model_names} (d_model={store.d_model}) but the crosscoder was "
            f"fitted on {list(model.cfg.model_names)} (d_model={model.cfg.d_model}); pass the matching --store"
        )
    names = list(model.cfg.model_names)
    a_name, b_name = pair or (names[0], names[1])
    idx = (names.index(a_name), names.index(b_name)) if {a_name, b_name} <= set(names) else (0, 1)
    stats = latent_stats(model, _stat_batches(store, cfg), max_tokens=cfg.max_tokens, pair=idx)
    table = latent_table(model.cpu(), stats, cfg, pair)
    if fit:
        table = table.replace_schema_metadata({**table.schema.metadata, b"fit": fit.encode()})
    tmp = out.with_suffix(".tmp")
    pq.write_table(table, tmp)
    tmp.replace(out)
    (run / "analysis_config.json").write_text(
        json.dumps({"analysis": cfg.model_dump(mode="json"), "store": store.uri, "fit": fit})
    )
    counts = {
        str(k): int(v)
        for k, v in zip(
            *np.unique(table.column("class").to_numpy(zero_copy_only=False), return_counts=True), strict=True
        )
    }
    log.info(
        "analyze.done",
        tokens=stats.n_tokens,
        classes=counts,
        robust=int(np.sum(table.column("robust").to_numpy(zero_copy_only=False))),
    )
    return table
