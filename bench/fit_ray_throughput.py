"""What the Ray glue costs: training tokens/s of the Ray Train path (1 and 2 workers) against the
in-process fit on the same store, same config, same machine, same run. Two rates per side, both
from the runs' own metrics.jsonl (``elapsed_s`` per logged step): the whole training loop
(includes the input pipeline's start: the in-process shuffle buffer filling, Ray Data's read
tasks starting) and the steady rate over the second half of the steps. Wall time (Ray, worker
group, dataset planning, final metrics) is reported beside them.

    python bench/fit_ray_throughput.py [--d-model 256 --n-latents 2048 --k 16 --tokens 262144]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import tempfile
import time
from pathlib import Path

import torch

THREADS = 2


def rates(run: Path, batch: int) -> tuple[float, float]:
    """(whole-loop, steady second-half) tokens/s from a finished run's metrics.jsonl."""
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    rows = [r for r in rows if "elapsed_s" in r]
    last = rows[-1]
    mid = min(rows, key=lambda r: abs(r["step"] - last["step"] / 2))
    whole = last["step"] * batch / last["elapsed_s"]
    steady = (last["step"] - mid["step"]) * batch / (last["elapsed_s"] - mid["elapsed_s"])
    return whole, steady


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--d-model", type=int, default=256)
    ap.add_argument("--n-latents", type=int, default=2048)
    ap.add_argument("--k", type=int, default=16)
    ap.add_argument("--batch", type=int, default=1024)
    ap.add_argument("--tokens", type=int, default=262_144)
    ap.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    torch.set_num_threads(THREADS)

    from cluster.connect import ensure_ray
    from diffing.config import FitConfig
    from diffing.fit import fit
    from diffing.store import write_arrays
    from diffing.synthetic import make_planted
    from jobs.fit import run_fit_ray

    tmp = Path(tempfile.mkdtemp())
    D, L = args.d_model, args.n_latents
    planted = make_planted(D, n_shared=L // 4, n_only=(L // 16, L // 16), mean_active=args.k, seed=0)
    store = write_arrays(
        str(tmp / "store"), planted.sample(args.tokens, seed=1), model_names=["A", "B"], shard_rows=32_768
    )

    def cfg(workers: int) -> FitConfig:
        return FitConfig.model_validate(
            {
                "crosscoder": {"n_latents": L, "k": args.k},
                "train": {
                    "batch_size": args.batch,
                    "lr": 2e-3,
                    "log_every": 20,
                    "checkpoint_every": 10**9,
                    "eval_tokens": 8192,
                },
                "distributed": {
                    "workers": workers,
                    # the in-process fit's threads, split among the workers (Ray sets each worker's
                    # OMP/torch threads from its CPUs): same compute on both sides
                    "cpus_per_worker": float(max(1, THREADS // max(1, workers))),
                    "shuffle_buffer_rows": 0,
                },
            }
        )

    res = {
        "machine": f"{platform.machine()}, {os.cpu_count()} cores",
        "torch": torch.__version__,
        "tokens": args.tokens,
        "shape": {"d_model": D, "n_latents": L, "k": args.k, "batch": args.batch},
        "tokens_per_s": {},
        "steady_tokens_per_s": {},
        "wall_s": {},
    }
    t0 = time.perf_counter()
    fit(store, cfg(0), tmp / "inproc")
    res["wall_s"]["in_process"] = time.perf_counter() - t0
    res["tokens_per_s"]["in_process"], res["steady_tokens_per_s"]["in_process"] = rates(
        tmp / "inproc", args.batch
    )
    ensure_ray(num_cpus=4)
    for w in args.workers:
        t0 = time.perf_counter()
        run_fit_ray(str(tmp / "store"), cfg(w), str(tmp / f"ray{w}"))
        res["wall_s"][f"ray_{w}_workers"] = time.perf_counter() - t0
        key = f"ray_{w}_workers"
        res["tokens_per_s"][key], res["steady_tokens_per_s"][key] = rates(tmp / f"ray{w}", args.batch)
    for name in ("tokens_per_s", "steady_tokens_per_s"):
        base = res[name]["in_process"]
        res[f"overhead_{name}"] = {k: 1 - v / base for k, v in res[name].items() if k != "in_process"}
    print(json.dumps(res, indent=2))
    if args.json:
        Path(args.json).write_text(json.dumps(res, indent=2))


if __name__ == "__main__":
    main()
