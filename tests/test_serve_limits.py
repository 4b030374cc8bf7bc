"""Labelling service at the judge's limits: prompts over its context window (taxonomy, detection
examples), HTTP answers of an OpenAI-compatible judge, failing calls among concurrent ones, bodies
that cannot be parsed, bracketed acronyms in category names."""

from __future__ import annotations

import asyncio
import json

import httpx
import pytest
from test_serve_helpers import FRENCH, NEUTRAL, evidence, scripted

from diffing.evidence import Example
from serve import prompts
from serve.app import Service, create_app
from serve.judge import Completion, JudgeClient, JudgeError, JudgeUnavailable, OpenAIJudge, ScriptedJudge
from serve.labeller import Labeller
from serve.prompts import TaxonomyTooLong
from serve.settings import MethodSettings, ServiceSettings
from serve.taxonomy import Taxonomy, load_taxonomy

TOO_LONG = "This model's maximum context length is 2048 tokens. However, you requested 4483 tokens."


def run(coro):
    return asyncio.run(coro)


def big_taxonomy(n: int = 40) -> Taxonomy:
    cats = [{"name": f"cat{i}", "description": (f"d{i} " * 75)[:300]} for i in range(n)]
    return Taxonomy(version="big", categories=[*cats, {"name": "uninterpretable", "description": "nothing"}])


def limited(limit: int, inner, kinds: list[str]):
    """A judge that refuses any prompt over `limit` characters (vLLM's 400) and records the kind of
    each call: explain, classify or detect."""

    def fn(messages, choice, schema):
        kind = "detect" if choice == prompts.DETECT_CHOICES else "classify" if choice or schema else "explain"
        kinds.append(kind)
        if sum(len(m["content"]) for m in messages) > limit:
            return JudgeError(f"judge at http://j answered 400: {TOO_LONG}")
        return inner(messages, choice, schema)

    return fn


def _client(judge, settings: ServiceSettings | None = None, taxonomy: Taxonomy | None = None):
    service = Service(settings or ServiceSettings(), judge, "tok")
    if taxonomy is not None:
        service.taxonomy = taxonomy
        service.labeller = Labeller(judge, taxonomy, service.settings.method)
    transport = httpx.ASGITransport(app=create_app(service), raise_app_exceptions=False)
    return httpx.AsyncClient(
        transport=transport, base_url="http://t", headers={"Authorization": "Bearer tok"}
    )


def _body(*evs, **kw):
    return {"latents": [json.loads(e.model_dump_json()) for e in evs], **kw}


@pytest.mark.parametrize("mode", ["json", "choice"])
def test_a_taxonomy_too_long_for_the_judge_fails_the_request_instead_of_mislabelling(mode):
    tax = big_taxonomy()
    kinds: list[str] = []
    judge = ScriptedJudge(limited(8000, scripted("cat3"), kinds))
    lab = Labeller(judge, tax, MethodSettings(classify_mode=mode))
    with pytest.raises(TaxonomyTooLong) as err:
        run(lab.label(evidence(1, FRENCH)))
    msg = str(err.value)
    assert "41 categories" in msg and "descriptions" in msg and "max_model_len" in msg
    assert not prompts.prompt_too_long(err.value)  # never read as "the evidence is too big"
    assert kinds.count("explain") == 1  # the explanation that fitted is kept, not redone on less evidence
    assert kinds.count("classify") >= 2  # classification was retried on less evidence first
    assert lab.cache.get(lab.key(evidence(1, FRENCH), None, False)) is None  # nothing cached

    async def go():
        async with _client(judge, taxonomy=tax) as c:
            first = await c.post("/v1/labels", json=_body(evidence(1, FRENCH), evidence(2, NEUTRAL)))
            calls = judge.calls
            again = await c.post("/v1/labels", json=_body(evidence(1, FRENCH)))
            return first, calls, again

    first, calls, again = run(go())
    assert first.status_code == 502 and "41 categories" in first.json()["detail"]
    assert "max_model_len" in first.json()["detail"] and "labels" not in first.json()
    assert again.status_code == 502 and judge.calls > calls  # the failure was not cached


def test_classification_too_long_for_the_evidence_is_shrunk_keeping_the_explanation():
    tax = load_taxonomy()
    cfg = MethodSettings(classify_examples=8, window_tokens=200, explain_top=2, explain_quantiles=0)
    ev = evidence(1, [" ".join([t] * 8) for t in FRENCH])  # 6 top + 4 quantile examples, ~400 chars each
    exs = [*ev.top, *ev.quantiles]

    def size(msgs):
        return sum(len(m["content"]) for m in msgs)

    # the explanation (2 examples) and a classification with 4 examples fit; one with 8 does not
    limit = size(prompts.classify_messages(ev, exs[:4], "x" * 80, tax, cfg, "json"))
    assert (
        size(prompts.explain_messages(ev, exs, cfg))
        < limit
        < size(prompts.classify_messages(ev, exs, "", tax, cfg, "json"))
    )
    kinds: list[str] = []
    lab = Labeller(ScriptedJudge(limited(limit, scripted(), kinds)), tax, cfg)
    out, _ = run(lab.label(ev))
    assert out.category == "multilingual" and out.confidence > 0
    assert kinds.count("explain") == 1 and kinds.count("classify") >= 2


def test_a_detection_example_too_long_for_the_judge_is_left_out_of_detection_only():
    tax = load_taxonomy()
    base = evidence(7, FRENCH + FRENCH[:4], negatives=[f"x{i} " * 3 for i in range(4)])  # 6 top + 8 q.
    long_neg = Example(tokens=["y" * 300] * 30, acts=[0.0] * 30, peak=0)
    with_long = base.model_copy(update={"negatives": [long_neg, *base.negatives[1:]]})
    cfg = MethodSettings()

    def label(ev):
        kinds: list[str] = []
        explains: list[int] = []
        inner = scripted()

        def fn(messages, choice, schema):
            if choice is None and schema is None:
                explains.append(messages[-1]["content"].count("\n"))
            return limited(6000, inner, kinds)(messages, choice, schema)

        lab = Labeller(ScriptedJudge(fn), tax, cfg)
        out, _ = run(lab.label(ev, detection=True))
        return out, explains, lab

    plain, plain_explains, _ = label(base)
    out, explains, lab = label(with_long)
    assert explains == plain_explains and len(explains) == 1  # the explanation saw the whole evidence
    assert out.explanation == plain.explanation and out.category == plain.category
    assert out.detection_score is not None  # from the examples that fit
    assert out.cache_key == lab.key(with_long, None, True)
    # every negative too long: no detection score, the label otherwise the same
    all_long = base.model_copy(update={"negatives": [long_neg] * 4})
    none, _, _ = label(all_long)
    assert none.detection_score is None and none.category == plain.category


def test_openai_judge_retries_a_500_like_the_serve_path_and_checks_its_model_is_served():
    def answer(models):
        def handler(req: httpx.Request):
            if req.url.path.endswith("/models"):
                return httpx.Response(200, json={"object": "list", "data": [{"id": m} for m in models]})
            return httpx.Response(500, json={"object": "error", "message": "EngineCore died", "code": 500})

        return handler

    async def go(models):
        j = OpenAIJudge("http://judge/v1", "m")
        j._client = httpx.AsyncClient(transport=httpx.MockTransport(answer(models)))
        try:
            with pytest.raises(JudgeUnavailable):  # 503 with Retry-After: the label job retries
                await j.complete([{"role": "user", "content": "hi"}], max_tokens=4)
            return await j.health()
        finally:
            await j.aclose()

    assert run(go(["m", "other"])) is None
    # a server listing other ids may still answer to the name (llama.cpp, Ollama tags): a note, not down
    detail = run(go(["other-model"]))
    assert "'m'" in detail and "other-model" in detail and "judge.model_id" in detail

    async def healthz():
        j = OpenAIJudge("http://judge/v1", "m")
        j._client = httpx.AsyncClient(transport=httpx.MockTransport(answer(["other-model"])))
        async with _client(j) as c:
            h = await c.get("/healthz")
            r = await c.post("/v1/labels", json=_body(evidence(1, FRENCH)))
        await j.aclose()
        return h, r

    h, r = run(healthz())
    assert h.status_code == 200 and "other-model" in h.json()["detail"]
    assert r.status_code == 503 and r.headers.get("retry-after")  # the 500s: retried by the label job


class _Boom(JudgeClient):
    """Fails at once on prompts holding "BOOM"; every other call takes a while and is recorded."""

    model = "boom"

    def __init__(self):
        self.finished = 0
        self.cancelled = 0

    async def complete(self, messages, *, max_tokens, **kw):
        if "BOOM" in messages[-1]["content"]:
            raise JudgeError("judge error: out of memory")
        try:  # until cancelled: a sibling that was not never finishes (no timing to race)
            await asyncio.Event().wait()
        except asyncio.CancelledError:
            self.cancelled += 1
            raise
        self.finished += 1
        return Completion(text="yes")

    async def prompt_logprob(self, messages, prefill=None):
        return await self.complete(messages, max_tokens=1)

    async def health(self):
        pass


def test_a_failing_judge_call_cancels_its_siblings():
    async def go():
        judge = _Boom()
        lab = Labeller(judge, load_taxonomy(), MethodSettings())
        pos = evidence(1, FRENCH[:3]).top
        negs = evidence(2, [], negatives=["BOOM here"]).negatives
        with pytest.raises(JudgeError, match="out of memory"):
            await lab.detect("fires on French", pos, negs)
        await asyncio.sleep(0.2)
        return judge.cancelled, judge.finished  # before the loop's shutdown cancels what is left

    assert run(go()) == (3, 0)


def test_a_body_nested_too_deeply_is_not_called_invalid_utf8():
    async def go():
        async with _client(ScriptedJudge(scripted())) as c:
            deep = b'{"latents": ' + b"[" * 100_000 + b"]" * 100_000 + b"}"
            ctype = {"content-type": "application/json"}
            r1 = await c.post("/v1/labels", content=deep, headers=ctype)
            r2 = await c.post("/v1/labels", content=b'{"latents": ["\xff\xfe"]}', headers=ctype)
            return r1, r2

    deep, bad = run(go())
    assert deep.status_code == 400 and deep.json()["field"] == "body"
    assert "nested too deeply" in deep.json()["detail"] and "UTF-8" not in deep.json()["detail"]
    assert bad.status_code == 400 and "not valid UTF-8" in bad.json()["detail"]


@pytest.mark.parametrize("name", ["PII leakage [PII]", "[EN] English", "code [C++] and [SQL]"])
def test_bracketed_acronyms_in_category_names_are_allowed(name):
    tax = Taxonomy(
        version="x", categories=[{"name": name, "description": "d"}, {"name": "b", "description": "d"}]
    )
    assert tax.names[0] == name


@pytest.mark.parametrize(
    "name",
    [
        "[INST] x",
        "x [/INST]",
        "[TOOL_CALLS]",
        "a [SYSTEM_PROMPT]",
        "<|im_start|>",
        "<s> x",
        "<start_of_turn>",
    ],
)
def test_real_control_tokens_in_category_names_are_still_refused(name):
    with pytest.raises(ValueError, match="control tokens"):
        Taxonomy(
            version="x", categories=[{"name": name, "description": "d"}, {"name": "b", "description": "d"}]
        )


def test_identical_concurrent_requests_share_one_labelling():
    """Clients retrying after a timeout, or two clients of one run, ask for the same label at once:
    the judge labels it once; the other requests wait for it and count it as cached."""

    async def go():
        judge = ScriptedJudge(scripted(), delay_s=0.05)
        async with _client(judge) as c:
            one = await c.post("/v1/labels", json=_body(evidence(7, NEUTRAL)))
            calls_for_one = judge.calls
            rs = await asyncio.gather(
                *(c.post("/v1/labels", json=_body(evidence(1, FRENCH))) for _ in range(4))
            )
        return one, calls_for_one, rs, judge.calls

    one, calls_for_one, rs, calls = run(go())
    assert one.status_code == 200 and all(r.status_code == 200 for r in rs)
    assert calls - calls_for_one == calls_for_one  # four requests, one labelling
    assert sorted(r.json()["cached"] for r in rs) == [0, 1, 1, 1]
    assert len({json.dumps(r.json()["labels"]) for r in rs}) == 1


def test_shared_labelling_stops_with_its_last_waiter():
    """Cancelling one of two requests waiting for the same label leaves it to the other; cancelling
    the only one stops the judge work, as if it had never been shared."""

    async def go():
        judge = ScriptedJudge(scripted(), delay_s=0.05)
        lab = Labeller(judge, load_taxonomy(), MethodSettings())
        a = asyncio.ensure_future(lab.label(evidence(3, FRENCH)))
        b = asyncio.ensure_future(lab.label(evidence(3, FRENCH)))
        await asyncio.sleep(0.02)
        a.cancel()
        label, cached = await b
        alone = asyncio.ensure_future(lab.label(evidence(4, NEUTRAL)))
        await asyncio.sleep(0.02)
        alone.cancel()
        await asyncio.sleep(0.01)
        calls = judge.calls
        await asyncio.sleep(0.3)
        return label, cached, calls, judge.calls, lab

    label, cached, calls, later, lab = run(go())
    assert label.latent == 3 and cached  # b joined a's labelling, which outlived a
    assert later == calls and not lab._inflight  # the lone one's work stopped with it


def test_a_failing_latent_stops_the_judge_work_of_its_whole_request():
    """label_many fails on the first error; the other latents' judge calls are cancelled, not left
    running for a request that has already failed (the labels they share are not shared here)."""

    async def go():
        judge = _Boom()
        lab = Labeller(judge, load_taxonomy(), MethodSettings())
        items = [evidence(i, [f"{t} n{i}" for t in FRENCH]) for i in range(6)]
        items.append(evidence(99, ["BOOM BOOM"]))
        with pytest.raises(JudgeError):
            await lab.label_many(items)
        await asyncio.sleep(0.2)
        return judge.cancelled, judge.finished, dict(lab._inflight)  # before the loop's shutdown

    cancelled, finished, inflight = run(go())
    assert finished == 0 and cancelled >= 6 and not inflight


def test_shrinking_never_resends_the_same_prompt():
    """Halving 24 top examples to 12 still shows the first explain_top=8: the same prompt would fail
    the same way, so the shrink goes on until the prompt shows fewer."""
    base = evidence(1, FRENCH)
    ev = base.model_copy(update={"top": [x.model_copy() for x in base.top * 4][:24], "quantiles": []})
    m = MethodSettings(classify_mode="choice")
    size = lambda n: sum(len(x["content"]) for x in prompts.explain_messages(ev, ev.top[:n], m))  # noqa: E731
    limit = (size(8) + size(6)) // 2
    sent: list[int] = []

    def explain_limited(messages, choice, schema):  # only explanation prompts are measured
        if not (choice or schema):
            sent.append(n := sum(len(x["content"]) for x in messages))
            if n > limit:
                return JudgeError(f"judge at http://j answered 400: {TOO_LONG}")
        return scripted()(messages, choice, schema)

    lab, _ = run(Labeller(ScriptedJudge(explain_limited), load_taxonomy(), m).label(ev))
    assert lab.category != "uninterpretable"
    assert sent == [size(8), size(6)]  # one refused, the next one shorter (not 8 of 12 again)


def test_liveness_needs_no_judge_and_no_token():
    """/livez is for the liveness probe (the ingress runs); /healthz, which asks the judge, is readiness."""
    judge = ScriptedJudge(scripted())
    judge.healthy = False

    async def go():
        async with _client(judge) as c:
            c.headers.pop("Authorization")
            return await c.get("/livez"), await c.get("/healthz")

    live, ready = run(go())
    assert live.status_code == 200 and ready.status_code == 503


def test_replicas_get_time_to_finish_what_they_hold():
    from serve.app import llm_config
    from serve.settings import JudgeSettings

    dep = llm_config(JudgeSettings(model_source="/models/judge", timeout_s=60)).deployment_config
    assert dep["graceful_shutdown_timeout_s"] == 90
    own = JudgeSettings(model_source="/m", deployment_config={"graceful_shutdown_timeout_s": 5})
    assert llm_config(own).deployment_config["graceful_shutdown_timeout_s"] == 5
