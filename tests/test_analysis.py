"""Δnorm, classes and Latent Scaling against constructed ground truth."""

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


def test_truly_specific_latent_is_robust():
    cc, x = _constructed(0.0, decoupled=False)
    t = latent_table(cc, latent_stats(cc, x.split(4096)), AnalysisConfig()).to_pydict()
    assert t["robust"][0] and abs(t["nu_eps"][0]) < 0.01


def test_firing_stats():
    cc, x = _constructed(0.5, False)
    stats = latent_stats(cc, x.split(1000))
    f0 = x[:, 1, 0].numpy()
    assert abs(stats.freq[0] - (f0 > 0).mean()) < 1e-6
    assert abs(stats.mean_act[0] - f0[f0 > 0].mean()) < 1e-4
    assert stats.n_tokens == len(x)


def test_tail_selection_ranks_live_latents(tmp_path):
    cc, x = _constructed(0.5, True)
    cfg = AnalysisConfig(tail_frac=0.34)
    t = latent_table(cc, latent_stats(cc, x.split(4096)), cfg).to_pydict()
    assert t["tail"] == ["low", "", "high"]  # latent 0 lowest Δnorm (B-only), latent 2 highest (A-only)


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
