"""The in-process fit's read-ahead thread: training tokens/s with `distributed.prefetch_batches`
0 (batches read on the training thread) against N (a background reader; pinned batches on a GPU),
same store, same config, same process, runs alternated. Rates from each run's metrics.jsonl:
whole loop and the steady second half (bench/fit_ray_throughput.py's `rates`).

    python bench/fit_prefetch.py                      # CPU, a demo-like shape
    python bench/fit_prefetch.py --device cuda --d-model 3584 --n-latents 114688 --k 100 \
        --batch 2048 --tokens 196608 --features 8192  # the Gemma-2-9b target shape on a GPU
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from fit_ray_throughput import random_sparse_rows, rates, summary  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--d-model", type=int, default=576)
    ap.add_argument("--n-latents", type=int, default=2304)
    ap.add_argument("--k", type=int, default=32)
    ap.add_argument("--batch", type=int, default=1024)
    ap.add_argument("--tokens", type=int, default=131_072)
    ap.add_argument("--features", type=int, default=1024, help="planted features of the random store")
    ap.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    ap.add_argument("--threads", type=int, default=2, help="torch threads (CPU)")
    ap.add_argument("--depth", type=int, default=4, help="prefetch_batches of the read-ahead side")
    ap.add_argument("--buffer-rows", type=int, default=65_536, help="train.shuffle_buffer_rows")
    ap.add_argument("--repeat", type=int, default=2, help="runs per side, alternated")
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    from diffing.config import FitConfig
    from diffing.fit import fit
    from diffing.store import write_arrays

    tmp = Path(tempfile.mkdtemp())
    rows = random_sparse_rows(args.tokens, args.d_model, args.features, args.k, args.device)
    store = write_arrays(str(tmp / "store"), rows, model_names=["A", "B"], shard_rows=16_384)
    del rows

    def cfg(depth: int) -> FitConfig:
        return FitConfig.model_validate(
            {
                "crosscoder": {"n_latents": args.n_latents, "k": args.k},
                "train": {
                    "batch_size": args.batch,
                    "lr": 2e-3,
                    "log_every": 10,
                    "checkpoint_every": 10**9,
                    "eval_tokens": 8192,
                    "device": args.device,
                    "shuffle_buffer_rows": args.buffer_rows,
                },
                "distributed": {"prefetch_batches": depth},
            }
        )

    gpu = args.device == "cuda"
    res = {
        "machine": f"{platform.machine()}, {os.cpu_count()} cores"
        + (f", {torch.cuda.get_device_name()}" if gpu else ""),
        "torch": torch.__version__,
        "shape": {"d_model": args.d_model, "n_latents": args.n_latents, "k": args.k, "batch": args.batch},
        "tokens": args.tokens,
        "runs": [],
    }
    for r in range(args.repeat):
        for depth in (0, args.depth):
            out = tmp / f"run-{depth}-{r}"
            t0 = time.perf_counter()
            fit(store, cfg(depth), out)
            whole, steady = rates(out, args.batch)
            res["runs"].append(
                {
                    "prefetch_batches": depth,
                    "tokens_per_s": whole,
                    "steady_tokens_per_s": steady,
                    "wall_s": time.perf_counter() - t0,
                    "final": summary(out),
                }
            )
            print(json.dumps(res["runs"][-1]), flush=True)
            if args.json:
                Path(args.json).write_text(json.dumps(res, indent=2))
    for key in ("tokens_per_s", "steady_tokens_per_s"):
        side = {d: [x[key] for x in res["runs"] if x["prefetch_batches"] == d] for d in (0, args.depth)}
        res[f"speedup_{key}"] = (sum(side[args.depth]) / len(side[args.depth])) / (
            sum(side[0]) / len(side[0])
        )
    print(json.dumps({k: v for k, v in res.items() if k != "runs"}, indent=2))
    if args.json:
        Path(args.json).write_text(json.dumps(res, indent=2))


if __name__ == "__main__":
    main()
