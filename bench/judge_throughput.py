"""Judge throughput: latents labelled per second through the labelling endpoint, batched and
concurrent vs one latent per request, one request at a time. Same service, same engine, same run;
every latent's evidence is distinct (no cache hits).

    python bench/judge_throughput.py [--judge smollm2|tiny|PATH] [--latents 32] [--sequential 8]
                                     [--batch 8] [--concurrency 4] [--endpoint URL]
                                     [--cpu-dtype auto|float32|bfloat16]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import random
import time

import httpx

from diffing.evidence import Example, LatentEvidence

WORDS = (
    "the model answers questions about cities rivers numbers code lists weather recipes history music "
    "bonjour merci le chat une table pour deux def return import sum equals plus minus sorry cannot help"
).split()


def make_evidence(i: int, n_examples: int = 8, window: int = 16) -> LatentEvidence:
    rng = random.Random(i)
    hot = set(rng.sample(WORDS, 3))

    def ex(q=None):
        toks = [" " + rng.choice(WORDS) for _ in range(window)]
        acts = [rng.uniform(1, 4) if t.strip() in hot else 0.0 for t in toks]
        if not any(acts):
            acts[window // 2] = 2.0
        return Example(tokens=toks, acts=acts, peak=max(range(window), key=acts.__getitem__), quantile=q)

    return LatentEvidence(
        latent=i, group="bench", top=[ex() for _ in range(n_examples)], quantiles=[ex(q) for q in range(4)]
    )


async def run(url: str, token: str | None, evs: list[LatentEvidence], batch: int, conc: int) -> float:
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    sem = asyncio.Semaphore(conc)
    async with httpx.AsyncClient(base_url=url, headers=headers, timeout=900) as c:

        async def one(chunk):
            async with sem:
                r = await c.post("/v1/labels", json={"latents": [e.model_dump(mode="json") for e in chunk]})
                r.raise_for_status()
                assert r.json()["cached"] == 0, "bench evidence must not hit the cache"

        t0 = time.perf_counter()
        await asyncio.gather(*(one(evs[k : k + batch]) for k in range(0, len(evs), batch)))
        return len(evs) / (time.perf_counter() - t0)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--judge", default="smollm2", help="smollm2 (embedded), tiny, or a model directory")
    ap.add_argument("--latents", type=int, default=32, help="Latents for the batched+concurrent run.")
    ap.add_argument("--sequential", type=int, default=8, help="Latents for the one-at-a-time run.")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--concurrency", type=int, default=4)
    ap.add_argument("--endpoint", default=None, help="Use a running service instead of starting one.")
    ap.add_argument(
        "--cpu-dtype", default="auto", choices=["auto", "float32", "bfloat16"], help="judge.cpu_dtype"
    )
    args = ap.parse_args()

    from serve.local import LocalService
    from serve.settings import ServiceSettings

    judge: dict = {"model_id": f"bench-{args.judge}"[:40], "timeout_s": 900, "cpu_dtype": args.cpu_dtype}
    if args.judge == "tiny":
        from diffing.embedded.tiny import TinyConfig, build_tiny_pair

        judge["model_source"] = str(
            build_tiny_pair(config=TinyConfig(tokenizer="bytes", max_position_embeddings=4096))[0]
        )
        judge["engine_kwargs"] = {"max_model_len": 4096}
    elif args.judge != "smollm2":
        judge["model_source"] = args.judge
    settings = ServiceSettings.model_validate(
        {"judge": judge, "cache_size": 0, "limits": {"request_timeout_s": 1800}}
    )
    svc = None
    if args.endpoint:
        url, token = args.endpoint, os.environ.get("CROSSDIFF_API_TOKEN")
    else:
        svc = LocalService(settings).start()
        url, token = svc.url, svc.token
    try:
        asyncio.run(run(url, token, [make_evidence(10_000_000 + i) for i in range(2)], 1, 1))  # warm-up
        base = 0
        seq = asyncio.run(run(url, token, [make_evidence(base + i) for i in range(args.sequential)], 1, 1))
        print(f"sequential: {seq:.3f} latents/s", flush=True)
        base += args.sequential
        bat = asyncio.run(
            run(
                url,
                token,
                [make_evidence(base + i) for i in range(args.latents)],
                args.batch,
                args.concurrency,
            )
        )
    finally:
        if svc is not None:
            svc.stop()
    print(
        json.dumps(
            {
                "machine": f"{platform.machine()} {os.cpu_count()} cores",
                "judge": args.judge,
                "sequential_latents_per_s": round(seq, 3),
                "batched_latents_per_s": round(bat, 3),
                "batch": args.batch,
                "concurrency": args.concurrency,
                "ratio": round(bat / seq, 2),
            },
            indent=2,
        )
    )


if __name__ == "__main__":
    main()
