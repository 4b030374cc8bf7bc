"""Store read throughput: `read_shard` MB/s of one shard written with one parquet row group
against ~16 MiB row groups (the store's layout), same data, same process.

    python bench/store_read.py [--d-model 3584 --rows 16384]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import tempfile
import time

import numpy as np
import pyarrow as pa
import torch

import diffing.store.format as store_mod
from diffing.store import open_store, write_arrays


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--d-model", type=int, default=3584)
    ap.add_argument("--rows", type=int, default=16_384)
    ap.add_argument("--repeat", type=int, default=3)
    args = ap.parse_args()
    acts = torch.randn(args.rows, 2, args.d_model).half()
    mb = acts.numel() * 2 / 1e6
    res = {
        "machine": f"{platform.machine()}, {os.cpu_count()} cores, pyarrow {pa.__version__}",
        "shard_mb": round(mb),
        "d_model": args.d_model,
    }
    default = store_mod.ROW_GROUP_BYTES
    for name, group_bytes in (("one_row_group", 1 << 62), ("row_groups_16MiB", default)):
        store_mod.ROW_GROUP_BYTES = group_bytes
        d = tempfile.mkdtemp()
        write_arrays(f"{d}/s", acts, model_names=["A", "B"], shard_rows=args.rows)
        st = open_store(f"{d}/s")
        times = []
        for _ in range(args.repeat):
            t0 = time.perf_counter()
            a, _ = st.read_shard(0)
            times.append(time.perf_counter() - t0)
        assert np.array_equal(a, acts.numpy())
        res[f"{name}_mb_per_s"] = round(mb / min(times))
    store_mod.ROW_GROUP_BYTES = default
    res["speedup"] = round(res["row_groups_16MiB_mb_per_s"] / res["one_row_group_mb_per_s"], 2)
    print(json.dumps(res, indent=2), flush=True)
    os._exit(0)  # pyarrow's thread pool can abort a normal interpreter exit


if __name__ == "__main__":
    main()
