"""The same math on a CUDA GPU as on the CPU: the training step, an in-process fit, a harvest, and the
Ray paths that ask for GPUs (Ray Train with NCCL, harvest actors with num_gpus). Skipped where no
GPU is visible (CI, laptops); run with `pytest -m gpu` on a GPU node (see docs/benchmarks.md)."""

import json
import os

import numpy as np
import pytest
import torch
from conftest import make_cfg, planted_fit_store

from diffing.config import FitConfig, TrainConfig
from diffing.crosscoder import Crosscoder
from diffing.fit import fit
from diffing.store import open_store
from diffing.train import TrainerState, train_step

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
    pytest.mark.timeout(600),
]


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.detach().double().cpu(), b.detach().double().cpu()
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


@pytest.fixture(autouse=True)
def _no_tf32():
    """fp32 parity needs full-precision matmuls; restore the caller's setting afterwards."""
    old = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = old


@pytest.mark.parametrize("bf16", [False, True])
def test_train_steps_on_cuda_match_cpu(bf16):
    torch.manual_seed(0)
    cfg = make_cfg(d_model=64, n_latents=512, k=8, aux_k=32, dead_after_tokens=256)
    xs = [torch.randn(256, 2, 64) for _ in range(5)]
    tc = TrainConfig(batch_size=256, lr=1e-3, bf16_autocast=bf16)
    cpu = TrainerState(Crosscoder(cfg, seed=1), tc, total_steps=5)
    gpu = TrainerState(Crosscoder(cfg, seed=1).cuda(), tc, total_steps=5)
    for x in xs:
        m_cpu, m_gpu = train_step(cpu, x), train_step(gpu, x)
        # fp32: rounding only; bf16 autocast: the matmul inputs carry 8 mantissa bits
        assert m_gpu["loss"] == pytest.approx(m_cpu["loss"], rel=3e-2 if bf16 else 1e-4)
    params = dict(cpu.model.named_parameters())
    for name, p in gpu.model.named_parameters():
        assert p.device.type == "cuda"
        # bf16: Adam's first steps amplify gradient rounding in weights with tiny gradients
        # (W_enc measured 0.027 after five steps on an H100)
        assert _rel(p, params[name]) < (5e-2 if bf16 else 1e-4), name
    assert gpu.tokens_seen == cpu.tokens_seen == 5 * 256


@pytest.fixture(scope="module")
def planted_store(tmp_path_factory):
    return planted_fit_store(tmp_path_factory.mktemp("gpu") / "store")


def _fit_cfg(device: str, workers: int = 0) -> FitConfig:
    return FitConfig.model_validate(
        {
            "crosscoder": {"n_latents": 128, "k": 3, "dead_after_tokens": 10_000},
            "train": {
                "batch_size": 512,
                "lr": 5e-3,
                "epochs": 2,
                "log_every": 5,
                "seed": 0,
                "device": device,
            },
            "distributed": {
                "workers": workers,
                "use_gpu": workers > 0 and device == "cuda",
                "cpus_per_worker": 1.0,
                "shuffle_buffer_rows": 0,
            },
        }
    )


def test_fit_on_cuda_matches_cpu(tmp_path, planted_store):
    store = open_store(planted_store)
    cpu = fit(store, _fit_cfg("cpu"), tmp_path / "cpu")
    gpu = fit(store, _fit_cfg("cuda"), tmp_path / "gpu")
    assert json.loads((tmp_path / "gpu" / "run_config.json").read_text())["fit"]["train"]["device"] == "cuda"
    assert gpu["steps"] == cpu["steps"]
    for m in ("A", "B"):  # bf16 autocast on the GPU, fp32 on the CPU: same quality, not same bits
        assert gpu["fve"][m] > 0.6 and abs(gpu["fve"][m] - cpu["fve"][m]) < 0.05, (cpu, gpu)
    assert abs(gpu["dead_fraction"] - cpu["dead_fraction"]) < 0.1
    # the saved crosscoder loads on the CPU (analysis runs there)
    cc = Crosscoder.load(tmp_path / "gpu" / "crosscoder")
    assert next(cc.parameters()).device.type == "cpu"


def test_harvest_on_cuda_matches_cpu(tmp_path, tiny_pair):
    from test_harvest import _cfg, _corpus

    from diffing.harvest import Harvester

    recs = _corpus(tmp_path / "c.jsonl", 9)
    rows = {}
    for dev in ("cpu", "cuda"):
        cfg = _cfg(tiny_pair, tmp_path / "c.jsonl", tmp_path / f"s{dev}", device=dev)
        rows[dev] = Harvester(cfg).run(recs, doc_id_start=0)
    for key in ("doc_id", "pos", "token_id"):
        assert np.array_equal(np.asarray(rows["cpu"][key]), np.asarray(rows["cuda"][key])), key
    assert _rel(rows["cuda"]["acts"].float(), rows["cpu"]["acts"].float()) < 1e-3


@pytest.fixture(scope="module")
def gpu_ray():
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    import ray

    if ray.is_initialized():  # the session's Ray (`make test` on a GPU node): it sees the GPUs itself
        assert ray.cluster_resources().get("GPU", 0) >= 1, "the running Ray has no GPU"
        yield
        return
    ray.init(num_cpus=8, num_gpus=1, include_dashboard=False, log_to_driver=False)
    try:
        yield
    finally:
        ray.shutdown()


@pytest.mark.ray
def test_ray_train_nccl_one_gpu_worker_matches_in_process(tmp_path, planted_store, gpu_ray):
    from jobs.fit import run_fit_ray

    inproc = fit(open_store(planted_store), _fit_cfg("cuda"), tmp_path / "inproc")
    ray1 = run_fit_ray(planted_store, _fit_cfg("cuda", workers=1), str(tmp_path / "ray"))
    assert ray1["steps"] == inproc["steps"] and ray1["workers"] == 1
    for m in ("A", "B"):  # Ray Data's order differs from the in-process reader's
        assert abs(ray1["fve"][m] - inproc["fve"][m]) < 0.05, (inproc, ray1)
    rows = [json.loads(x) for x in (tmp_path / "ray" / "metrics.jsonl").read_text().splitlines()]
    assert rows[-1]["step"] == ray1["steps"]


@pytest.mark.ray
def test_ray_harvest_on_a_gpu_actor(tmp_path, tiny_pair, gpu_ray):
    from test_harvest import _cfg, _corpus

    from diffing.harvest import Harvester
    from jobs.harvest import run_harvest

    recs = _corpus(tmp_path / "c.jsonl", 12)
    ray_cfg = {"num_actors": 1, "num_gpus_per_actor": 1.0, "num_cpus_per_actor": 1.0}
    cfg = _cfg(tiny_pair, tmp_path / "c.jsonl", tmp_path / "s", device="cuda", ray=ray_cfg)
    m = run_harvest(cfg)
    acts, meta = open_store(str(tmp_path / "s")).load()
    assert len(acts) == m.n_rows > 0
    ref = Harvester(_cfg(tiny_pair, tmp_path / "c.jsonl", tmp_path / "ref", device="cpu")).run(recs, 0)
    order = np.lexsort((meta["pos"], meta["doc_id"]))
    ref_order = np.lexsort((np.asarray(ref["pos"]), np.asarray(ref["doc_id"])))
    assert np.array_equal(np.asarray(meta["doc_id"])[order], np.asarray(ref["doc_id"])[ref_order])
    got = acts.float()[torch.from_numpy(order)]
    assert _rel(got, ref["acts"].float()[torch.from_numpy(ref_order)]) < 2e-3


def test_a_cuda_checkpoint_snapshot_lives_on_the_cpu_and_resumes_on_cuda(tmp_path):
    """state_dict() copies to the CPU (no second copy of weights and Adam state on the GPU) and a
    checkpoint loaded back onto the GPU resumes the same steps (the RNG state must be a CPU tensor)."""
    torch.manual_seed(0)
    xs = [torch.randn(64, 2, 16) for _ in range(6)]
    cfg = make_cfg(dead_after_tokens=100)
    tc = TrainConfig(batch_size=64, lr=1e-2)
    a = TrainerState(Crosscoder(cfg, seed=1).cuda(), tc, total_steps=6)
    for x in xs[:3]:
        train_step(a, x.cuda())
    snap = a.state_dict()
    assert all(v.device.type == "cpu" for v in snap["model"].values())
    torch.save(snap, tmp_path / "state.pt")
    m_a = [train_step(a, x.cuda()) for x in xs[3:]]
    b = TrainerState(Crosscoder(cfg, seed=99).cuda(), tc, total_steps=6)
    b.load_state_dict(torch.load(tmp_path / "state.pt", weights_only=False, map_location="cuda"))
    assert [train_step(b, x.cuda()) for x in xs[3:]] == m_a
