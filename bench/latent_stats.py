"""Latent Scaling's statistics pass (`diffing.scaling.latent_stats`) over the entries an encode
keeps (the sparse path) against the dense decode and projections (the previous implementation,
still used for dense activations), interleaved in one process on the same batches. Also reports
the largest relative difference of the β estimates (the same sums, another accumulation order).

    python bench/latent_stats.py [--shapes demo,wide] [--repeats 5]
"""

from __future__ import annotations

import argparse
import json
import platform
import resource
import statistics
import time

import numpy as np
import torch

import diffing.scaling as sc
from diffing.config import CrosscoderConfig
from diffing.crosscoder import Crosscoder

SHAPES = {  # name: (n_models, d_model, n_latents, k, batch, batches)
    "demo": (2, 576, 2304, 32, 4096, 2),  # the embedded demo: SmolLM2-135M, 4x, k=32
    "wide": (2, 576, 16384, 32, 4096, 2),
    "three": (3, 1024, 16384, 64, 2048, 2),
}


def _model(M: int, D: int, L: int, k: int, x: torch.Tensor) -> Crosscoder:
    cfg = CrosscoderConfig(n_latents=L, k=k).resolve(
        n_models=M, d_model=D, model_names=tuple(f"m{i}" for i in range(M))
    )
    m = Crosscoder(cfg, seed=0)
    with torch.no_grad():  # a threshold keeping about k latents a token, as after a fit
        score = torch.relu(m.encode_pre(x[:512])) * m.decoder_norms().sum(0)
        m.threshold.fill_(torch.quantile(score.flatten()[::13], 1 - k / L).item())
    return m


def run(shape: str, repeats: int) -> dict:
    M, D, L, k, B, nb = SHAPES[shape]
    x = torch.randn(B * nb, M, D)
    m = _model(M, D, L, k, x)
    paths = {"sparse": sc.SPARSE_MAX_DENSITY, "dense": -1.0}
    times: dict[str, list[float]] = {n: [] for n in paths}
    outs = {}
    for r in range(repeats + 1):
        for name, density in paths.items():
            sc.SPARSE_MAX_DENSITY = density
            t = time.perf_counter()
            outs[name] = sc.latent_stats(m, x.split(B))
            if r:  # the first round warms up
                times[name].append(time.perf_counter() - t)
    sc.SPARSE_MAX_DENSITY = paths["sparse"]
    med = {n: statistics.median(t) for n, t in times.items()}
    a, b = outs["sparse"], outs["dense"]
    live = a.freq > 0
    rel = np.abs(a.beta_eps - b.beta_eps)[:, live] / np.maximum(np.abs(b.beta_eps[:, live]), 1e-3)
    return {
        "shape": {"n_models": M, "d_model": D, "n_latents": L, "k": k, "batch": B, "batches": nb},
        "kept_per_token": round(float(a.freq.sum()), 1),
        "ms_per_batch": {n: round(v * 1000 / nb, 1) for n, v in med.items()},
        "speedup": round(med["dense"] / med["sparse"], 2),
        "max_rel_diff_beta_eps": float(rel.max()) if rel.size else 0.0,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--shapes", default="demo,wide,three")
    ap.add_argument("--repeats", type=int, default=5)
    a = ap.parse_args()
    res = {
        "machine": platform.processor() or platform.machine(),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "results": [run(s, a.repeats) for s in a.shapes.split(",")],
        "max_rss_gib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 2),
    }
    print(json.dumps(res, indent=2))


if __name__ == "__main__":
    main()
