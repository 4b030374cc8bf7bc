"""Sparse decode (forward + backward into W_dec) of BatchTopK's kept entries: crossdiff's single
embedding_bag over W_dec viewed [M * L, D] against one embedding_bag per model on W_dec[m] (the
previous implementation, kept here as the baseline), interleaved in one process. Also reports the
largest difference of outputs and gradients (the same sums, another accumulation order).

    python bench/sparse_decode.py [--shapes demo,wide] [--repeats 7]
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time

import torch
import torch.nn.functional as F

from diffing.config import CrosscoderConfig
from diffing.crosscoder import Crosscoder

SHAPES = {  # name: (n_models, d_model, n_latents, k, batch)
    "demo": (2, 576, 2304, 32, 1024),  # the embedded demo: SmolLM2-135M, 4x, k=32
    "wide": (2, 576, 16384, 32, 1024),
    "three": (3, 1024, 16384, 64, 512),
}


def per_model(m: Crosscoder, acts) -> torch.Tensor:
    parts = [
        F.embedding_bag(acts.cols, m.W_dec[i], acts.offsets, mode="sum", per_sample_weights=acts.vals)
        for i in range(m.cfg.n_models)
    ]
    return torch.stack(parts, dim=1) + m.b_dec


def run(shape: str, repeats: int) -> dict:
    M, D, L, k, B = SHAPES[shape]
    cfg = CrosscoderConfig(n_latents=L, k=k).resolve(
        n_models=M, d_model=D, model_names=tuple(f"m{i}" for i in range(M))
    )
    m = Crosscoder(cfg, seed=0)
    x = torch.randn(B, M, D)
    pre = m.encode_pre(x)
    acts, _ = m.batch_topk(pre, k, m.decoder_norms().sum(0))
    fns = {"crossdiff": lambda: m.decode_sparse(acts), "per_model": lambda: per_model(m, acts)}
    times: dict[str, list[float]] = {n: [] for n in fns}
    outs = {}
    for r in range(repeats + 1):
        for name, fn in fns.items():
            t = time.perf_counter()
            y = fn()
            g = torch.autograd.grad(y.pow(2).sum(), [m.W_dec, m.W_enc], retain_graph=True)
            if r:  # the first round warms up
                times[name].append(time.perf_counter() - t)
            outs[name] = (y.detach(), g)
    (ya, ga), (yb, gb) = outs["crossdiff"], outs["per_model"]
    med = {n: statistics.median(t) for n, t in times.items()}
    return {
        "shape": {"n_models": M, "d_model": D, "n_latents": L, "k": k, "batch": B},
        "ms": {n: round(v * 1000, 1) for n, v in med.items()},
        "speedup": round(med["per_model"] / med["crossdiff"], 2),
        "max_abs_diff": {
            "out": float((ya - yb).abs().max()),
            "grad_W_dec": float((ga[0] - gb[0]).abs().max()),
            "grad_W_enc": float((ga[1] - gb[1]).abs().max()),
        },
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--shapes", default="demo,wide,three")
    ap.add_argument("--repeats", type=int, default=7)
    a = ap.parse_args()
    res = {
        "machine": platform.processor() or platform.machine(),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "results": [run(s, a.repeats) for s in a.shapes.split(",")],
    }
    print(json.dumps(res, indent=2))


if __name__ == "__main__":
    main()
