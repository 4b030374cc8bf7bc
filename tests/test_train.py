"""The training step's and the evaluation's reported numbers against hand-written references:
FVE (per step and over a pass), the BatchTopK inference threshold's EMA, and the normalisation a
fit starts from. The loss and gradients themselves are pinned in test_crosscoder.py."""

import math

import numpy as np
import pytest
import torch

from diffing.config import CrosscoderConfig, TrainConfig
from diffing.crosscoder import Crosscoder, fve, norm_scale_from_mean_norms
from diffing.train import TrainerState, evaluate, train_step


def _model(seed=0, k=4) -> Crosscoder:
    cfg = CrosscoderConfig(
        kind="batchtopk", n_models=2, d_model=8, n_latents=32, k=k, model_names=("A", "B"), aux_k=4
    )
    return Crosscoder(cfg, seed=seed)


def _offset_batch(n=512, seed=0) -> torch.Tensor:
    """Activations with a large mean: an FVE that forgets to subtract it reads close to 1."""
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 2, 8, generator=g) + torch.linspace(3, 10, 8)


def test_evaluate_fve_is_the_variance_explained_about_the_mean():
    cc = _model()
    x = _offset_batch()
    with torch.no_grad():  # an inference threshold, as after a fit (without one, batch top-k per batch)
        score = torch.relu(cc.encode_pre(cc.normalise(x))) * cc.decoder_norms().sum(0)
        cc.threshold.fill_(torch.quantile(score.flatten(), 0.9).item())
    ev = evaluate(cc, x.split(100))  # streamed in uneven batches: the same as one pass
    with torch.no_grad():
        xn = cc.normalise(x)
        want = fve(xn, cc.reconstruct(xn)).tolist()
    # the reference, written out: 1 - Σ_d Var(x_d - x̂_d) / Σ_d Var(x_d), per model
    assert ev["fve"]["A"] == pytest.approx(want[0], abs=1e-5)
    assert ev["fve"]["B"] == pytest.approx(want[1], abs=1e-5)
    assert ev["eval_tokens"] == 512
    # a decoder that writes only the mean explains nothing; one that rebuilds x exactly, everything
    with torch.no_grad():
        cc.W_dec.zero_()
        cc.b_dec.copy_(x.mean(0))
    assert [round(v, 6) for v in evaluate(cc, [x])["fve"].values()] == [0.0, 0.0]
    assert fve(x, x).tolist() == [1.0, 1.0]


def test_train_step_reports_the_fve_and_threshold_of_its_own_forward():
    """`fve/<model>` is the FVE of the batch's reconstruction before the update; the inference
    threshold is the bias-corrected EMA of the smallest kept BatchTopK score (a constant c gives
    c from the first step on, not (1 - momentum) * c)."""
    cc = _model(seed=1)
    state = TrainerState(cc, TrainConfig(lr=1e-3, steps=3, warmup_frac=0.0), total_steps=3)
    seen: list = []
    cc.register_forward_hook(lambda mod, args, out: seen.append((args[0].detach().clone(), out)))
    mom = cc.cfg.threshold_momentum
    ema = 0.0
    for step in range(3):
        m = train_step(state, _offset_batch(seed=step))
        xn, out = seen[-1]
        want = fve(xn, out.x_hat.detach().float()).tolist()
        assert m["fve/A"] == pytest.approx(want[0], abs=1e-5)
        assert m["fve/B"] == pytest.approx(want[1], abs=1e-5)
        ema = mom * ema + (1 - mom) * float(out.min_score)
        assert float(cc.threshold) == pytest.approx(ema / (1 - mom ** (step + 1)), rel=1e-6)
        if step == 0:
            assert float(cc.threshold) == pytest.approx(float(out.min_score), rel=1e-6)


def test_norm_scale_brings_each_model_to_mean_norm_sqrt_d(tmp_path):
    """c_m = √D / E‖x_m‖, per model: a model whose residual stream is 10× larger gets a 10× smaller
    scale, and both arrive at mean norm √D (what the loss and the k budget are tuned for)."""
    from diffing.fit import init_model
    from diffing.store import open_store, write_arrays

    g = torch.Generator().manual_seed(0)
    x = torch.randn(4000, 2, 8, generator=g)
    x[:, 1] *= 10.0
    store = open_store(
        write_arrays(
            str(tmp_path / "s"), x, model_names=["A", "B"], doc_ids=np.arange(4000) // 100, dtype="float32"
        ).uri
    )
    model = init_model(_model().cfg, store, seed=0, device=torch.device("cpu"))
    norms = model.normalise(x).norm(dim=-1).mean(0)
    np.testing.assert_allclose(norms.numpy(), [math.sqrt(8)] * 2, rtol=1e-3)
    assert float(model.norm_scale[0] / model.norm_scale[1]) == pytest.approx(10.0, rel=0.02)
    np.testing.assert_allclose(norm_scale_from_mean_norms([2.0, 20.0], 4).numpy(), [1.0, 0.1])
