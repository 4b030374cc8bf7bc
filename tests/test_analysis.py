"""Δnorm, classes and Latent Scaling against constructed ground truth."""

import time

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch

from diffing.analysis import analyze_run, classify, decoder_cosine, delta_norm, latent_stats, latent_table
from diffing.config import AnalysisConfig, CrosscoderConfig
from diffing.crosscoder import Crosscoder


def test_delta_norm_and_cosine_formulas():
    norms = np.array([[1.0, 0.0, 0.5, 2.0], [0.0, 1.0, 0.5, 1.0]])
    np.testing.assert_allclose(delta_norm(norms), [1.0, 0.0, 0.5, 0.75])
    W = np.zeros((2, 2, 3))
    W[0, 0] = [1, 0, 0]
    W[1, 0] = [1, 1, 0]
    W[0, 1] = [1, 0, 0]
    np.testing.assert_allclose(decoder_cosine(W), [1 / np.sqrt(2), 0.0])


def test_classify_pair_and_three_models():
    cfg = AnalysisConfig()
    pair = np.array([[1.0, 0.05, 1.0, 1.0], [0.02, 1.0, 0.95, 0.5]])
    assert classify(pair, ["A", "B"], cfg).tolist() == ["A-only", "B-only", "shared", "other"]
    three = np.array([[1.0, 0.1, 1.0, 1.0], [0.1, 0.1, 0.9, 1.0], [0.0, 1.0, 0.85, 0.1]])
    assert classify(three, ["pt", "it", "simpo"], cfg).tolist() == [
        "pt-only",
        "simpo-only",
        "shared",
        "other",
    ]


def _constructed(beta_true: float, decoupled: bool, n=20_000, seed=0):
    """Latent 0 is B-only by its decoder; model A carries beta_true * f0 along the same direction.
    decoupled=False: nothing rebuilds it in A (complete shrinkage -> ν^ε = beta_true, ν^r = 0).
    decoupled=True: latent 2 rebuilds it in A (latent decoupling -> ν^ε = 0, ν^r = beta_true)."""
    D, L = 8, 3
    cfg = CrosscoderConfig(kind="l1", n_models=2, d_model=D, n_latents=L, model_names=("A", "B"), aux_k=1)
    cc = Crosscoder(cfg, seed=None)
    with torch.no_grad():
        for p in cc.parameters():
            p.zero_()
        e = torch.eye(D)
        cc.W_enc[1, :, 0] = e[0]  # latent 0 reads B's e0
        cc.W_dec[1, 0] = e[0]  # ... and writes it in B only
        cc.W_enc[0, :, 1] = e[1] * 0.5  # latent 1: shared on e1
        cc.W_enc[1, :, 1] = e[1] * 0.5
        cc.W_dec[0, 1] = e[1]
        cc.W_dec[1, 1] = e[1]
        if decoupled:
            cc.W_enc[0, :, 2] = e[0]  # latent 2 reads A's e0 and writes it in A
            cc.W_dec[0, 2] = e[0]
    rng = np.random.default_rng(seed)
    f0 = rng.exponential(1.0, n) * (rng.random(n) < 0.3)
    f1 = rng.exponential(1.0, n) * (rng.random(n) < 0.5)
    x = np.zeros((n, 2, D), np.float32)
    x[:, 1, 0] = f0
    x[:, 0, 0] = beta_true * f0
    x[:, :, 1] = f1[:, None]
    x[:, :, 2:] = 0.1 * rng.standard_normal((n, 2, D - 2))
    return cc, torch.from_numpy(x)


@pytest.mark.parametrize("decoupled", [False, True])
def test_latent_scaling_recovers_known_beta(decoupled):
    beta = 0.6
    cc, x = _constructed(beta, decoupled)
    stats = latent_stats(cc, x.split(4096))
    t = latent_table(cc, stats, AnalysisConfig()).to_pydict()
    assert t["class"][0] == "B-only" and t["scaling_target"][0] == "B"
    assert abs(stats.beta_eps[1, 0] - 1.0) < 1e-3 and abs(stats.beta_r[1, 0] - 1.0) < 1e-3  # target model
    if decoupled:
        assert abs(t["nu_eps"][0]) < 0.01 and abs(t["nu_r"][0] - beta) < 0.01
        assert not t["robust"][0]
    else:
        assert abs(t["nu_eps"][0] - beta) < 0.01 and abs(t["nu_r"][0]) < 0.01
        assert not t["robust"][0]  # 0.6 > nu_eps_max
    # a shared latent on an identical direction: ν ≈ 1
    assert t["class"][1] == "shared" and abs(t["nu_eps"][1] - 1) < 0.01 and abs(t["nu_r"][1] - 1) < 0.01


@pytest.mark.parametrize("kind", ["batchtopk", "constructed"])
def test_latent_stats_over_kept_entries_equal_the_dense_products(kind, monkeypatch):
    """The sparse reduction (over the (token, latent) entries an encode keeps) gives
    the dense path's statistics; both agree with a float64 reference written from the formulas."""
    import diffing.scaling as sc

    if kind == "batchtopk":
        cfg = CrosscoderConfig(
            kind="batchtopk", n_models=3, d_model=16, n_latents=256, k=4, model_names=("a", "b", "c"), aux_k=8
        )
        cc = Crosscoder(cfg, seed=3)
        x = torch.randn(3000, 3, 16)
        with torch.no_grad():  # a bias and scales as after a fit: β^r must leave b_dec out, and
            cc.b_dec.normal_(0.0, 0.5)  # every statistic must read the normalised activations
            cc.norm_scale.copy_(torch.tensor([0.5, 2.0, 1.3]))
        with torch.no_grad():  # an inference threshold, as after a fit: about 4% of entries kept
            score = torch.relu(cc.encode_pre(cc.normalise(x))) * cc.decoder_norms().sum(0)
            cc.threshold.fill_(torch.quantile(score.flatten()[::7], 0.96).item())
    else:
        cc, x = _constructed(0.6, decoupled=True)
        with torch.no_grad():
            cc.b_dec[0, 0], cc.b_dec[1, 3] = 0.3, -0.2  # along latent 0's and 2's direction, and off it
    runs = {}
    for path, density in (("dense", -1.0), ("sparse", 1.0)):
        monkeypatch.setattr(sc, "SPARSE_MAX_DENSITY", density)
        runs[path] = latent_stats(cc, x.split(700), pair=(0, 1))
    dense, sparse = runs["dense"], runs["sparse"]
    for field in ("freq", "mean_act", "max_act", "beta_eps", "beta_r"):
        np.testing.assert_allclose(getattr(sparse, field), getattr(dense, field), rtol=1e-4, atol=1e-5)
    # the formulas, in float64, on the whole data at once
    with torch.no_grad():
        xn = cc.normalise(x).double()
        f = cc.encode(cc.normalise(x)).double()
        W = cc.W_dec.double()
        x_hat = torch.einsum("bl,mld->bmd", f, W) + cc.b_dec.double()
        tgt = torch.as_tensor(dense.target)
        d = W[tgt, torch.arange(W.shape[1])]  # [L, D]
        den = (d.pow(2).sum(-1) * f.pow(2).sum(0)).clamp_min(1e-12)
        for m in range(W.shape[0]):
            # β^ε: the error target with the latent's own contribution added back (Σ f² ⟨d, d_m⟩)
            num_eps = (f * ((xn[:, m] - x_hat[:, m]) @ d.T)).sum(0) + f.pow(2).sum(0) * (d * W[m]).sum(-1)
            num_r = (f * ((x_hat[:, m] - cc.b_dec[m].double()) @ d.T)).sum(0)
            live = f.pow(2).sum(0) > 0
            np.testing.assert_allclose(
                sparse.beta_eps[m][live], (num_eps / den)[live].numpy(), rtol=1e-3, atol=1e-5
            )
            np.testing.assert_allclose(
                sparse.beta_r[m][live], (num_r / den)[live].numpy(), rtol=1e-3, atol=1e-5
            )
    kept = (f > 0).double().mean()
    assert (0.02 < kept < 0.1) if kind == "batchtopk" else kept > 0.1  # each path tried where it is used


def test_truly_specific_latent_is_robust():
    cc, x = _constructed(0.0, decoupled=False)
    t = latent_table(cc, latent_stats(cc, x.split(4096)), AnalysisConfig()).to_pydict()
    assert t["robust"][0] and abs(t["nu_eps"][0]) < 0.01


def test_latent_stats_read_raw_activations_through_norm_scale():
    """A store holds raw activations; the statistics are those of the normalised ones the
    crosscoder was fitted on: raw x / c with scales c give exactly the numbers of x with c = 1."""
    cc, x = _constructed(0.6, decoupled=False)
    ref = latent_stats(cc, x.split(4096))
    scale = torch.tensor([0.5, 2.0])
    with torch.no_grad():
        cc.norm_scale.copy_(scale)
    scaled = latent_stats(cc, (x / scale[None, :, None]).split(4096))
    for field in ("freq", "mean_act", "max_act", "beta_eps", "beta_r"):
        np.testing.assert_allclose(getattr(scaled, field), getattr(ref, field), rtol=1e-5, atol=1e-6)
    assert abs(scaled.beta_eps[0, 0] - 0.6) < 0.01  # ν^ε of the B-only latent, as constructed


def test_dead_latents_are_classed_dead_and_stay_out_of_the_tails():
    """A latent that never fired has a decoder but no evidence: class `dead`, in neither Δnorm
    tail, and the tails' size counts live latents only."""
    from dataclasses import replace

    cc, x = _constructed(0.5, decoupled=True)
    stats = latent_stats(cc, x.split(4096))
    dead = replace(stats, freq=np.array([stats.freq[0], stats.freq[1], 0.0]))  # latent 2 (A-only) silent
    t = latent_table(cc, dead, AnalysisConfig(tail_frac=0.5)).to_pydict()
    assert t["class"] == ["B-only", "shared", "dead"]
    assert t["tail"] == ["low", "high", ""]  # one a side of the two live latents, not the dead one
    assert not t["robust"][2]


def test_robust_is_only_said_of_model_only_latents():
    """ν ≈ 0 makes a latent robust only where its decoders already say model-only: a latent in
    the band between `other` and `shared` is not, whatever its ν."""
    from dataclasses import replace

    cc, x = _constructed(0.0, decoupled=False)
    stats = latent_stats(cc, x.split(4096))
    with torch.no_grad():
        cc.W_dec[0, 0] = torch.eye(8)[0] * 0.4  # latent 0: Δnorm 0.2, between only_low and shared_low
    t = latent_table(cc, replace(stats, target=None), AnalysisConfig()).to_pydict()
    assert t["class"][0] == "other" and abs(t["nu_eps"][0]) < 0.01  # ν still says "B only"
    assert not t["robust"][0]


def test_firing_stats():
    cc, x = _constructed(0.5, False)
    stats = latent_stats(cc, x.split(1000))
    f0 = x[:, 1, 0].numpy()
    assert abs(stats.freq[0] - (f0 > 0).mean()) < 1e-6
    assert abs(stats.mean_act[0] - f0[f0 > 0].mean()) < 1e-4
    assert stats.n_tokens == len(x)


def test_max_tokens_reads_exactly_that_many_whatever_the_batch_size():
    # the batch size is operational (not in the analysis identity): it must not decide the sample
    cc, x = _constructed(0.5, False)
    runs = [latent_stats(cc, x.split(b), max_tokens=2500) for b in (1000, 4096, 2500)]
    assert [r.n_tokens for r in runs] == [2500, 2500, 2500]
    f0 = x[:2500, 1, 0].numpy()
    for r in runs:
        assert abs(r.freq[0] - (f0 > 0).mean()) < 1e-6
        np.testing.assert_allclose(r.beta_eps, runs[0].beta_eps, rtol=1e-4, atol=1e-9)


def test_tail_selection_ranks_live_latents(tmp_path):
    cc, x = _constructed(0.5, True)
    cfg = AnalysisConfig(tail_frac=0.34)
    t = latent_table(cc, latent_stats(cc, x.split(4096)), cfg).to_pydict()
    assert t["tail"] == ["low", "", "high"]  # latent 0 lowest Δnorm (B-only), latent 2 highest (A-only)
    # half of 3 rounds to 2 a side: the tails would overlap, so each keeps at most half
    t = latent_table(cc, latent_stats(cc, x.split(4096)), AnalysisConfig(tail_frac=0.5)).to_pydict()
    assert t["tail"] == ["low", "", "high"]


def test_analyze_run_writes_parquet_and_checks_store(tmp_path):
    from diffing.store import write_arrays

    cc, x = _constructed(0.5, False, n=3000)
    cc.save(tmp_path / "run" / "crosscoder")
    st = write_arrays(str(tmp_path / "s"), x, model_names=["A", "B"])
    analyze_run(tmp_path / "run", st, AnalysisConfig())
    t = pq.read_table(tmp_path / "run" / "latents.parquet")
    for col in ["latent", "delta_norm", "cosine", "freq", "nu_eps", "nu_r", "class"]:
        assert col in t.column_names
    assert t.num_rows == 3
    other = write_arrays(str(tmp_path / "s2"), x, model_names=["A", "C"])
    with pytest.raises(ValueError, match="matching --store"):
        analyze_run(tmp_path / "run", other, AnalysisConfig(), overwrite=True)


def test_an_old_analysis_without_the_fits_digest_is_refused_after_a_refit(tmp_path):
    """latents.parquet from a crossdiff that did not record the weights it read (before 2026-12-06):
    skipped while the weights are older than it, refused once they were rewritten after it."""
    import os

    from diffing.store import write_arrays

    cc, x = _constructed(0.5, False, n=3000)
    run = tmp_path / "run"
    cc.save(run / "crosscoder")
    st = write_arrays(str(tmp_path / "s"), x, model_names=["A", "B"], doc_ids=np.arange(3000) // 100)
    analyze_run(run, st, AnalysisConfig())
    out = run / "latents.parquet"
    t = pq.read_table(out)
    meta = {k: v for k, v in t.schema.metadata.items() if k != b"fit"}
    pq.write_table(t.replace_schema_metadata(meta), out)  # as an older crossdiff wrote it
    weights = run / "crosscoder" / "model.safetensors"
    now = out.stat().st_mtime_ns
    os.utime(weights, ns=(now - 60 * 10**9, now - 60 * 10**9))  # fitted before the analysis
    assert analyze_run(run, st, AnalysisConfig()).num_rows == 3  # skipped, as before
    os.utime(weights, ns=(now + 60 * 10**9, now + 60 * 10**9))  # refitted after it
    with pytest.raises(ValueError, match="older than the crosscoder's weights.*--overwrite"):
        analyze_run(run, st, AnalysisConfig())
    analyze_run(run, st, AnalysisConfig(), overwrite=True)
    assert b"fit" in pq.read_schema(out).metadata


def _selection_inputs():
    """12 latents: 0 robust A-only, 1 non-robust A-only, 2 robust B-only, 3..10 shared, 11 dead."""
    from diffing.analysis import select_latents  # noqa: F401

    dn = np.array([0.95, 0.97, 0.05, 0.5, 0.45, 0.55, 0.6, 0.42, 0.58, 0.5, 0.8, 0.99])
    cls = np.array(["A-only", "A-only", "B-only"] + ["shared"] * 5 + ["other"] + ["shared", "other", "dead"])
    robust = np.array([True, False, True] + [False] * 9)
    live = np.array([True] * 11 + [False])
    tail = np.array(["", "high", "low", "", "", "", "", "", "", "", "high", ""])
    nu_eps = np.array([0.05, 0.6, 0.1, 1, 1, 1, 1, 1, 1, 1, 0.3, 0])
    nu_r = np.array([0.1, 0.1, np.nan, 1, 1, 1, 1, 1, 1, 1, 0.2, 0])
    return dn, cls, robust, tail, nu_eps, nu_r, live


@pytest.mark.parametrize(
    "selection,a_want,b_want", [("class", {0}, {2}), ("tail", {1, 10}, {2}), ("both", {0, 1, 10}, {2})]
)
def test_select_latents_groups(selection, a_want, b_want):
    from diffing.analysis import select_latents

    dn, cls, robust, tail, nu_eps, nu_r, live = _selection_inputs()
    cfg = AnalysisConfig(selection=selection)
    g = select_latents(dn, cls, robust, tail, nu_eps, nu_r, live, cfg, ("A", "B"))
    assert set(np.flatnonzero(g == "A-specific")) == a_want
    assert set(np.flatnonzero(g == "B-specific")) == b_want
    base = np.flatnonzero(g == "baseline")
    assert len(base) == max(len(a_want), len(b_want))  # as large as the larger group
    assert all(live[base]) and all((dn[base] >= 0.4) & (dn[base] <= 0.6))  # shared / mid-Δnorm, live
    g2 = select_latents(dn, cls, robust, tail, nu_eps, nu_r, live, cfg, ("A", "B"))
    assert g2.tolist() == g.tolist()  # seeded
    g3 = select_latents(
        dn, cls, robust, tail, nu_eps, nu_r, live, cfg.model_copy(update={"baseline_seed": 5}), ("A", "B")
    )
    assert set(np.flatnonzero(g3 == "A-specific")) == a_want


def test_baseline_never_holds_a_candidate_and_a_nan_ranks_last():
    """Candidates cut by max_per_group or left out by `selection` stay out of the random shared
    baseline; a latent with one ν NaN ranks after every measured one."""
    from diffing.analysis import robustness, select_latents

    assert robustness(np.array([np.nan, 0.9]), np.array([0.1, 0.2])).tolist() == [np.inf, 0.9]
    dn, cls, robust, tail, nu_eps, nu_r, live = _selection_inputs()
    tail, dn = tail.copy(), dn.copy()
    tail[[4, 5]] = ["low", "high"]  # tail latents inside the shared band (as on small fine-tunes)
    for cfg in (AnalysisConfig(selection="class"), AnalysisConfig(selection="both", max_per_group=1)):
        for seed in range(20):
            g = select_latents(
                dn,
                cls,
                robust,
                tail,
                nu_eps,
                nu_r,
                live,
                cfg.model_copy(update={"baseline_seed": seed}),
                ("A", "B"),
            )
            assert not ({4, 5, 1, 10} & set(np.flatnonzero(g == "baseline"))), (cfg, g)
    with pytest.raises(ValueError, match="shared band"):
        AnalysisConfig(only_low=0.3, shared_low=0.2)


def test_the_ranking_weighs_each_nu_by_its_own_cut():
    """ν^ε and ν^r have their own cuts (0.2, 0.5): a robust latent (0.1, 0.45) ranks before one that
    fails the ν^ε cut (0.3, 0.1), though its larger |ν| is the larger of the two (the literature
    review's example); the score is below 1 exactly for the robust."""
    from diffing.analysis import robustness, select_latents

    cfg = AnalysisConfig(selection="tail", max_per_group=1)
    nu_eps, nu_r = np.array([0.3, 0.1, 0.0, 0.0]), np.array([0.1, 0.45, 0.0, 0.0])
    score = robustness(nu_eps, nu_r, cfg.nu_eps_max, cfg.nu_r_max)
    assert score.tolist() == pytest.approx([1.5, 0.9, 0.0, 0.0]) and (score < 1).tolist() == [
        False,
        True,
        True,
        True,
    ]
    dn = np.array([0.99, 0.98, 0.5, 0.5])
    tail = np.array(["high", "high", "", ""], dtype=object)
    cls = np.array(["A-only", "A-only", "shared", "shared"], dtype=object)
    g = select_latents(
        dn, cls, np.array([False, True, False, False]), tail, nu_eps, nu_r, np.ones(4, bool), cfg, ("A", "B")
    )
    assert g[:2].tolist() == ["", "A-specific"]
    assert (robustness(nu_eps, nu_r, 0.0, 0.5)[:2] > 1e9).all()  # a cut of 0: no division by zero


def test_select_latents_reranks_by_latent_scaling():
    from diffing.analysis import robustness, select_latents

    dn, cls, robust, tail, nu_eps, nu_r, live = _selection_inputs()
    # latent 2's ν^r is NaN (nothing to scale): it ranks after every measured latent
    np.testing.assert_allclose(robustness(nu_eps, nu_r)[[0, 1, 2, 10]], [0.1, 0.6, np.inf, 0.3])
    cfg = AnalysisConfig(selection="both", max_per_group=2)
    g = select_latents(dn, cls, robust, tail, nu_eps, nu_r, live, cfg, ("A", "B"))
    assert set(np.flatnonzero(g == "A-specific")) == {0, 10}  # latent 1 (ν^ε = 0.6) is cut
    # pair order decides which tail is whose: (B, A) makes the high tail B's
    g = select_latents(
        dn, cls, robust, tail, nu_eps, nu_r, live, AnalysisConfig(selection="tail"), ("B", "A")
    )
    assert set(np.flatnonzero(g == "B-specific")) == {1, 10} and set(np.flatnonzero(g == "A-specific")) == {2}


def test_latents_parquet_has_groups(tmp_path):
    from diffing.store import write_arrays

    cc, x = _constructed(0.0, False, n=3000)
    cc.save(tmp_path / "run" / "crosscoder")
    st = write_arrays(str(tmp_path / "s"), x, model_names=["A", "B"])
    t = analyze_run(tmp_path / "run", st, AnalysisConfig(selection="class")).to_pydict()
    assert t["group"] == ["B-specific", "baseline", ""]  # robust B-only latent; shared latent 1 as baseline


def test_partial_reads_start_from_the_last_shards(tmp_path):
    """A token budget smaller than the store reads the last shards (an in-order fit's warmup rows are
    the first ones); a budget that covers the store reads it all, in order."""
    from diffing.analysis import _stat_batches
    from diffing.store import open_store, write_arrays

    x = torch.arange(3000, dtype=torch.float32)[:, None, None].expand(3000, 2, 4).contiguous()
    st = open_store(write_arrays(str(tmp_path / "s"), x, model_names=["A", "B"], shard_rows=1000).uri)
    part = torch.cat(list(_stat_batches(st, AnalysisConfig(max_tokens=1000, batch_size=500))))
    assert part[0, 0, 0] == 2000 and len(part) >= 1000
    whole = torch.cat(list(_stat_batches(st, AnalysisConfig(max_tokens=3000, batch_size=500))))
    assert torch.equal(whole[:, 0, 0].float(), torch.arange(3000).half().float())  # stored as fp16


def _three_models(beta_true: float, n=20_000, seed=0):
    """(pt, it, simpo): latent 0 is written by it (norm 2) and simpo (norm 1) along e0, not by pt,
    which carries beta_true * f0 there (complete shrinkage); latent 1 is shared by all three."""
    D, L = 6, 2
    cfg = CrosscoderConfig(
        kind="l1", n_models=3, d_model=D, n_latents=L, model_names=("pt", "it", "simpo"), aux_k=1
    )
    cc = Crosscoder(cfg, seed=None)
    with torch.no_grad():
        for p in cc.parameters():
            p.zero_()
        e = torch.eye(D)
        cc.W_enc[2, :, 0] = e[0]  # latent 0 reads simpo's e0
        cc.W_dec[1, 0] = 2 * e[0]
        cc.W_dec[2, 0] = e[0]
        for m in range(3):
            cc.W_enc[m, :, 1] = e[1] / 3
            cc.W_dec[m, 1] = e[1]
    rng = np.random.default_rng(seed)
    f0 = rng.exponential(1.0, n) * (rng.random(n) < 0.3)
    f1 = rng.exponential(1.0, n) * (rng.random(n) < 0.5)
    x = np.zeros((n, 3, D), np.float32)
    x[:, 0, 0], x[:, 1, 0], x[:, 2, 0] = beta_true * f0, 2 * f0, f0
    x[:, :, 1] = f1[:, None]
    return cc, torch.from_numpy(x)


@pytest.mark.parametrize("beta", [0.05, 0.6])
def test_a_pair_inside_three_models_is_measured_on_the_pair(beta):
    """Pair (pt, simpo) of a 3-model crosscoder: Latent Scaling along simpo's decoder (not it's,
    the strongest overall), ν = β_pt / β_simpo, and the class from the pair's own Δnorm."""
    cc, x = _three_models(beta)
    stats = latent_stats(cc, x.split(4096), pair=(0, 2))
    t = latent_table(cc, stats, AnalysisConfig(), ("pt", "simpo")).to_pydict()
    assert t["scaling_target"][0] == "simpo" and t["class"][0] == "simpo-only"
    assert abs(t["nu_eps"][0] - beta) < 0.01 and abs(t["nu_r"][0]) < 0.01
    assert t["robust"][0] == (beta < AnalysisConfig().nu_eps_max)
    assert t["class"][1] == "shared" and abs(t["nu_eps"][1] - 1) < 0.01
    # β measured for one pair is not silently reused for another
    with pytest.raises(ValueError, match="another pair"):
        latent_table(cc, latent_stats(cc, x.split(4096), pair=(0, 1)), AnalysisConfig(), ("pt", "simpo"))


def test_the_table_uses_the_targets_beta_was_measured_along():
    """A latent whose two decoder norms tie to rounding (never trained) may pick the other model
    when its norms are summed on another device: the table takes the measured targets rather than
    failing the whole analysis on a recomputation; stats of another pair are still refused."""
    cc, x = _three_models(0.3)
    stats = latent_stats(cc, x.split(4096), pair=(0, 2))
    want = latent_table(cc, stats, AnalysisConfig(), ("pt", "simpo")).to_pydict()
    flipped = stats.target.copy()
    flipped[1] = 2 if flipped[1] == 0 else 0  # the shared latent: as if the norms rounded the other way
    stats.target = flipped
    got = latent_table(cc, stats, AnalysisConfig(), ("pt", "simpo")).to_pydict()
    assert got["scaling_target"][1] != want["scaling_target"][1]
    assert got["scaling_target"][0] == want["scaling_target"][0] and got["nu_eps"][0] == want["nu_eps"][0]
    stats.pair = (0, 1)
    with pytest.raises(ValueError, match="another pair"):
        latent_table(cc, stats, AnalysisConfig(), ("pt", "simpo"))
    stats.pair, stats.target = None, np.where(flipped == 2, 1, flipped)  # a target outside the pair
    with pytest.raises(ValueError, match="another pair"):
        latent_table(cc, stats, AnalysisConfig(), ("pt", "simpo"))


def test_without_a_pair_both_only_cuts_apply():
    """The many-model rule uses the stricter of only_low and only_high: a latent the pair rule calls
    'other' (Δnorm 0.925 < only_high 0.95) is not a-only there either."""
    norms = np.array([[1.0], [0.15], [0.15]])
    cfg = AnalysisConfig(only_low=0.1, only_high=0.95)
    assert classify(norms, ["a", "b", "c"], cfg).tolist() == ["other"]
    assert classify(norms, ["a", "b", "c"], cfg, pair=(0, 1)).tolist() == ["other"]
    assert classify(norms, ["a", "b", "c"], AnalysisConfig()).tolist() == ["a-only"]


def test_a_reference_that_carries_the_direction_reversed_is_not_specific():
    cc, x = _constructed(-0.6, decoupled=False)
    t = latent_table(cc, latent_stats(cc, x.split(4096)), AnalysisConfig()).to_pydict()
    assert abs(t["nu_eps"][0] + 0.6) < 0.01 and not t["robust"][0]


def test_a_redone_analysis_leaves_none_of_the_old_one(tmp_path):
    """Redone with evidence and splice off, the old evidence, source masses and splice numbers go
    (the report and the label stage would read them as this analysis')."""
    from diffing.store import write_arrays
    from jobs.analyze import run_analyze

    cc, x = _constructed(0.5, False, n=3000)
    run = tmp_path / "run"
    cc.save(run / "crosscoder")
    st = write_arrays(str(tmp_path / "s"), x, model_names=["A", "B"])
    (run / "examples").mkdir()
    for name in ("examples/latents-00000.jsonl", "splice.json", "source_mass.parquet"):
        (run / name).write_text("old")
    run_analyze(run, st, AnalysisConfig(evidence=False), overwrite=True)
    assert (run / "latents.parquet").exists() and (run / "crosscoder" / "cfg.json").exists()
    assert not any((run / n).exists() for n in ("examples", "splice.json", "source_mass.parquet"))


def test_a_third_models_latent_is_not_the_pairs():
    """(pt, it) inside (pt, it, simpo): a SimPO-only latent, which pt and it barely write, is no
    pair class and stays out of the pair's Δnorm tails, whatever the ratio of its tiny norms."""
    from diffing.analysis import pair_writes

    cfg = AnalysisConfig()
    norms = np.array([[0.0, 1e-3, 1.0, 1.0], [0.0, 1e-4, 1.0, 0.02], [1.0, 1.0, 1.0, 0.1]])
    assert classify(norms, ["pt", "it", "simpo"], cfg, pair=(0, 1)).tolist() == [
        "other",
        "other",
        "shared",
        "pt-only",
    ]
    assert pair_writes(norms, 0, 1, cfg).tolist() == [False, False, True, True]
    assert pair_writes(norms[:2], 0, 1, cfg).all()  # two models: every latent is the pair's
    # the pair's stronger decoder against the strongest model's: below 2 * only_low (0.2) it is not the pair's
    edge = np.array([[0.15, 0.25], [0.1, 0.1], [1.0, 1.0]])
    assert pair_writes(edge, 0, 1, cfg).tolist() == [False, True]
    assert classify(edge, ["pt", "it", "simpo"], cfg, pair=(0, 1)).tolist() == ["other", "other"]


def test_latent_scaling_of_a_pair_in_three_models_matches_the_formula():
    """latent_stats (streamed, batch by batch) against β written out from its definition, for
    both pairs of a 3-model crosscoder."""
    from diffing.analysis import scaling_targets

    torch.manual_seed(0)
    cfg = CrosscoderConfig(n_models=3, d_model=24, n_latents=200, k=6, model_names=("a", "b", "c"), aux_k=8)
    cc = Crosscoder(cfg, seed=2)
    with torch.no_grad():
        cc.threshold.fill_(0.05)
        cc.b_dec.normal_()
    xs = [torch.randn(300, 3, 24) for _ in range(3)]
    for pair in [(0, 1), (0, 2)]:
        with torch.no_grad():
            W = cc.W_dec.float()
            M, L, _ = W.shape
            d = W[torch.as_tensor(scaling_targets(cc.decoder_norms(), *pair)), torch.arange(L)]
            own = torch.einsum("ld,mld->ml", d, W).double()
            num_eps, num_r = torch.zeros(M, L, dtype=torch.float64), torch.zeros(M, L, dtype=torch.float64)
            s_f2 = torch.zeros(L, dtype=torch.float64)
            for xb in xs:
                x = cc.normalise(xb)
                f = cc.encode(x)
                x_hat = cc.decode(f)
                f2 = f.pow(2).sum(0).double()
                s_f2 += f2
                for m in range(M):
                    num_eps[m] += (f * ((x - x_hat)[:, m] @ d.T)).sum(0).double() + f2 * own[m]
                    num_r[m] += (f * ((x_hat - cc.b_dec)[:, m] @ d.T)).sum(0).double()
            den = (d.pow(2).sum(-1).double() * s_f2).clamp_min(1e-12)
            st = latent_stats(cc, xs, pair=pair)
        live = st.freq > 0
        assert live.sum() > 100
        want_eps, want_r = (num_eps / den).numpy()[:, live], (num_r / den).numpy()[:, live]
        np.testing.assert_allclose(st.beta_eps[:, live], want_eps, rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(st.beta_r[:, live], want_r, rtol=1e-5, atol=1e-5)


def test_latent_stats_takes_the_pair_by_name_too():
    cc, x = _three_models(0.3)
    by_index = latent_stats(cc, x.split(4096), pair=(0, 2))
    by_name = latent_stats(cc, x.split(4096), pair=("pt", "simpo"))
    assert by_name.pair == (0, 2) and np.array_equal(by_name.beta_eps, by_index.beta_eps)
    with pytest.raises(ValueError, match="not one of the crosscoder's models"):
        latent_stats(cc, x.split(4096), pair=("pt", "sft"))
    with pytest.raises(ValueError, match="two different models: indices"):
        latent_stats(cc, x.split(4096), pair=(0, 3))
    with pytest.raises(ValueError, match=r"norms must be \[n_models=2"):
        classify(np.ones((3, 4)), ["a", "b"], AnalysisConfig())


def test_a_refit_is_told_apart_where_timestamps_are_coarse(tmp_path):
    """Weights rewritten with the same size and the same mtime (a filesystem with 1 s timestamps,
    a sub-second refit): the digest is of the new file, not the one cached for the old."""
    import os

    from diffing.analysis import fit_digest

    w = tmp_path / "run" / "crosscoder" / "model.safetensors"
    w.parent.mkdir(parents=True)
    w.write_bytes(b"a" * 64)
    first = fit_digest(tmp_path / "run")
    mtime = w.stat().st_mtime_ns
    w.write_bytes(b"b" * 64)
    os.utime(w, ns=(mtime, mtime))
    assert fit_digest(tmp_path / "run") != first
    old = time.time_ns() - 10**10  # settled files are hashed once per version
    os.utime(w, ns=(old, old))
    assert fit_digest(tmp_path / "run") == fit_digest(tmp_path / "run") != first
