"""The labelling service as other clients and operators meet it: another judge behind the same
settings, whitespace-only evidence, non-English taxonomies, Persian and C++ tokens, secrets made
from files, bodies that are not UTF-8, analyses with wider windows than the service accepts."""

from __future__ import annotations

import asyncio

import httpx
import pytest
from test_serve_helpers import FRENCH, evidence, scripted

from diffing.evidence import Example, LatentEvidence, fit_to_limits
from serve import prompts
from serve.app import Service, create_app
from serve.judge import Completion, ScriptedJudge
from serve.labeller import Labeller
from serve.settings import AuthSettings, JudgeSettings, MethodSettings, ServiceSettings
from serve.taxonomy import Taxonomy, load_taxonomy


def run(coro):
    return asyncio.run(coro)


def test_a_judge_given_by_its_source_is_named_after_it_and_keys_its_own_labels(monkeypatch):
    monkeypatch.delenv("CROSSDIFF_JUDGE_MODEL", raising=False)
    assert JudgeSettings(model_source="Qwen/Qwen2.5-7B-Instruct").model_id == "Qwen2.5-7B-Instruct"
    assert JudgeSettings(model_source="/models/llama/", model_id="judge").model_id == "judge"  # explicit wins
    assert JudgeSettings(model_source="./").model_id not in ("", ".")
    # the machine-local variable does not rename: label settings must not differ between machines
    monkeypatch.setenv("CROSSDIFF_JUDGE_MODEL", "/models/gemma-2-9b-it")
    assert JudgeSettings().model_id == "smollm2-135m-instruct"
    monkeypatch.delenv("CROSSDIFF_JUDGE_MODEL")
    # the same name over other models, engines or temperatures: other cache keys
    setups = [
        JudgeSettings(model_id="judge", model_source="a/one"),
        JudgeSettings(model_id="judge", model_source="b/two"),
        JudgeSettings(model_id="judge", model_source="a/one", temperature=0.7),
        JudgeSettings(model_id="judge", model_source="a/one", engine_kwargs={"max_model_len": 8192}),
        JudgeSettings(model_id="judge", kind="openai", endpoint="http://x:8000/v1"),
    ]
    tax, ev = load_taxonomy(), evidence(1, FRENCH)
    keys = {
        Labeller(ScriptedJudge(scripted(), model="judge"), tax, MethodSettings(), judge_setup=s.setup()).key(
            ev, None, False
        )
        for s in setups
    }
    assert len(keys) == len(setups)


def test_channel_scoring_never_labels_whitespace_from_the_prior_alone():
    tax = load_taxonomy()
    cfg = MethodSettings(classify_mode="channel")
    blank = Example(tokens=["\n", "\n", "\t"], acts=[1.0, 1.0, 1.0], peak=0)
    calls = []

    def scorer(messages, prefill):
        calls.append(prefill)
        return -1.0

    lab = Labeller(ScriptedJudge(scripted(), scorer=scorer), tax, cfg)
    out, _ = run(lab.label(LatentEvidence(latent=1, group="g", top=[blank])))
    assert out.confidence == 0.0 and "no visible text" in out.explanation
    assert not [p for p in calls if not p]  # no score was taken without the latent's text
    # whitespace top examples but readable quantile samples: those are scored
    quant = Example(tokens=["Bonjour", " le", " monde"], acts=[2.0, 0, 0], peak=0, quantile=1)
    ev = LatentEvidence(latent=2, group="g", top=[blank], quantiles=[quant])
    assert prompts.channel_text(ev, cfg) == "Bonjour le monde"


def test_long_non_english_category_names_get_the_output_budget_they_need():
    names = ["多语言能力与跨语言翻译以及本地化支持相关的特征类别", "安全与内容审核", "其他"]
    tax = Taxonomy(version="zh", categories=[{"name": n, "description": f"关于{n}"} for n in names])
    budgets = []

    class Recording(ScriptedJudge):
        async def complete(self, messages, *, max_tokens, choice=None, json_schema=None, **kw):
            budgets.append((bool(choice), bool(json_schema), max_tokens))
            if choice:
                return Completion(text=" " + names[0], logprob=-0.1)
            if json_schema:
                return Completion(text=f'{{"category": "{names[0]}", "secondary": null, "confidence": 4}}')
            return Completion(text="about translation.")

    for mode in ("json", "choice"):
        out, _ = run(
            Labeller(Recording(scripted()), tax, MethodSettings(classify_mode=mode)).label(
                evidence(1, FRENCH)
            )
        )
        assert out.category == names[0]
    longest = max(len(n.encode()) for n in names)  # ≥ the tokens of a byte-level tokenizer
    assert all(b >= longest + 8 for c, j, b in budgets if c) and all(
        b >= 2 * longest for c, j, b in budgets if j
    )


def test_tokens_are_shown_as_written_and_never_as_marks():
    persian = Example(tokens=["می\u200cخواهم"], acts=[2.0], peak=0)
    assert "\u200c" in prompts.render(persian, n=8, threshold=None)  # ZWNJ is part of the word
    cpp = Example(
        tokens=["std::cout", " <<", " x", " >>", " y", "<<<", "grid>>>"], acts=[0, 0, 2.0, 0, 0, 0, 0], peak=2
    )
    shown = prompts.render(cpp, n=8, threshold=1.0)
    assert shown.count("<<") == 1 and shown.count(">>") == 1  # only the mark around " x"
    hidden = Example(tokens=["a\u202eb", "c\U000e0041d"], acts=[1.0, 0.0], peak=0)  # bidi override, tag char
    assert prompts.render(hidden, n=8, threshold=None) == "a bc d"
    assert "<< x>>" in shown or "<<x>>" in shown


def test_a_token_from_a_file_made_secret_and_non_ascii_tokens_authenticate(monkeypatch):
    monkeypatch.setenv("CROSSDIFF_API_TOKEN", "s3cret\n")
    assert AuthSettings().token() == "s3cret"

    async def go(token: str, sent: bytes) -> int:
        app = create_app(Service(ServiceSettings(), ScriptedJudge(scripted()), token))
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://t") as c:
            r = await c.get("/v1/taxonomy", headers=[(b"authorization", b"Bearer " + sent)])
            return r.status_code

    assert run(go("s3cret", b"s3cret")) == 200
    assert run(go("clé-ü", "clé-ü".encode())) == 200
    assert run(go("clé-ü", b"cle-u")) == 401


def test_a_body_that_is_not_utf8_gets_the_error_shape_with_its_field():
    async def go():
        app = create_app(Service(ServiceSettings(), ScriptedJudge(scripted()), "tok"))
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t") as c:
            return await c.post(
                "/v1/labels",
                content=b'{"latents": ["\xff\xfe"]}',
                headers={"Authorization": "Bearer tok", "content-type": "application/json"},
            )

    r = run(go())
    assert 400 <= r.status_code < 500 and r.json()["field"] == "body" and "UTF-8" in r.json()["detail"]


@pytest.mark.parametrize("n_top,width", [(150, 20), (5, 700)])
def test_evidence_wider_than_the_service_limits_is_cut_to_fit(n_top, width):
    def ex(i):
        toks = [f" t{j}" for j in range(width)]
        acts = [0.0] * width
        peak = (i * 37) % width
        acts[peak] = 1.0 + i
        return Example(tokens=toks, acts=acts, peak=peak)

    ev = LatentEvidence(latent=1, group="g", top=[ex(i) for i in range(n_top)])
    cut = fit_to_limits(ev, max_examples=100, max_window=512)
    assert len(cut.top) == min(n_top, 100)
    for a, b in zip(ev.top, cut.top, strict=False):
        assert (
            len(b.tokens) <= 512 and b.tokens[b.peak] == a.tokens[a.peak] and b.acts[b.peak] == a.acts[a.peak]
        )
    small = LatentEvidence(latent=2, group="g", top=[ex(0)] if width <= 512 else [])
    assert fit_to_limits(small, 100, 512) is small  # within the limits: untouched
    # the cut is centred on the peak (as the judge's prompt window), clamped at the window's end
    toks = [f" t{j}" for j in range(700)]
    for peak, want in ((300, 256), (690, 502), (5, 5)):
        acts = [0.0] * 700
        acts[peak] = 2.0
        one = LatentEvidence(latent=3, group="g", top=[Example(tokens=toks, acts=acts, peak=peak)])
        b = fit_to_limits(one, 100, 512).top[0]
        assert (
            len(b.tokens) == 512
            and b.peak == want
            and b.tokens[b.peak] == f" t{peak}"
            and b.acts[b.peak] == 2.0
        )


def test_an_engine_that_is_busy_or_down_is_unavailable_not_a_judge_error():
    from types import SimpleNamespace

    from serve.judge import JudgeError, JudgeUnavailable, _error_response
    from serve.labeller import prompt_too_long

    busy = _error_response(SimpleNamespace(message="The engine is overloaded", code=503), "x")
    assert isinstance(busy, JudgeUnavailable)  # 503 with Retry-After: the label job retries
    nested = SimpleNamespace(error=SimpleNamespace(message="EngineDeadError", code="500"))
    assert isinstance(_error_response(nested, "x"), JudgeUnavailable)
    refused = _error_response(
        SimpleNamespace(message="This model's maximum context length is 2048 tokens.", code=400), "x"
    )
    assert isinstance(refused, JudgeError) and prompt_too_long(refused)
    assert str(_error_response(SimpleNamespace(), "no answer")) == "judge error: no answer"
