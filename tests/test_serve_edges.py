"""Labelling service on inputs from clients we do not write: over-long evidence, quantile-only
evidence, padded category names, tiny activations, malformed requests and judge answers."""

from __future__ import annotations

import asyncio
import json

import httpx
import pytest
from test_serve_helpers import FRENCH, REFUSALS, evidence, example, scripted

from diffing.evidence import LatentEvidence
from serve import prompts
from serve.app import Service, create_app
from serve.judge import JudgeError, JudgeUnavailable, OpenAIJudge, ScriptedJudge
from serve.labeller import LabelCache, Labeller, prompt_too_long
from serve.settings import MethodSettings, ServiceSettings
from serve.taxonomy import Taxonomy, load_taxonomy

TOO_LONG = "This model's maximum context length is 2048 tokens. However, you requested 4483 tokens."


def run(coro):
    return asyncio.run(coro)


def too_long_over(limit: int):
    """A judge whose context window holds `limit` characters of an explanation prompt (the one with
    the context and the most examples; vLLM's 400 otherwise)."""
    inner = scripted("multilingual")

    def fn(messages, choice, schema):
        if choice is None and schema is None and len(messages[-1]["content"]) > limit:
            return JudgeError(f"judge at http://j answered 400: {TOO_LONG}")
        return inner(messages, choice, schema)

    return fn


def test_over_long_evidence_is_shrunk_then_given_a_fallback_label_alone():
    tax = load_taxonomy()
    ev = evidence(1, FRENCH * 3)  # 6 top + 12 quantile examples
    cfg = MethodSettings(classify_mode="choice", explain_top=6, explain_quantiles=12)

    def user_len(e, ctx=None):
        return len(prompts.explain_messages(e, [*e.top, *e.quantiles], cfg, ctx)[-1]["content"])

    half = ev.model_copy(update={"top": ev.top[:3], "quantiles": ev.quantiles[:6]})
    limit = user_len(half)
    assert user_len(ev) > limit  # the premise: the whole evidence does not fit, half of it does
    # fits once the context is dropped and the examples halved: a real label
    lab = Labeller(ScriptedJudge(too_long_over(limit)), tax, cfg)
    out, _ = run(lab.label(ev, "some context " * 50))
    assert out.category == "multilingual" and out.confidence > 0
    # never fits: the fallback category at confidence 0, for this latent only; the batch goes on
    tiny = Labeller(ScriptedJudge(too_long_over(10)), tax, cfg)
    labs, _ = run(tiny.label_many([ev, evidence(2, REFUSALS)]))
    assert [x.latent for x in labs] == [1, 2]
    assert all(x.category == "uninterpretable" and x.confidence == 0.0 for x in labs)
    assert "context window" in labs[0].explanation
    # other judge errors still fail the request (502), they are not hidden
    assert prompt_too_long(JudgeError(TOO_LONG)) and not prompt_too_long(JudgeError("answered 500"))


def test_channel_calibration_texts_too_long_for_the_judge_are_left_out():
    tax = load_taxonomy("serve/taxonomies/demo.yaml")
    seen = []

    def scorer(messages, prefill):
        seen.append(len(prefill or ""))
        if len(prefill or "") > 1000:
            raise JudgeError(TOO_LONG)
        french = "French" in messages[-1]["content"] and "Bonjour" in (prefill or "")
        return -50.0 + (5.0 if french else 0.0)

    lab = Labeller(
        ScriptedJudge(scripted(), scorer=scorer),
        tax,
        MethodSettings(classify_mode="channel", channel_window_tokens=2000),
    )
    long_text = prompts.channel_text(evidence(9, ["word " * 400]), lab.method)
    out, _ = run(lab.label(evidence(1, FRENCH), calibration=(long_text,)))
    assert max(seen) > 1000  # the long calibration text was tried, then left out for the neutral text
    assert out.category == "multilingual" and 0.0 < out.confidence <= 1.0


def test_quantile_only_evidence_is_scored_on_its_quantile_examples():
    ev = LatentEvidence(
        latent=3, group="g", quantiles=[example(t, act=1.0, quantile=i) for i, t in enumerate(FRENCH[:4])]
    )
    text = prompts.channel_text(ev, MethodSettings(channel_examples=3))
    first = [t.split()[0] for t in FRENCH[:4]]
    assert text.count("\n") == 2 and text.startswith(first[3])  # the highest quantile bin first


def test_examples_are_split_by_their_list_not_by_their_quantile_field():
    top = [example(t) for t in FRENCH[:2]]
    quant = [example(t, act=1.0) for t in REFUSALS[:2]]  # quantile samples without a `quantile` value
    ev = LatentEvidence(latent=1, group="g", top=top, quantiles=quant)
    cfg = MethodSettings(explain_top=1, explain_quantiles=2)
    user = prompts.explain_messages(ev, [*top, *quant], cfg)[-1]["content"]
    assert REFUSALS[0].split()[0] in user and REFUSALS[1].split()[0] in user  # both quantile samples shown
    assert FRENCH[1].split()[0] not in user  # only explain_top=1 of the top examples


def test_padded_category_names_are_refused():
    for name in ("French ", " French", "Fr\nench"):
        with pytest.raises(ValueError, match="whitespace"):
            Taxonomy(
                version="t",
                categories=[{"name": name, "description": "d"}, {"name": "x", "description": "d"}],
            )


def test_cache_keys_tell_small_activations_apart(tmp_path):
    from diffing.evidence import Example

    a = Example(tokens=["cat", " sat", " mat"], acts=[4e-7, 0.0, 5e-8], peak=0)
    b = Example(tokens=["cat", " sat", " mat"], acts=[0.0, 0.0, 4e-7], peak=0)
    lab = Labeller(
        ScriptedJudge(scripted()), load_taxonomy(), MethodSettings(), cache=LabelCache(10, str(tmp_path))
    )
    ka = lab.key(LatentEvidence(latent=1, group="g", top=[a]), None, False)
    kb = lab.key(LatentEvidence(latent=2, group="g", top=[b]), None, False)
    assert ka != kb
    # float32 noise below 9 significant digits does not split keys
    c = Example(tokens=a.tokens, acts=[4e-7 * (1 + 1e-12), 0.0, 5e-8], peak=0)
    assert lab.key(LatentEvidence(latent=3, group="g", top=[c]), None, False) == ka


def _client(judge, *, root_path: str = ""):
    app = create_app(Service(ServiceSettings(), judge, "tok"))
    transport = httpx.ASGITransport(app=app, root_path=root_path)
    return httpx.AsyncClient(transport=transport, base_url="http://t")


def test_malformed_requests_get_an_error_body_that_says_what_to_fix():
    async def go():
        async with _client(ScriptedJudge(scripted())) as c:
            auth = {"Authorization": "Bearer tok"}
            r = await c.post(
                "/v1/labels", content=b'{"latents": [}', headers={**auth, "content-type": "application/json"}
            )
            assert r.status_code == 422 and r.json()["field"] == "body"
            assert "invalid JSON at character" in r.json()["detail"] and isinstance(r.json()["errors"], list)
            r = await c.post(
                "/v1/labels", content=b'{"latents": []}', headers={**auth, "content-type": "text/plain"}
            )
            assert r.status_code == 422 and "Content-Type: application/json" in r.json()["detail"]
            r = await c.post("/v1/labels", json={"latents": [{"latent": -1, "group": "g"}]}, headers=auth)
            body = r.json()
            assert (
                r.status_code == 422
                and body["field"] == "latents.0.latent"
                and isinstance(body["detail"], str)
            )
            schema = (await c.get("/openapi.json")).json()
            assert any(s.get("scheme") == "bearer" for s in schema["components"]["securitySchemes"].values())
            err = schema["components"]["schemas"]["ErrorBody"]["properties"]
            assert err["detail"]["type"] == "string" and "errors" in err

    run(go())


def test_public_paths_need_no_token_under_a_route_prefix():
    async def go():
        async with _client(ScriptedJudge(scripted()), root_path="/crossdiff") as c:
            assert (await c.get("/crossdiff/healthz")).status_code == 200
            assert (await c.get("/crossdiff/openapi.json")).status_code == 200
            assert (await c.get("/crossdiff/v1/taxonomy")).status_code == 401

    run(go())


@pytest.mark.parametrize(
    "answer",
    [
        httpx.Response(200, text="<html>proxy page</html>"),
        httpx.Response(200, json={"object": "error", "message": "model not loaded"}),
        httpx.Response(200, json={"id": "x", "choices": []}),
    ],
)
def test_openai_judge_turns_odd_answers_into_judge_errors(answer):
    async def go():
        j = OpenAIJudge("http://judge/v1", "m")
        j._client = httpx.AsyncClient(transport=httpx.MockTransport(lambda req: answer))
        with pytest.raises(JudgeError):
            await j.complete([{"role": "user", "content": "hi"}], max_tokens=4)
        await j.aclose()

    run(go())


@pytest.mark.parametrize(
    "answer",
    [
        {"choices": [{"message": {"role": "assistant", "content": ["multilingual"]}}]},  # content parts
        {"choices": [{"message": {"content": "a"}, "logprobs": {"content": [{"logprob": "-0.1"}]}}]},
        {"choices": [{"message": {"content": "a"}, "logprobs": {"content": [{"token": "x"}]}}]},
        {"choices": [{"message": {"content": "a"}, "logprobs": "0"}]},
    ],
    ids=["content-parts", "logprob-string", "logprob-missing", "logprobs-string"],
)
def test_unreadable_completions_are_judge_errors_not_crashes(answer):
    """Found by fuzzing (2026-12-08): these raised AttributeError/TypeError/KeyError, a 500."""

    async def go():
        j = OpenAIJudge("http://judge/v1", "m")
        j._client = httpx.AsyncClient(
            transport=httpx.MockTransport(lambda req: httpx.Response(200, json=answer))
        )
        with pytest.raises(JudgeError, match="unreadable"):
            await j.complete([{"role": "user", "content": "hi"}], max_tokens=4, logprobs=True)
        await j.aclose()

    run(go())


@pytest.mark.parametrize(
    "plps", [[None, [-0.5]], [None, {"1": {"logprob": "abc"}}], [None, {"1": {"lp": -1}}]], ids=str
)
def test_unreadable_prompt_logprobs_are_a_502_naming_the_judge(plps):
    answer = {"choices": [{"message": {"content": "x"}}], "prompt_logprobs": plps, "prompt_token_ids": [0, 1]}
    judge = OpenAIJudge("http://judge/v1", "m")
    judge._client = httpx.AsyncClient(
        transport=httpx.MockTransport(lambda req: httpx.Response(200, json=answer))
    )
    svc = Service(ServiceSettings(method=MethodSettings(classify_mode="channel")), judge, "tok")

    async def go():
        transport = httpx.ASGITransport(app=create_app(svc))
        async with httpx.AsyncClient(transport=transport, base_url="http://t") as c:
            body = {"latents": [json.loads(evidence(1, FRENCH).model_dump_json())]}
            r = await c.post("/v1/labels", json=body, headers={"Authorization": "Bearer tok"})
            assert r.status_code == 502 and "prompt log-probabilities are unreadable" in r.text, r.text

    run(go())


def test_a_positive_logprob_from_a_judge_is_a_probability_of_one():
    from serve.judge import Completion

    assert Completion(text="a", logprob=800.0).prob == 1.0 and Completion(text="a", logprob=-1.0).prob < 1


def test_a_server_refusing_vllms_request_fields_is_named_as_such():
    """judge.kind: openai against OpenAI's API (or a server forbidding unknown fields): the 400 says
    that a vLLM server is needed; other 400s are passed on as they are. The body sent is vLLM's."""
    sent = []

    def refuse(req):
        sent.append(json.loads(req.content))
        return httpx.Response(
            400, json={"error": {"message": "Unrecognized request argument supplied: structured_outputs"}}
        )

    async def go():
        j = OpenAIJudge("http://judge/v1", "m")
        j._client = httpx.AsyncClient(transport=httpx.MockTransport(refuse))
        with pytest.raises(JudgeError, match="point judge.endpoint at a vLLM OpenAI-compatible server"):
            await j.complete(
                [{"role": "user", "content": "hi"}], max_tokens=4, choice=["a", "b"], prefill="x"
            )
        for own in (  # vLLM's own 400s about the fields' values, a JSON error: passed on as they are
            "bad max_tokens",
            '{"error": {"message": "prompt_logprobs must be a positive value or -1", "param": "prompt_logprobs"}}',
            "structured_outputs.json cannot be an empty string",
            "Extra data: line 1 column 5",
        ):
            j._client = httpx.AsyncClient(
                transport=httpx.MockTransport(lambda req, own=own: httpx.Response(400, text=own))
            )
            with pytest.raises(JudgeError) as e:
                await j.complete([{"role": "user", "content": "hi"}], max_tokens=4)
            assert "vLLM" not in str(e.value) and own[:20] in str(e.value), own
        j._client = httpx.AsyncClient(  # pydantic's refusal of an unknown field names the fix too
            transport=httpx.MockTransport(
                lambda req: httpx.Response(
                    422, json={"detail": [{"type": "extra_forbidden", "loc": ["body", "structured_outputs"]}]}
                )
            )
        )
        with pytest.raises(JudgeError, match="vLLM OpenAI-compatible server"):
            await j.complete([{"role": "user", "content": "hi"}], max_tokens=4, choice=["a"])
        await j.aclose()

    run(go())
    (body,) = sent
    assert body["structured_outputs"] == {"choice": ["a", "b"]} and body["continue_final_message"] is True
    assert body["messages"][-1] == {"role": "assistant", "content": "x"}


def test_judge_errors_and_health_never_show_the_endpoints_credentials():
    """judge.endpoint may carry user:password@ or a signed query; /healthz (unauthenticated) and
    error messages name the judge without them."""

    async def go():
        j = OpenAIJudge("http://user:pw-s3cret@judge:8000/v1?sig=s3cret", "m")
        j._client = httpx.AsyncClient(transport=httpx.MockTransport(lambda req: httpx.Response(500)))
        with pytest.raises(JudgeUnavailable) as e:
            await j.health()
        assert "http://judge:8000/v1" in str(e.value) and "s3cret" not in str(e.value)
        j._client = httpx.AsyncClient(
            transport=httpx.MockTransport(lambda req: httpx.Response(200, json={"data": [{"id": "x"}]}))
        )
        note = await j.health()
        assert "judge:8000" in note and "s3cret" not in note
        await j.aclose()

    run(go())


def test_non_finite_prompt_logprobs_never_make_a_nan_confidence():
    from serve.judge import _sum_prompt_logprobs

    assert (
        _sum_prompt_logprobs([None, {"5": {"logprob": float("-inf")}}, {"6": {"logprob": -1.0}}], [0, 5, 6])
        == -101.0
    )
    tax = load_taxonomy("serve/taxonomies/demo.yaml")
    judge = ScriptedJudge(scripted(), scorer=lambda m, p: float("-inf"))
    out, _ = run(Labeller(judge, tax, MethodSettings(classify_mode="channel")).label(evidence(1, FRENCH)))
    assert 0.0 <= out.confidence <= 1.0 and out.category in tax.names


def test_cache_writes_never_fail_a_label(tmp_path, monkeypatch):
    from pathlib import Path

    def full_disk(self, *a, **k):
        raise OSError(28, "No space left on device")

    cache = LabelCache(10, str(tmp_path / "c"))
    monkeypatch.setattr(Path, "write_text", full_disk)  # the disk copy is lost, the label is not
    lab = Labeller(ScriptedJudge(scripted()), load_taxonomy(), MethodSettings(), cache=cache)
    out, _ = run(lab.label(evidence(1, FRENCH)))
    monkeypatch.undo()
    assert out.category == "multilingual" and not list((tmp_path / "c").iterdir())
    assert run(lab.label(evidence(2, FRENCH)))[1]  # still cached in memory


def test_identical_latents_in_one_request_are_judged_once():
    judge = ScriptedJudge(scripted())
    lab = Labeller(judge, load_taxonomy(), MethodSettings())
    run(lab.label_many([evidence(1, FRENCH)]))
    one = judge.calls
    lab2 = Labeller(ScriptedJudge(scripted()), load_taxonomy(), MethodSettings())
    labs, hits = run(lab2.label_many([evidence(i, FRENCH) for i in (4, 5, 6)] + [evidence(7, REFUSALS)]))
    assert [x.latent for x in labs] == [4, 5, 6, 7] and hits == 2
    assert lab2.judge.calls == 2 * one and len({x.cache_key for x in labs[:3]}) == 1
