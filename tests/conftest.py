import os

import pytest

os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("CROSSDIFF_LOG_JSON", "0")
os.environ.setdefault("VLLM_NO_USAGE_STATS", "1")  # tests use no network, vLLM's report included


@pytest.fixture(autouse=True, scope="session")
def _torch_threads():
    import torch

    torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))
    yield


@pytest.fixture
def cpu_bf16(monkeypatch):
    """``cpu_bf16(flag)``: make this CPU report native bfloat16 (AVX512-BF16) or not."""
    import torch

    def set_native(flag: bool) -> None:
        monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: flag)
        monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: False)

    return set_native


def make_cfg(**kw):
    from diffing.config import CrosscoderConfig

    base = dict(n_models=2, d_model=16, n_latents=64, k=4, model_names=("A", "B"), aux_k=8)
    base.update(kw)
    return CrosscoderConfig(**base)


def pipeline_dict(out: str, **kw) -> dict:
    """A minimal pipeline config dict (models and corpus need not exist; stages are stubbed)."""
    d = {
        "out": out,
        "harvest": {
            "models": [{"name": "a", "path": "/m/a"}, {"name": "b", "path": "/m/b"}],
            "layer": 1,
            "corpus": {"uri": "/c.jsonl"},
        },
    }
    d.update(kw)
    return d


def planted_fit_store(path) -> str:
    """The fit tests' store: 30,000 planted rows (d_model 32, 80 features), 6 shards."""
    from diffing.store import write_arrays
    from diffing.synthetic import make_planted

    planted = make_planted(32, n_shared=48, n_only=(16, 16), mean_active=3, seed=0)
    import numpy as np

    rows = planted.sample(30_000, seed=1)
    write_arrays(str(path), rows, model_names=["A", "B"], doc_ids=np.arange(30_000) // 100, shard_rows=5000)
    return str(path)


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def s3_endpoint():
    """A real HTTP S3 endpoint (moto) on 127.0.0.1; yields its URL with bucket `crossdiff-test`."""
    from moto.server import ThreadedMotoServer

    port = free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port)
    server.start()
    url = f"http://127.0.0.1:{port}"
    env = {
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing",
        "AWS_DEFAULT_REGION": "us-east-1",
        "AWS_ENDPOINT_URL": url,
    }
    old = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    import boto3

    boto3.client("s3", endpoint_url=url).create_bucket(Bucket="crossdiff-test")
    try:
        yield url
    finally:
        server.stop()
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


@pytest.fixture(scope="session")
def ray_cluster(s3_endpoint):
    """A local Ray for the session (4 logical CPUs: 1-CPU actors on 2 cores would starve reads).
    Starts after the S3 endpoint so workers inherit its AWS_* settings. Its native threads run for
    the rest of the session: measure memory with tracemalloc in a child process, never in this
    one (tracemalloc.stop() racing a native thread's allocation segfaults Python 3.11,
    cpython gh-128679)."""
    import ray

    ray.init(num_cpus=4, include_dashboard=False, log_to_driver=False)
    try:
        yield ray.get_runtime_context().gcs_address
    finally:
        ray.shutdown()


@pytest.fixture(scope="session")
def tiny_pair(tmp_path_factory):
    """The tiny random Llama pair with the offline byte tokenizer (seconds to build, cached)."""
    from diffing.embedded.tiny import TinyConfig, build_tiny_pair

    return build_tiny_pair(config=TinyConfig(tokenizer="bytes"))


def identity_crosscoder(d_model: int, n_latents: int):
    """L1 crosscoder whose latent l reads coordinate l of model B with weight 1 (f_l = relu(x_B[l]))
    and decodes it to both models: the activations written to a store are the latents' own."""
    import torch

    from diffing.config import CrosscoderConfig
    from diffing.crosscoder import Crosscoder

    cfg = CrosscoderConfig(
        kind="l1", n_models=2, d_model=d_model, n_latents=n_latents, model_names=("A", "B"), aux_k=1
    )
    cc = Crosscoder(cfg, seed=None)
    with torch.no_grad():
        for p in cc.parameters():
            p.zero_()
        for lat in range(n_latents):
            cc.W_enc[1, lat, lat] = 1.0
            cc.W_dec[1, lat, lat] = 1.0
            cc.W_dec[0, lat, lat] = 0.5
    return cc
