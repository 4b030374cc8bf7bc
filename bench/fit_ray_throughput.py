"""What the Ray glue costs: training tokens/s of the Ray Train path (1 and 2 workers) against the
in-process fit on the same store, same config, same machine, same run. Two rates per side, both
from the runs' own metrics.jsonl (``elapsed_s`` per logged step): the whole training loop
(includes the input pipeline's start: the in-process shuffle buffer filling, Ray Data's read
tasks starting) and the steady rate over the second half of the steps. Wall time (Ray, worker
group, dataset planning, final metrics) is reported beside them.

    python bench/fit_ray_throughput.py [--d-model 256 --n-latents 2048 --k 16 --tokens 262144]
    # on a GPU node: one GPU worker (NCCL) against the in-process fit on the same GPU
    python bench/fit_ray_throughput.py --device cuda --workers 1 --d-model 2304 --n-latents 32768 \
        --k 64 --batch 4096 --features 2048
"""

from __future__ import annotations

import argparse
import functools
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


def summary(run: Path) -> dict:
    m = json.loads((run / "metrics.json").read_text())
    return {k: m[k] for k in ("fve", "l0", "dead_fraction", "final_train_loss", "threshold")}


def random_sparse_rows(n: int, d_model: int, n_features: int, k: int, device: str) -> torch.Tensor:
    """[n, 2, d_model] float16 rows: ~k active features per row (exponential magnitudes) over
    random unit directions, half shared by both models and a quarter exclusive to each."""
    g = torch.Generator(device=device).manual_seed(0)
    dirs = torch.randn(n_features, 2, d_model, generator=g, device=device)
    q = n_features // 4
    dirs[:q, 1] = 0  # only in model A
    dirs[q : 2 * q, 0] = 0  # only in model B
    dirs /= dirs.norm(dim=-1, keepdim=True).clamp_min(1e-6)
    out = torch.empty(n, 2, d_model, dtype=torch.float16)
    for i in range(0, n, 16_384):
        m = min(16_384, n - i)
        on = torch.rand(m, n_features, generator=g, device=device) < k / n_features
        mag = torch.empty(m, n_features, device=device).exponential_(generator=g) * on
        out[i : i + m] = (mag @ dirs.flatten(1)).view(m, 2, d_model).half().cpu()
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--d-model", type=int, default=256)
    ap.add_argument("--n-latents", type=int, default=2048)
    ap.add_argument("--k", type=int, default=16)
    ap.add_argument("--batch", type=int, default=1024)
    ap.add_argument("--tokens", type=int, default=262_144)
    ap.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    ap.add_argument("--threads", type=int, default=THREADS, help="torch threads of the in-process fit (CPU)")
    ap.add_argument("--ray-cpus", type=int, default=4, help="logical CPUs of the local Ray cluster")
    ap.add_argument(
        "--features", type=int, default=0, help="planted features (0: n_latents / 4 plus exclusives)"
    )
    ap.add_argument(
        "--readers",
        nargs="+",
        choices=["v1", "v2"],
        default=["v1"],
        help="Ray Data parquet reader(s) of the Ray runs: v1 (what run_fit_ray uses) and/or v2 "
        "(Ray's DataSourceV2 default, for comparison)",
    )
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    torch.set_num_threads(args.threads)

    from cluster.connect import ensure_ray
    from diffing.config import FitConfig
    from diffing.fit import fit
    from diffing.store import write_arrays
    from diffing.synthetic import make_planted
    from jobs.fit import run_fit_ray

    tmp = Path(tempfile.mkdtemp())
    D, L = args.d_model, args.n_latents
    if args.features:  # large shapes: sparse codes times random directions, drawn with torch
        rows = random_sparse_rows(args.tokens, D, args.features, args.k, args.device)
    else:
        planted = make_planted(D, n_shared=L // 4, n_only=(L // 16, L // 16), mean_active=args.k, seed=0)
        rows = planted.sample(args.tokens, seed=1)
    store = write_arrays(str(tmp / "store"), rows, model_names=["A", "B"], shard_rows=32_768)
    del rows
    gpu = args.device == "cuda"

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
                    "device": args.device,
                },
                "distributed": {
                    "workers": workers,
                    "use_gpu": gpu,
                    # the in-process fit's threads, split among the workers (Ray sets each worker's
                    # OMP/torch threads from its CPUs): same compute on both sides
                    "cpus_per_worker": float(max(1, args.threads // max(1, workers))),
                    "shuffle_buffer_rows": 0,
                },
            }
        )

    res = {
        "machine": f"{platform.machine()}, {os.cpu_count()} cores"
        + (f", {torch.cuda.get_device_name()}" if gpu else ""),
        "device": args.device,
        "torch": torch.__version__,
        "tokens": args.tokens,
        "shape": {"d_model": D, "n_latents": L, "k": args.k, "batch": args.batch},
        "tokens_per_s": {},
        "steady_tokens_per_s": {},
        "wall_s": {},
        "final": {},  # each side's RUN/metrics.json: same config, so comparable quality
    }
    t0 = time.perf_counter()
    if gpu:
        torch.cuda.reset_peak_memory_stats()
    fit(store, cfg(0), tmp / "inproc")
    res["wall_s"]["in_process"] = time.perf_counter() - t0
    if gpu:
        res["peak_gpu_memory_gib_in_process"] = torch.cuda.max_memory_allocated() / 2**30
        torch.cuda.empty_cache()
    res["tokens_per_s"]["in_process"], res["steady_tokens_per_s"]["in_process"] = rates(
        tmp / "inproc", args.batch
    )
    res["final"]["in_process"] = summary(tmp / "inproc")
    ensure_ray(num_cpus=args.ray_cpus)  # GPUs are detected
    import jobs.fit

    v1_dataset = jobs.fit._store_dataset
    for reader, w in [(r, w) for r in args.readers for w in args.workers]:
        jobs.fit._store_dataset = functools.partial(v1_dataset, datasource_v2=reader == "v2")
        key = f"ray_{w}_workers" + ("" if reader == "v1" else "_v2_reader")
        t0 = time.perf_counter()
        run_fit_ray(str(tmp / "store"), cfg(w), str(tmp / key))
        res["wall_s"][key] = time.perf_counter() - t0
        res["tokens_per_s"][key], res["steady_tokens_per_s"][key] = rates(tmp / key, args.batch)
        res["final"][key] = summary(tmp / key)
        if args.json:  # partial results survive a later run's failure
            Path(args.json).write_text(json.dumps(res, indent=2))
    for name in ("tokens_per_s", "steady_tokens_per_s"):
        base = res[name]["in_process"]
        res[f"overhead_{name}"] = {k: 1 - v / base for k, v in res[name].items() if k != "in_process"}
    print(json.dumps(res, indent=2))
    if args.json:
        Path(args.json).write_text(json.dumps(res, indent=2))


if __name__ == "__main__":
    main()
