"""Analyze's statistics pass (frequencies and Latent Scaling over `analyze.max_tokens` of the store)
with the store's batches read ahead in a background thread (diffing.prefetch, as the in-process fit
does) against read inline, as analyze does: same store, same crosscoder, same process, runs
alternated; the statistics must agree. Measured on an H200: no gain (docs/benchmarks.md), so
analyze reads inline.

    python bench/analyze_read_ahead.py                       # SmolLM2 width (the demo), CPU
    python bench/analyze_read_ahead.py --device cuda --d-model 3584 --n-latents 114688 --k 100
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import tempfile
import time
from contextlib import closing

import numpy as np
import torch

from diffing.analysis import _stat_batches, latent_stats
from diffing.config import AnalysisConfig, CrosscoderConfig
from diffing.crosscoder import Crosscoder
from diffing.prefetch import prefetch
from diffing.store import open_store, write_arrays


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--d-model", type=int, default=576)
    ap.add_argument("--n-latents", type=int, default=2304)
    ap.add_argument("--k", type=int, default=32)
    ap.add_argument(
        "--tokens", type=int, default=65_536, help="analyze.max_tokens (the store holds this many)"
    )
    ap.add_argument("--batch", type=int, default=4096, help="analyze.batch_size")
    ap.add_argument("--shard-rows", type=int, default=8192)
    ap.add_argument("--depth", type=int, default=2, help="batches read ahead in the second variant")
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--json", default=None, help="also write the result here")
    args = ap.parse_args()
    device = torch.device(args.device)
    torch.manual_seed(0)
    acts = torch.randn(args.tokens, 2, args.d_model).half()
    d = tempfile.mkdtemp()
    t0 = time.perf_counter()
    store = open_store(write_arrays(f"{d}/s", acts, model_names=["A", "B"], shard_rows=args.shard_rows).uri)
    write_s = time.perf_counter() - t0
    del acts
    cfg = CrosscoderConfig(n_latents=args.n_latents, k=args.k).resolve(
        n_models=2, d_model=args.d_model, model_names=("A", "B")
    )
    model = Crosscoder(cfg, seed=0).to(device)
    model.norm_scale.fill_(args.d_model**-0.5)  # random N(0, 1) rows: unit norm once scaled

    def one(depth: int) -> tuple[float, np.ndarray]:
        acfg = AnalysisConfig(max_tokens=args.tokens, batch_size=args.batch)
        if device.type == "cuda":
            torch.cuda.synchronize()
        t = time.perf_counter()
        with closing(prefetch(_stat_batches(store, acfg), depth)) as batches:
            stats = latent_stats(model, batches, max_tokens=acfg.max_tokens)
        if device.type == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter() - t, stats.beta_eps

    one(0)  # warm-up: page cache, kernels
    times: dict[int, list[float]] = {0: [], args.depth: []}
    ref = None
    for _ in range(args.repeat):
        for depth in (0, args.depth):
            s, beta = one(depth)
            times[depth].append(s)
            if ref is None:
                ref = beta
            assert np.allclose(beta, ref, equal_nan=True), "read-ahead changed the statistics"
    gb = args.tokens * 2 * args.d_model * 2 / 1e9
    res = {
        "machine": f"{platform.machine()}, {os.cpu_count()} cores, "
        + (torch.cuda.get_device_name() if device.type == "cuda" else "cpu"),
        "torch": torch.__version__,
        "shape": {"d_model": args.d_model, "n_latents": args.n_latents, "k": args.k, "batch": args.batch},
        "tokens": args.tokens,
        "store_gb": round(gb, 2),
        "store_write_s": round(write_s, 1),
        "inline_s": round(min(times[0]), 2),
        f"read_ahead_{args.depth}_s": round(min(times[args.depth]), 2),
        "speedup": round(min(times[0]) / min(times[args.depth]), 2),
    }
    print(json.dumps(res, indent=2), flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(res, f, indent=2)
    os._exit(0)  # pyarrow's thread pool can abort a normal interpreter exit


if __name__ == "__main__":
    main()
