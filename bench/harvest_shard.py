"""One harvest actor's shards at a real model shape: forward, host copy, store write.

The models are random-weight instances of a named architecture (nothing is downloaded: the
shape, not the weights, sets the cost), built straight on the device. Shards go through
`harvest_shards` as in the Ray actor: `Harvester.run` (forward to layer L of every model,
outlier mask, copy to the host, document order), then `StoreWriter.write_shard` (fp16 Parquet,
zstd, atomic local write) on background threads while the next shard computes. Each
`--write-threads` setting runs the same shards in the same process (0 = write inline, the
baseline). Reported: wall seconds, token rows/s, seconds in the forward, the host memory added
at peak (RSS sampled every 5 ms) and the GPU's peak allocation.

    python bench/harvest_shard.py --arch smollm2-135m --device cpu --prompts 32 --doc-tokens 256
    python bench/harvest_shard.py --arch gemma2-9b --models 3 --layer 20 --device cuda \
        --prompts 64 --doc-tokens 1024 --shards 6 --write-threads 0,4   # pt/it/SimPO at full length
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import string
import tempfile
import threading
import time

import torch


def _gemma2(hidden: int, inter: int, layers: int, heads: int, kv_heads: int, head_dim: int = 256) -> dict:
    return dict(model_type="gemma2", hidden_size=hidden, intermediate_size=inter, num_hidden_layers=layers,
                num_attention_heads=heads, num_key_value_heads=kv_heads, head_dim=head_dim, vocab_size=256000,
                sliding_window=4096, query_pre_attn_scalar=head_dim)  # fmt: skip


ARCHS = {  # HF config fields of the models named; random weights are enough for costs
    "gemma2-9b": _gemma2(3584, 14336, 42, 16, 8),
    "gemma2-2b": _gemma2(2304, 9216, 26, 8, 4),
    "gemma2-tiny": _gemma2(256, 512, 4, 2, 1, head_dim=128),  # the Gemma-2 code path on a CPU
    "smollm2-135m": dict(
        model_type="llama", hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
        num_attention_heads=9, num_key_value_heads=3, head_dim=64, vocab_size=49152,
    ),
}  # fmt: skip


def rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


class PeakRSS:
    """Highest RSS seen while the block runs, sampled by a thread."""

    def __enter__(self):
        self.start = self.peak = rss_bytes()
        self._stop = threading.Event()
        self._t = threading.Thread(target=self._watch, daemon=True)
        self._t.start()
        return self

    def _watch(self):
        while not self._stop.wait(0.005):
            self.peak = max(self.peak, rss_bytes())

    def __exit__(self, *exc):
        self._stop.set()
        self._t.join()
        self.peak = max(self.peak, rss_bytes())

    @property
    def added(self) -> int:
        return self.peak - self.start


def build_models(arch: str, n: int, dtype: torch.dtype, device: str, keep_layers: int | None = None):
    """Random-weight models; ``keep_layers``: drop the layers past the first ones, as the harvest's
    load_model does (each model is trimmed before the next is built)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    from diffing.models import keep_first_layers

    fields = dict(ARCHS[arch])
    cfg = AutoConfig.for_model(fields.pop("model_type"), **fields)
    models = []
    for i in range(n):
        torch.manual_seed(i)
        with torch.device(device):
            m = AutoModelForCausalLM.from_config(cfg, dtype=dtype)
        if keep_layers is not None:
            keep_first_layers(m, keep_layers)
            if device.startswith("cuda"):
                torch.cuda.empty_cache()
        models.append(m.eval().requires_grad_(False))
    return models


def records(n: int, doc_tokens: int, seed: int) -> list[dict]:
    """Raw-text records of `doc_tokens` characters (one token each with the byte tokenizer)."""
    rng = random.Random(seed)
    words = ["".join(rng.choices(string.ascii_lowercase, k=rng.randint(2, 9))) for _ in range(2000)]
    out = []
    for i in range(n):
        text = ""
        while len(text) < doc_tokens:
            text += rng.choice(words) + " "
        out.append({"id": str(i), "source": "bench", "text": text[:doc_tokens]})
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--arch", choices=sorted(ARCHS), default="smollm2-135m")
    ap.add_argument("--models", type=int, default=2)
    ap.add_argument("--layer", type=int, default=20)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--prompts", type=int, default=64, help="prompts per shard")
    ap.add_argument("--doc-tokens", type=int, default=1024, help="tokens per prompt (= context length)")
    ap.add_argument("--batch-prompts", type=int, default=16)
    ap.add_argument("--shards", type=int, default=4, help="timed shards (after one small warm-up)")
    ap.add_argument("--write-threads", default="0,2", help="settings to compare, comma-separated")
    ap.add_argument(
        "--all-layers", action="store_true", help="keep every layer (the harvest before 2026-12-06)"
    )
    ap.add_argument("--json", default=None)
    args = ap.parse_args()

    from diffing.embedded.tiny import byte_tokenizer
    from diffing.harvest import HarvestConfig, Harvester, harvest_shards
    from diffing.store import StoreWriter

    t0 = time.perf_counter()
    keep = None if args.all_layers else args.layer + 1
    models = build_models(args.arch, args.models, getattr(torch, args.dtype), args.device, keep)
    if args.device.startswith("cuda"):
        weights_gb = torch.cuda.memory_allocated() / 1e9
    else:
        weights_gb = sum(p.numel() * p.element_size() for m in models for p in m.parameters()) / 1e9
    t_build = time.perf_counter() - t0
    tok = byte_tokenizer()
    tmp = tempfile.mkdtemp()
    cfg = HarvestConfig.model_validate(
        {
            "models": [{"name": f"m{i}", "path": "random", "dtype": args.dtype} for i in range(args.models)],
            "layer": args.layer,
            "corpus": {"uri": "unused.jsonl"},
            "store": f"{tmp}/store",
            "context_length": args.doc_tokens,
            "prompts_per_shard": args.prompts,
            "batch_prompts": args.batch_prompts,
            "device": "cuda" if args.device.startswith("cuda") else "cpu",
        }
    )
    h = Harvester(cfg, models=models, tokenizer=tok)

    def run(wt: int, shards: list) -> dict:
        writer = StoreWriter(f"{tmp}/store-{wt}-{len(shards)}", model_names=[m.name for m in cfg.models],
                             d_model=h.d_model, dtype=cfg.store_dtype, layer=cfg.layer,
                             extra_columns=["source"])  # fmt: skip
        fwd: list[float] = []

        def timed_run(recs, start):
            t0 = time.perf_counter()
            rows = Harvester.run(h, recs, start)
            fwd.append(time.perf_counter() - t0)
            return rows

        h.run = timed_run
        if args.device.startswith("cuda"):
            torch.cuda.reset_peak_memory_stats()
        with PeakRSS() as mem:
            t0 = time.perf_counter()
            res = harvest_shards(h, writer, shards, write_threads=wt)
            wall = time.perf_counter() - t0
        rows = sum(r["n_rows"] for r in res)
        size = sum(os.path.getsize(f"{writer.root}/shards/{r['shard_id']}.parquet") for r in res)
        out = dict(
            write_threads=wt, shards=len(res), rows=rows, wall_s=round(wall, 2), rows_per_s=round(rows / wall),
            forward_s=round(sum(fwd), 2), forward_rows_per_s=round(rows / sum(fwd)),
            stored_bytes_per_row=round(size / max(1, rows), 1),
            fp16_shard_gb=round(rows / len(res) * args.models * h.d_model * 2 / 1e9, 3),
            host_added_gb=round(mem.added / 1e9, 3),
        )  # fmt: skip
        if args.device.startswith("cuda"):
            out["gpu_peak_gb"] = round(torch.cuda.max_memory_allocated() / 1e9, 2)
        print(json.dumps(out), flush=True)
        return out

    run(0, [("warm", 10**6, records(args.batch_prompts, min(args.doc_tokens, 128), seed=99))])
    shards = [(f"{i:05d}", i * args.prompts, records(args.prompts, args.doc_tokens, seed=i))
              for i in range(args.shards)]  # fmt: skip
    report = dict(
        arch=args.arch, models=args.models, layer=args.layer, device=args.device, dtype=args.dtype,
        prompts=args.prompts, doc_tokens=args.doc_tokens, batch_prompts=args.batch_prompts,
        build_s=round(t_build, 1), layers_kept=keep, weights_gb=round(weights_gb, 2), runs=[],
        torch=torch.__version__, machine=platform.machine(),
        gpu=torch.cuda.get_device_name() if args.device.startswith("cuda") else None, cpus=os.cpu_count(),
    )  # fmt: skip
    for wt in [int(x) for x in args.write_threads.split(",")]:
        report["runs"].append(run(wt, shards))
        if args.json:  # after every setting: a run cut short keeps what it measured
            with open(args.json, "w") as f:
                json.dump(report, f, indent=1)
    print(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
