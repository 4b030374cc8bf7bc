"""Splice evaluation on the tiny Llama pair with constructed crosscoders of known faithfulness."""

import numpy as np
import pytest
import torch

from diffing.config import CrosscoderConfig
from diffing.crosscoder import Crosscoder
from diffing.splice import splice_eval

LAYER = 1


def _identity_crosscoder(D: int, names=("base", "ft")) -> Crosscoder:
    """L1 crosscoder with 2 latents per coordinate per model (+e_i and −e_i): relu makes it exact."""
    M = len(names)
    cfg = CrosscoderConfig(kind="l1", n_models=M, d_model=D, n_latents=2 * M * D, model_names=names, aux_k=1)
    cc = Crosscoder(cfg, seed=None)
    with torch.no_grad():
        for p in cc.parameters():
            p.zero_()
        eye = torch.eye(D)
        for m in range(M):
            plus = slice(2 * m * D, 2 * m * D + D)
            minus = slice(2 * m * D + D, 2 * (m + 1) * D)
            cc.W_enc[m, :, plus] = eye
            cc.W_enc[m, :, minus] = -eye
            cc.W_dec[m, plus] = eye
            cc.W_dec[m, minus] = -eye
        cc.norm_scale.copy_(torch.tensor([0.5, 2.0]))  # normalisation must cancel out
    return cc


@pytest.fixture(scope="module")
def pair(tiny_pair):
    from diffing.models import load_model, load_tokenizer

    base, ft = tiny_pair
    tok = load_tokenizer(str(base))
    texts = ["The quick brown fox jumps over the lazy dog.", "Crosscoders compare two models.", "Hello!"]
    prompts = [tok(t)["input_ids"] for t in texts]
    return [load_model(str(base)), load_model(str(ft))], prompts, tok.pad_token_id


def test_perfect_reconstruction_recovers_everything(pair):
    models, prompts, pad = pair
    D = models[0].config.hidden_size
    cc = _identity_crosscoder(D)
    res = splice_eval(models, cc, LAYER, prompts, pad_id=pad, batch_size=2)
    assert res["n_tokens"] == sum(len(p) - 2 for p in prompts)  # skip_first=1, last token has no target
    for name in ("base", "ft"):
        r = res["models"][name]
        assert r["ce_zero"] - r["ce_clean"] > 1e-3  # zero ablation hurts
        assert abs(r["full"]["delta_ce"]) < 1e-4 and r["full"]["kl"] < 1e-6
        assert r["full"]["ce_recovered"] == pytest.approx(1.0, abs=1e-2)


def test_zero_reconstruction_equals_zero_ablation(pair):
    models, prompts, pad = pair
    cc = _identity_crosscoder(models[0].config.hidden_size)
    with torch.no_grad():
        cc.W_dec.zero_()
    res = splice_eval(models, cc, LAYER, prompts, pad_id=pad)
    for r in res["models"].values():
        assert r["full"]["ce"] == pytest.approx(r["ce_zero"], abs=1e-5)
        assert r["full"]["ce_recovered"] == pytest.approx(0.0, abs=1e-3)
        assert r["full"]["kl"] > 0


def test_shared_only_drops_what_the_dropped_latents_carry(pair):
    """Dropping every latent that reads model 'ft' zeroes ft's reconstruction but leaves base's."""
    models, prompts, pad = pair
    D = models[0].config.hidden_size
    cc = _identity_crosscoder(D)
    ft_latents = np.arange(2 * D, 4 * D).tolist()
    res = splice_eval(models, cc, LAYER, prompts, drop_latents=ft_latents, pad_id=pad)
    base, ft = res["models"]["base"], res["models"]["ft"]
    assert base["shared_only"]["ce_recovered"] == pytest.approx(1.0, abs=1e-2)
    assert ft["shared_only"]["ce_recovered"] == pytest.approx(0.0, abs=1e-3)
    assert ft["full"]["ce_recovered"] == pytest.approx(1.0, abs=1e-2)


def test_splice_rejects_wrong_model_count(pair):
    models, prompts, pad = pair
    with pytest.raises(ValueError, match="2 models|1 models"):
        splice_eval(models[:1], _identity_crosscoder(models[0].config.hidden_size), LAYER, prompts)
