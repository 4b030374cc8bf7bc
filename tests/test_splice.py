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


def test_loss_math_in_row_chunks_equals_the_whole_and_a_reference(pair, monkeypatch):
    """CE and KL over row chunks (Gemma's 256k vocabulary) give what one pass over all rows gives,
    and KL(clean ‖ spliced) matches its definition written out."""
    import torch.nn.functional as F

    import diffing.splice as sp

    models, prompts, pad = pair
    cc = _identity_crosscoder(models[0].config.hidden_size)
    with torch.no_grad():
        cc.W_dec.mul_(0.7)  # a lossy reconstruction: KL and ΔCE away from 0
    whole = splice_eval(models, cc, LAYER, prompts, drop_latents=[0, 1], pad_id=pad)
    monkeypatch.setattr(sp, "_LOSS_CHUNK_FLOATS", models[0].config.vocab_size * 3)  # 3 rows a chunk
    chunked = splice_eval(models, cc, LAYER, prompts, drop_latents=[0, 1], pad_id=pad)
    for name, r in whole["models"].items():
        assert r["full"]["kl"] > 1e-4
        for v in ("full", "shared_only"):
            for k in ("ce", "kl"):
                assert chunked["models"][name][v][k] == pytest.approx(r[v][k], rel=1e-5, abs=1e-7)
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(7, 50, generator=g), torch.randn(7, 50, generator=g)
    t = torch.randint(0, 50, (7,), generator=g)
    monkeypatch.setattr(sp, "_LOSS_CHUNK_FLOATS", 100)  # 2 rows a chunk, the last one alone
    ce, kl = sp._ce_kl(b, t, F.log_softmax(a, -1))
    pa, pb = F.softmax(a, -1), F.softmax(b, -1)
    assert ce == pytest.approx(float(F.cross_entropy(b, t, reduction="sum")), rel=1e-5)
    assert kl == pytest.approx(float((pa * (pa.log() - pb.log())).sum()), rel=1e-5)


def test_prompts_with_nothing_to_splice_are_refused(pair):
    models, prompts, pad = pair
    cc = _identity_crosscoder(models[0].config.hidden_size)
    with pytest.raises(ValueError, match="needs prompts longer than"):
        splice_eval(models, cc, LAYER, prompts, pad_id=pad, keep=[[False] * len(p) for p in prompts])


def test_splice_rejects_wrong_model_count(pair):
    models, prompts, pad = pair
    with pytest.raises(ValueError, match="2 models|1 models"):
        splice_eval(models[:1], _identity_crosscoder(models[0].config.hidden_size), LAYER, prompts)


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_analyze_on_a_harvested_store_gives_text_contexts_and_splice(tmp_path, tiny_pair):
    """Harvest the tiny pair in-process, fit nothing (exact crosscoder), then `run_analyze` with
    evidence and splice: contexts decode to corpus text; the exact crosscoder recovers all CE."""
    import json

    from diffing.config import AnalysisConfig
    from diffing.evidence import iter_evidence
    from diffing.harvest import HarvestConfig, Harvester
    from diffing.store import StoreWriter
    from jobs.analyze import run_analyze

    base, ft = tiny_pair
    texts = [f"Document {i}: the quick brown fox jumps over {i} lazy dogs." for i in range(12)]
    cfg = HarvestConfig.model_validate(
        dict(
            models=[{"name": "base", "path": str(base)}, {"name": "ft", "path": str(ft)}],
            layer=LAYER,
            corpus={"uri": "unused.jsonl"},
            store=str(tmp_path / "store"),
            context_length=64,
            outlier_norm_mult=None,
            store_dtype="float32",
        )
    )
    h = Harvester(cfg)
    writer = StoreWriter(
        cfg.store,
        model_names=["base", "ft"],
        d_model=h.d_model,
        layer=LAYER,
        extra_columns=["source"],
        metadata={"harvest": cfg.model_dump(mode="json")},
        dtype="float32",
    )
    for s in range(2):
        recs = [{"id": str(i), "source": f"src{i % 2}", "text": texts[i]} for i in range(6 * s, 6 * s + 6)]
        rows = h.run(recs, 6 * s)
        writer.write_shard(
            f"{s:05d}",
            rows["acts"].numpy(),
            doc_ids=rows["doc_id"],
            positions=rows["pos"],
            token_ids=rows["token_id"],
            extra={"source": rows["source"]},
        )
    writer.finalize()
    run = tmp_path / "run"
    _identity_crosscoder(h.d_model).save(run / "crosscoder")
    acfg = AnalysisConfig(heldout="all", splice=True, splice_prompts=6, tail_frac=0.05, n_top=3, window=5)
    summary = run_analyze(run, cfg.store, acfg)
    assert summary["groups"]["base-specific"] > 0 and summary["examples"]
    for name in ("base", "ft"):
        assert summary["splice"][name]["ce_recovered"] == pytest.approx(1.0, abs=0.02)
    res = json.loads((run / "splice.json").read_text())
    assert res["n_prompts"] == 6 and res["dropped_latents"] > 0
    ev = list(iter_evidence(run))
    n_checked = 0
    for e in ev:
        for x in e.top:
            window = "".join(x.tokens)
            assert window in texts[x.doc_id]  # byte tokens decode back to the corpus text
            assert x.source == f"src{x.doc_id % 2}"
            n_checked += 1
    assert n_checked > 0
