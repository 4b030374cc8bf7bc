"""The crosscoder against a naive dense reference, plus persistence and resume."""

import typing

import pytest
import torch
from conftest import make_cfg

from diffing.config import CrosscoderConfig, TrainConfig
from diffing.crosscoder import Crosscoder, geometric_median
from diffing.reference import DenseCrosscoder
from diffing.train import TrainerState, train_step


def _pair(seed=0, **kw):
    cfg = make_cfg(**kw)
    cc = Crosscoder(cfg, seed=seed)
    with torch.no_grad():  # non-trivial biases and uneven decoder norms
        cc.b_enc.normal_(0, 0.1)
        cc.b_dec.normal_(0, 0.1)
        cc.W_dec.mul_(torch.rand(cc.W_dec.shape[:2])[..., None] * 2)
    ref = DenseCrosscoder(cfg.n_models, cfg.d_model, cfg.n_latents, cfg.k, cfg.auxk_alpha, cfg.aux_k)
    ref.load_state_dict({k: v for k, v in cc.state_dict().items() if k in dict(ref.named_parameters())})
    return cc, ref


@pytest.mark.parametrize("aux_path", ["dense", "sparse"])
def test_batchtopk_matches_dense_reference_outputs_and_grads(monkeypatch, aux_path):
    import diffing.crosscoder

    # AuxK decodes over the dead latents densely or with embedding_bag, by the share it keeps
    monkeypatch.setattr(diffing.crosscoder, "AUXK_DENSE_MIN_DENSITY", 0.0 if aux_path == "dense" else 2.0)
    torch.manual_seed(0)
    cc, ref = _pair()
    x = torch.randn(32, 2, 16)
    dead = torch.zeros(64, dtype=torch.bool)
    dead[::3] = True
    out = cc(x, dead_mask=dead)
    loss_ref, x_hat_ref, f_ref = ref(x, dead_mask=dead)
    assert torch.allclose(out.acts.to_dense(64), f_ref, atol=1e-5)
    assert torch.allclose(out.x_hat, x_hat_ref, atol=1e-5)
    assert torch.allclose(out.loss, loss_ref, rtol=1e-5)
    # exactly k*B entries kept (all positive here), the top ones by score
    assert out.acts.vals.numel() == 4 * 32
    # the AuxK term's own gradients (a 1/32 share of the loss's would hide under the tolerance below):
    # it trains the dead latents toward the residual error, which it must not move itself
    alpha = cc.cfg.auxk_alpha
    aux_ref = (loss_ref - (x - x_hat_ref).pow(2).sum((1, 2)).mean()) / alpha
    params = dict(ref.named_parameters())
    g_cc = torch.autograd.grad(
        out.aux, [getattr(cc, n) for n in params], retain_graph=True, allow_unused=True
    )
    g_ref = torch.autograd.grad(aux_ref, list(params.values()), retain_graph=True, allow_unused=True)
    for name, a, b in zip(params, g_cc, g_ref, strict=True):
        a = torch.zeros_like(params[name]) if a is None else a
        b = torch.zeros_like(params[name]) if b is None else b
        assert torch.allclose(a, b, atol=1e-4, rtol=1e-3), name
    out.loss.backward()
    loss_ref.backward()
    for name, p in ref.named_parameters():
        assert torch.allclose(getattr(cc, name).grad, p.grad, atol=1e-4, rtol=1e-4), name


def test_l1_forward_matches_formula():
    torch.manual_seed(1)
    cc, _ = _pair(kind="l1", l1_coeff=0.5)
    x = torch.randn(8, 2, 16)
    out = cc(x, l1_coeff=0.5)
    pre = torch.einsum("bmd,mdl->bl", x, cc.W_enc) + cc.b_enc
    f = torch.relu(pre)
    x_hat = torch.einsum("bl,mld->bmd", f, cc.W_dec) + cc.b_dec
    penalty = (f * cc.W_dec.norm(dim=-1).sum(0)).sum(-1).mean()
    want = (x - x_hat).pow(2).sum((1, 2)).mean() + 0.5 * penalty
    assert torch.allclose(out.loss, want, rtol=1e-5)


def test_threshold_encoding_matches_batch_topk_on_training_like_data():
    from diffing.config import CrosscoderConfig
    from diffing.synthetic import make_planted

    planted = make_planted(16, n_shared=24, n_only=(8, 8), mean_active=3, seed=3)
    x = torch.from_numpy(planted.sample(40_000, seed=4))
    cfg = CrosscoderConfig(
        n_models=2, d_model=16, n_latents=64, k=3, model_names=("A", "B"), aux_k=8, dead_after_tokens=5000
    )
    cc = Crosscoder(cfg, seed=0)
    state = TrainerState(cc, TrainConfig(batch_size=512, lr=1e-2), total_steps=300)
    g = torch.Generator().manual_seed(5)  # the same batches whichever tests ran before
    for _step in range(300):
        idx = torch.randint(0, 40_000, (512,), generator=g)
        train_step(state, x[idx])
    test = x[:4096]
    f_thr = cc.encode(test)
    f_top = cc.batch_topk(cc.encode_pre(test), cfg.k, cc.decoder_norms().sum(0))[0].to_dense(64)
    l0_thr = (f_thr > 0).float().sum(-1).mean().item()
    assert abs(l0_thr - cfg.k) / cfg.k < 0.15, l0_thr
    agree = ((f_thr > 0) == (f_top > 0)).float().mean().item()
    assert agree > 0.98
    # batch-independent: encoding a token alone gives the same result as in a batch
    assert torch.allclose(cc.encode(test[:1]), f_thr[:1])


def test_save_load_roundtrip(tmp_path):
    cc, _ = _pair(seed=5)
    cc.threshold.fill_(0.7)
    cc.norm_scale.copy_(torch.tensor([2.0, 3.0]))
    cc.save(tmp_path / "cc")
    back = Crosscoder.load(tmp_path / "cc")
    assert back.cfg == cc.cfg
    for k, v in cc.state_dict().items():
        assert torch.equal(v, back.state_dict()[k]), k
    assert back.W_dec.shape == (2, 64, 16)  # [n_models, n_latents, d_model]
    x = torch.randn(5, 2, 16)
    assert torch.equal(cc.encode(x), back.encode(x))


def test_load_holds_one_copy_of_the_weights(tmp_path):
    """The file's tensors become the parameters: the peak is one copy of the weights, not two
    (10 GB each at the Gemma shape), and they are still trainable parameters."""
    import subprocess
    import sys

    from diffing.config import CrosscoderConfig

    cfg = CrosscoderConfig(n_latents=16384, k=8).resolve(n_models=2, d_model=2048, model_names=("a", "b"))
    Crosscoder(cfg, seed=None).save(tmp_path / "cc")  # 2 x 2 x 16384 x 2048 floats: 512 MiB
    code = f"""
import resource, torch
from diffing.crosscoder import Crosscoder
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss >> 10
cc = Crosscoder.load({str(tmp_path / "cc")!r})
assert isinstance(cc.W_dec, torch.nn.Parameter) and cc.W_dec.requires_grad and cc.W_dec.shape == (2, 16384, 2048)
print((resource.getrusage(resource.RUSAGE_SELF).ru_maxrss >> 10) - before)
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert int(out.stdout.split()[-1]) < 1.4 * 512, out.stdout  # MiB of peak growth: 1024 before


KINDS = typing.get_args(CrosscoderConfig.model_fields["kind"].annotation)


@pytest.mark.parametrize("kind", KINDS)
def test_export_raw_acts_on_raw_activations(kind):
    """Every kind: the exported raw-unit weights give encode's activations and reconstruction."""
    cc, _ = _pair(seed=6, kind=kind)
    if kind == "batchtopk":  # untrained: no threshold to export (0 would keep everything)
        with pytest.raises(ValueError, match="no inference threshold"):
            cc.export_raw()
    cc.norm_scale.copy_(torch.tensor([0.5, 4.0]))
    cc.threshold.fill_(0.05)
    x_raw = torch.randn(7, 2, 16) * 3
    f = cc.encode(x_raw, normalised=False)
    w = cc.export_raw()
    assert ("act_threshold" in w) == (kind == "batchtopk")
    pre = torch.einsum("bmd,mdl->bl", x_raw, w["W_enc"]) + w["b_enc"]
    f_raw = torch.relu(pre) * (torch.relu(pre) > w.get("act_threshold", 0.0))
    assert (f > 0).any() and ((f > 0).float().mean() < 1 if kind == "batchtopk" else True)
    assert torch.allclose(f, f_raw, atol=1e-5)
    x_hat_raw = torch.einsum("bl,mld->bmd", f_raw, w["W_dec"]) + w["b_dec"]
    assert torch.allclose(cc.reconstruct(x_raw, normalised=False), x_hat_raw, atol=1e-4)


def test_state_dict_resume_gives_same_next_step():
    torch.manual_seed(0)
    xs = [torch.randn(64, 2, 16) for _ in range(6)]
    cfg = make_cfg(dead_after_tokens=100)
    tc = TrainConfig(batch_size=64, lr=1e-2)

    a = TrainerState(Crosscoder(cfg, seed=1), tc, total_steps=6)
    for x in xs[:3]:
        train_step(a, x)
    snapshot = a.state_dict()
    m_a = [train_step(a, x) for x in xs[3:]]

    b = TrainerState(Crosscoder(cfg, seed=99), tc, total_steps=6)
    b.load_state_dict(snapshot)
    m_b = [train_step(b, x) for x in xs[3:]]
    assert m_a == m_b
    for k, v in a.model.state_dict().items():
        assert torch.equal(v, b.model.state_dict()[k]), k
    assert torch.equal(a.since_fired, b.since_fired)


def test_dead_counters_reduce_across_ranks():
    """A latent that fired on any rank is alive on every rank."""
    cfg = make_cfg(dead_after_tokens=10**9)
    tc = TrainConfig(batch_size=8, lr=1e-3)
    state = TrainerState(Crosscoder(cfg, seed=0), tc, total_steps=10)
    other_rank_fired = torch.zeros(64)
    other_rank_fired[63] = 1.0

    def fake_allreduce(t, op):
        if op == "max" and t.shape == (64,):
            return torch.maximum(t, other_rank_fired)
        if op == "sum" and t.ndim == 0:
            return t * 2  # two ranks with equal batches
        return t

    train_step(state, torch.randn(8, 2, 16), reduce=fake_allreduce)
    assert state.since_fired[63] == 0
    assert state.tokens_seen == 16
    assert int(state.since_fired.max()) == 16


def test_geometric_median_is_robust_to_outliers():
    torch.manual_seed(0)
    x = torch.randn(2000, 2, 8) * 0.1 + 1.0
    x[:50] += 1000.0  # a few huge outliers drag the mean, not the median
    gm = geometric_median(x)
    assert (gm - 1.0).abs().max() < 0.05
    assert (x.mean(0) - 1.0).abs().max() > 10


def test_topk_indices_is_exact():
    from diffing.crosscoder import topk_indices

    g = torch.Generator().manual_seed(0)
    for N, n in [(100, 7), (200_000, 3000), (300_000, 299_000)]:
        flat = torch.relu(torch.randn(N, generator=g)) * torch.rand(N, generator=g)
        got = topk_indices(flat, n)
        want = torch.topk(flat, n).indices
        assert got.numel() == n
        assert torch.equal(flat[got].sort().values, flat[want].sort().values)
    # adversarial: the sample sees only small values, so the fast path must fall back
    flat = torch.zeros(100_000)
    flat[1::31] = 0.0
    flat[5:2005] = torch.linspace(1, 2, 2000)
    got = topk_indices(flat, 1500)
    assert torch.equal(flat[got].sort().values, torch.topk(flat, 1500).values.sort().values)


def test_final_evaluation_reads_the_last_shards_first(tmp_path):
    """Ordered readers train on the first rows during warmup; the run's FVE must not come from them."""
    from diffing.fit import final_metrics
    from diffing.store import open_store, write_arrays
    from diffing.train import evaluate

    torch.manual_seed(0)
    x = torch.randn(3000, 2, 16)
    x[:1000] *= 5  # the first shard looks different: an evaluation over it would show
    store = open_store(write_arrays(str(tmp_path / "s"), x, model_names=["A", "B"], shard_rows=1000).uri)
    cc = Crosscoder(make_cfg(), seed=0)
    cc.threshold.fill_(0.05)  # batch-independent encoding, so L0 follows the rows' scale
    state = TrainerState(cc, TrainConfig(batch_size=100, lr=1e-3, eval_tokens=800), total_steps=1)
    got = final_metrics(cc, store, state, tokens_per_s=0.0, last_loss=None)
    last = evaluate(cc, [x[2000:2400].half(), x[2400:2800].half()])  # eval batches: 4 x train batch
    first = evaluate(cc, [x[0:400].half(), x[400:800].half()])
    assert got["eval_tokens"] == 800
    assert got["fve"] == pytest.approx(last["fve"], rel=1e-6)
    assert got["l0"] == pytest.approx(last["l0"], rel=1e-6)
    assert abs(first["l0"] - last["l0"]) > 1  # the test can tell the shards apart


def test_a_snapshot_is_a_copy_on_the_cpu():
    torch.manual_seed(0)
    cfg = make_cfg(dead_after_tokens=100)
    a = TrainerState(Crosscoder(cfg, seed=1), TrainConfig(batch_size=64, lr=1e-2), total_steps=4)
    train_step(a, torch.randn(64, 2, 16))
    snap = a.state_dict()
    before = {k: v.clone() for k, v in snap["model"].items()}
    lr = snap["optimizer"]["param_groups"][0]["lr"]
    train_step(a, torch.randn(64, 2, 16))
    assert all(torch.equal(before[k], v) for k, v in snap["model"].items())  # later steps leave it alone
    assert snap["optimizer"]["param_groups"][0]["lr"] == lr
    assert all(v.device.type == "cpu" for v in snap["model"].values())


def test_inference_takes_any_float_dtype_and_names_a_wrong_shape():
    """Store batches are float16, user arrays float64 or numpy: encode casts them; a batch of the
    wrong models or width is refused naming the expected shape, not deep inside a matmul."""
    import numpy as np

    cc = Crosscoder(make_cfg(kind="l1"), seed=0)
    with torch.no_grad():
        cc.norm_scale.copy_(torch.tensor([0.5, 2.0]))
    x = torch.randn(32, 2, 16).half()
    want = cc.encode(x.float(), normalised=False)
    for xi in (x, x.double(), x.float().numpy(), x.bfloat16().float()):
        got = cc.encode(xi, normalised=False)
        assert torch.allclose(got, want, atol=5e-2 if xi is not x else 0)
    assert torch.equal(cc.encode(x.float() * cc.norm_scale[None, :, None]), cc.encode(x, normalised=False))
    assert cc.reconstruct(np.asarray(x.float()), normalised=False).shape == (32, 2, 16)
    for bad in (torch.randn(4, 3, 16), torch.randn(4, 2, 8), torch.randn(2, 16)):
        with pytest.raises(ValueError, match=r"x must be \[batch, n_models=2, d_model=16\]"):
            cc.encode(bad)
