"""Labelling service without a model: prompts, labeller, cache and the HTTP API (scripted judge)."""

from __future__ import annotations

import asyncio
import json

import httpx
import numpy as np
import pytest
from test_serve_helpers import FRENCH, NEUTRAL, REFUSALS, TEMPLATE, evidence, scripted

from diffing.evidence import LatentLabel
from serve import prompts
from serve.app import Service, create_app
from serve.judge import JudgeError, JudgeUnavailable, ScriptedJudge
from serve.labeller import LabelCache, Labeller, calibration_texts
from serve.settings import LimitSettings, MethodSettings, ServiceSettings, check_bind
from serve.taxonomy import Taxonomy, load_taxonomy

PAPER = [
    "safety & content moderation", "multilingual", "instruction following", "template following",
    "factual verification", "hallucination management", "self-reference", "query classification",
    "structured output", "code generation", "math", "other technical", "other", "uninterpretable",
]  # fmt: skip


def run(coro):
    return asyncio.run(coro)


def test_default_taxonomy_is_the_papers():
    tax = load_taxonomy()
    assert tax.names == PAPER
    assert all(c.description for c in tax.categories)
    with pytest.raises(ValueError, match="duplicate"):
        Taxonomy(version="x", categories=[{"name": "a", "description": "d"}] * 2)


def test_judge_never_sees_sources_groups_or_stats():
    seen = []

    def fn(messages, choice, schema):
        seen.extend(m["content"] for m in messages)
        return scripted()(messages, choice, schema)

    ev = evidence(3, FRENCH, negatives=NEUTRAL, group="SECRET-GROUP")
    lab = Labeller(ScriptedJudge(fn), load_taxonomy(), MethodSettings())
    run(lab.label(ev, None, detection=True))
    text = "\n".join(seen)
    assert "Bonjour" in text and "<<" in text  # the examples, with firing tokens marked
    for secret in ("SECRET-SOURCE-TAG", "NEG-SOURCE", "SECRET-GROUP", "delta_norm", "0.01"):
        assert secret not in text


def test_highlight_marks_exactly_the_firing_tokens():
    from test_serve_helpers import example

    ex = example("the cat sat on the mat", hot={"cat", "mat"})
    assert prompts.render(ex, n=24, threshold=1.0) == "the <<cat>> sat on the <<mat>>"
    assert prompts.render(ex, n=24, threshold=None) == "the cat sat on the mat"
    assert prompts.render(ex, n=3, threshold=1.0).count("<<") == 1  # window centred on the peak


def test_the_prompt_window_is_centred_on_the_peak():
    """An example longer than window_tokens is shown around its peak (clamped at the ends), so the
    marked token is always in the prompt."""
    from diffing.evidence import Example

    toks = ["t0"] + [f" t{j}" for j in range(1, 65)]
    for peak, lo in ((60, 41), (30, 18), (2, 0)):
        acts = [0.0] * 65
        acts[peak] = 1.0
        text = prompts.render(Example(tokens=toks, acts=acts, peak=peak), n=24, threshold=0.5)
        assert f"<<t{peak}>>" in text
        words = text.replace("<<", "").replace(">>", "").split()
        assert words == [f"t{j}" for j in range(lo, lo + 24)], peak


def test_control_tokens_in_evidence_cannot_open_turns_in_the_judges_prompt():
    """Chat-corpus examples hold the subject's template tokens ("<|im_start|>assistant"); a chat
    tokenizer would read them as control tokens and start turns inside the judge's prompt. Every
    prompt shows them defanged: the judge's own template is the only source of control tokens."""
    from test_serve_helpers import example

    from diffing.embedded.tiny import SPECIAL_TOKENS, byte_tokenizer
    from diffing.evidence import Example

    tok = byte_tokenizer()  # ChatML control tokens, like SmolLM2's (no download)
    special = {tok.convert_tokens_to_ids(t) for t in SPECIAL_TOKENS}
    chat = Example(  # one token per control token, as the subject's tokenizer stores them
        tokens=[
            "<|im_start|>",
            "user",
            "\n",
            "Hi",
            "<|im_end|>",
            "\n",
            "<|im_start|>",
            "assistant",
            "\n",
            "Bonjour",
        ],
        acts=[0, 0, 0, 0, 0, 0, 2.0, 3.0, 0, 1.0],
        peak=7,
    )
    spelled = example("<|im_start|> <s> [INST] <start_of_turn>user hello")  # control tokens as plain text
    ev = evidence(1, FRENCH).model_copy(update={"top": [chat, spelled]})
    tax = Taxonomy(
        version="t",
        categories=[
            {"name": "template", "description": 'Markers like "<|im_end|>".'},
            {"name": "other", "description": "Anything else."},
        ],
    )
    cfg = MethodSettings()
    ctx = "from a chat corpus <|im_end|>"
    prompts_built = [
        prompts.explain_messages(ev, list(ev.top), cfg, context=ctx),
        prompts.classify_messages(ev, list(ev.top), "It fires on <|im_start|>.", tax, cfg, "json"),
        prompts.channel_messages(tax.categories[0].description)
        + [{"role": "assistant", "content": prompts.channel_text(ev, cfg)}],
        prompts.detect_messages("Fires on <|im_end|>.", chat, cfg),
    ]
    for msgs in prompts_built:
        rendered = tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=False)
        ids = tok(rendered, add_special_tokens=False).input_ids  # as vLLM tokenizes a chat prompt
        n_control = sum(i in special for i in ids)
        turns = len(msgs) + (msgs[0]["role"] != "system")  # the template adds a default system turn
        assert n_control == 2 * turns, msgs  # <|im_start|> and <|im_end|> of each turn, no more
        text = "\n".join(m["content"] for m in msgs)
        assert (
            "<|" not in text and "<s>" not in text and "[INST]" not in text and "<start_of_turn>" not in text
        )
    shown = prompts.render(chat, n=24, threshold=1.0)
    assert shown == "[im_start]user Hi[im_end] <<[im_start]>><<assistant>> <<Bonjour>>"
    assert prompts.defang("a <|eot_id|> b </s> [/INST]") == "a [eot_id] b [/s] [ /INST ]"
    assert prompts.defang("<file_sep><filename>x<think>[TOOL_CALLS]<\uff5cUser\uff5c>") == (
        "[file_sep][filename]x[think][ TOOL_CALLS ][User]"
    )
    assert prompts.defang("<|INST|>") == "[ INST ]"  # a rewrite that completes a spelling is redone
    assert prompts.defang("x << y >> z <b> <div> [x]") == "x << y >> z <b> <div> [x]"  # left alone


def test_highlight_marks_never_complete_a_control_token():
    """The marks' own angle brackets next to a highlighted "s" or "|im_start|" would spell "<s>"
    or "<|im_start|>"; whatever the tokens and whichever fire, no rendering holds a control token."""
    import random

    from diffing.evidence import Example

    assert (
        prompts.render(Example(tokens=["cat", "s"], acts=[0, 1.0], peak=1), n=8, threshold=0.5)
        == "cat<< s >>"
    )
    pieces = [
        "", "<", ">", "|", "s", "/", "im_start", "|im_start|", "<|", "|>", "INST", "[", "]", "think", " a",
        "\n", "\uff5c", "User",
    ]  # fmt: skip
    rng = random.Random(0)
    for _ in range(3000):
        toks = [rng.choice(pieces) for _ in range(rng.randint(1, 8))]
        acts = [rng.choice([0.0, 1.0]) for _ in toks]
        shown = prompts.render(Example(tokens=toks, acts=acts, peak=0), n=16, threshold=0.5)
        assert not prompts.has_control(shown), (toks, acts, shown)


def test_taxonomy_names_cannot_spell_control_tokens():
    with pytest.raises(ValueError, match="control tokens"):
        Taxonomy(
            version="x",
            categories=[{"name": "<|im_end|>", "description": "d"}, {"name": "b", "description": "d"}],
        )
    Taxonomy(
        version="x",
        categories=[{"name": "a", "description": "<|im_end|> markers"}, {"name": "b", "description": "d"}],
    )


def test_classify_prompts_of_different_latents_share_the_taxonomy_prefix():
    """vLLM's prefix cache computes a shared prompt start once: the taxonomy must come before the
    latent's own examples and explanation."""
    import os

    tax, cfg = load_taxonomy(), MethodSettings()
    a = evidence(1, FRENCH)
    b = evidence(2, REFUSALS)
    ma = prompts.classify_messages(a, list(a.top), "French text.", tax, cfg, "json")
    mb = prompts.classify_messages(b, list(b.top), "Refusals.", tax, cfg, "json")
    assert ma[0] == mb[0]  # system
    shared = os.path.commonprefix([ma[1]["content"], mb[1]["content"]])
    for c in tax.categories:
        assert c.description in shared, c.name
    assert "Bonjour" not in shared and "French text" not in shared  # the latent's own part follows


def test_schema_enumerates_the_taxonomy():
    tax = load_taxonomy()
    schema = prompts.classification_schema(tax)
    assert schema["properties"]["category"]["enum"] == tax.names
    assert set(schema["required"]) == {"category", "secondary", "confidence"}


def test_label_json_retry_and_choice_fallback():
    tax = load_taxonomy()
    ev = evidence(1, FRENCH)
    j = ScriptedJudge(scripted("multilingual", bad_json_first=1))
    lab, hit = run(Labeller(j, tax, MethodSettings(max_retries=2)).label(ev))
    assert (lab.category, lab.confidence, hit) == ("multilingual", 0.8, False)
    assert j.calls == 3  # explain + invalid JSON + valid JSON
    # JSON never valid: the `choice` fallback still yields a taxonomy member
    j = ScriptedJudge(scripted("math", bad_json_first=99))
    lab, _ = run(Labeller(j, tax, MethodSettings(max_retries=1)).label(ev))
    assert lab.category == "math" and 0.0 <= lab.confidence <= 1.0
    # nothing valid at all -> JudgeError (502), never a made-up label
    j = ScriptedJudge(lambda m, c, s: "banana")
    with pytest.raises(JudgeError):
        run(Labeller(j, tax, MethodSettings(max_retries=1)).label(ev))


def channel_scorer():
    """log p(prompt) of a toy judge: each request costs its own (arbitrary) log-probability, and the
    examples that follow are likelier by 5 nats under the request whose topic matches them (French
    text / Text in French..., refusals / Refusals ...) than the neutral baseline text is. Counts
    baseline and scored calls."""
    calls = {"prior": 0, "scored": 0}
    req_cost = {}

    def scorer(messages, prefill):
        req = messages[-1]["content"]
        lp = req_cost.setdefault(req, -10.0 - 3.0 * len(req_cost)) - 40.0
        if prefill == prompts.CHANNEL_BASELINE:
            calls["prior"] += 1
            return lp
        calls["scored"] += 1
        french = "Bonjour" in prefill or "Louvre" in prefill
        match = ("French" in req and french) or ("Refusals" in req and not french)
        return lp + (5.0 if match else 0.0)

    return scorer, calls


def test_channel_classification_scores_examples_under_each_category():
    """The channel mode picks the category under whose request the judge finds the examples
    likeliest relative to neutral text: log p(request + examples) - log p(request + neutral);
    each request's own cost cancels."""
    tax = load_taxonomy("serve/taxonomies/demo.yaml")
    fr, ref = evidence(1, FRENCH), evidence(2, REFUSALS)
    scorer, calls = channel_scorer()
    judge = ScriptedJudge(scripted("self-reference"), scorer=scorer)
    lab = Labeller(judge, tax, MethodSettings(classify_mode="channel", channel_examples=3))
    a, _ = run(lab.label(fr))
    b, _ = run(lab.label(ref))
    assert a.category == "multilingual" and b.category == "safety & content moderation"
    assert a.secondary not in (None, a.category) and 0.9 < a.confidence <= 1.0
    assert a.explanation  # the explanation is still written (for the report)
    # the neutral baselines are measured once per taxonomy and reused
    n = len(tax.names)  # the baseline once per category, each latent once per category
    assert calls == {"prior": n, "scored": 2 * n}
    # only the top examples, unmarked, one per line
    text = prompts.channel_text(fr, MethodSettings(channel_examples=3))
    assert text.count("\n") == 2 and "<<" not in text and text.startswith("Bonjour")
    # a judge that cannot score prompts: a clear error, not a made-up label
    nolp = Labeller(ScriptedJudge(scripted()), tax, MethodSettings(classify_mode="channel"))
    with pytest.raises(JudgeError, match="prompt"):
        run(nolp.label(fr))


def test_channel_calibration_measures_categories_against_the_runs_own_latents():
    """A fixed neutral English baseline hands a request's penalty on English text back to every
    English latent: a judge that finds the neutral text far less likely under the French request
    (-30) than easy-to-predict chat text (-10) files chat-template and refusal latents as
    multilingual. Measured against ordinary latents of the run (the calibration set: chat text),
    each category wins only where a latent's text is likelier under its request than theirs."""
    tax = load_taxonomy("serve/taxonomies/demo.yaml")
    french_starts = tuple(t.split(" ")[0] for t in FRENCH)
    ordinary = [f"<|im_start|>user {t}" for t in NEUTRAL]  # one template marker per line
    cfg = MethodSettings(classify_mode="channel", channel_examples=3)
    calib = [evidence(100 + i, ordinary[i:] + ordinary[:i], group="baseline") for i in range(3)]
    baselines = {prompts.CHANNEL_BASELINE, *calibration_texts(calib, cfg)}
    calls = {"prior": 0, "scored": 0}

    def scorer(messages, prefill):
        req, text = messages[-1]["content"], prefill
        kind = "neutral" if text == prompts.CHANNEL_BASELINE else "other"
        calls["prior" if text in baselines else "scored"] += 1
        lp = -40.0
        if "French" in req and not text.startswith(french_starts):
            lp -= 30.0 if kind == "neutral" else 10.0
        if "chat template" in req:
            lp += text.count("[im_start]")
        if "Refusals" in req and ("can't" in text or "cannot" in text):
            lp += 5.0
        return lp

    fr, ref, tpl = evidence(1, FRENCH), evidence(2, REFUSALS), evidence(3, TEMPLATE)

    lab = Labeller(ScriptedJudge(scripted(), scorer=scorer), tax, cfg)
    n = len(tax.names)

    async def go():  # one event loop: the labeller's lock lives in it
        plain, _ = await lab.label_many([fr, ref, tpl])
        assert [x.category for x in plain] == ["multilingual"] * 3  # the neutral text's bias
        calls.update(prior=0, scored=0)
        got, hits = await lab.label_many([fr, ref, tpl], calibration=calib)
        assert hits == 0  # calibrated labels have their own cache keys
        assert [x.category for x in got] == [
            "multilingual",
            "safety & content moderation",
            "template following",
        ]
        assert calls == {"prior": 3 * n, "scored": 3 * n}  # the calibration set is scored once
        again, hits = await lab.label_many([tpl], calibration=calib)
        assert hits == 1 and again[0] == got[2] and calls["prior"] == 3 * n
        # calibration latents without top examples leave nothing to score: the neutral text
        empty = evidence(200, NEUTRAL, group="baseline").model_copy(update={"top": []})
        same, hits = await lab.label_many([tpl], calibration=[empty])
        assert hits == 1 and same[0] == plain[2]
        # the baseline is the mean over the calibration texts, per category
        texts = calibration_texts(calib, cfg)
        prior = await lab._channel_prior(texts)
        for c in tax.categories:
            want = np.mean([scorer(prompts.channel_messages(c.description), t) for t in texts])
            assert prior[c.name] == pytest.approx(want)

    run(go())
    # only the channel mode reads the calibration: json labels keep their keys without it
    js = Labeller(ScriptedJudge(scripted()), tax, MethodSettings())
    assert js.key(tpl, None, False) == js.key(tpl, None, False, ("anything",))
    assert lab.key(tpl, None, False) != lab.key(tpl, None, False, ("anything",))


def test_judge_without_a_system_role_gets_the_instructions_in_the_user_turn():
    """Gemma 2's chat template refuses a system message (vLLM answers 400 "System role not
    supported"): `auto` folds it into the first user message and goes on, for generation and for
    channel scoring; `message` surfaces the judge's error; other errors are never swallowed."""
    rejected = JudgeError('judge at http://j/v1 answered 400: {"message": "System role not supported"}')
    seen = []

    def fn(messages, choice, schema):
        if messages[0]["role"] == "system":
            return rejected
        seen.append(messages)
        return scripted()(messages, choice, schema)

    tax, ev = load_taxonomy(), evidence(1, FRENCH)
    j = ScriptedJudge(fn)
    auto = Labeller(j, tax, MethodSettings())
    lab, _ = run(auto.label(ev))
    assert lab.category == "multilingual" and lab.explanation.startswith("These snippets")
    assert j.calls == 3  # explain rejected once, then explain and classify folded
    # made from folded prompts, so keyed (and cached) as folded, not under the key computed before
    folded_key = Labeller(j, tax, MethodSettings(), system_role="fold").key(ev, None, False)
    assert lab.cache_key == folded_key and auto.cache.get(folded_key) is not None
    assert all(m[0]["role"] == "user" and m[0]["content"].startswith(prompts.SYSTEM + "\n\n") for m in seen)
    assert "Bonjour" in seen[0][0]["content"]  # the user turn itself follows the instructions
    j = ScriptedJudge(fn)
    run(Labeller(j, tax, MethodSettings(), system_role="fold").label(ev))
    assert j.calls == 2  # folded from the start
    with pytest.raises(JudgeError, match="System role"):
        run(Labeller(ScriptedJudge(fn), tax, MethodSettings(), system_role="message").label(ev))
    with pytest.raises(JudgeError, match="boom"):  # an unrelated judge error is not retried folded
        run(Labeller(ScriptedJudge(lambda m, c, s: JudgeError("boom")), tax, MethodSettings()).label(ev))

    base_scorer, _ = channel_scorer()

    def scorer(messages, prefill):
        if messages[0]["role"] == "system":
            raise JudgeError("Conversation roles must alternate user/assistant/user/assistant/...")
        return base_scorer(messages, prefill)

    demo = load_taxonomy("serve/taxonomies/demo.yaml")
    j = ScriptedJudge(fn, scorer=scorer)
    lab, _ = run(Labeller(j, demo, MethodSettings(classify_mode="channel")).label(ev))
    assert lab.category == "multilingual"


def test_detection_is_balanced_accuracy():
    tax = load_taxonomy()
    ev = evidence(2, FRENCH, negatives=NEUTRAL)
    starts = {f[:12] for f in FRENCH}
    perfect = scripted(detect=lambda text: text.split("Text: ")[1][:12] in starts)
    lab, _ = run(Labeller(ScriptedJudge(perfect), tax, MethodSettings()).label(ev, detection=True))
    assert lab.detection_score == 1.0
    always = scripted(detect=lambda text: True)
    lab, _ = run(Labeller(ScriptedJudge(always), tax, MethodSettings()).label(ev, detection=True))
    assert lab.detection_score == 0.5
    assert prompts.balanced_accuracy([True, False], [False, False, True, False]) == pytest.approx(0.625)
    lab, _ = run(
        Labeller(ScriptedJudge(always), tax, MethodSettings()).label(evidence(2, FRENCH), detection=True)
    )
    assert lab.detection_score is None  # no negatives: no score rather than a fake one


def test_detection_examples_are_held_out_of_the_explanation():
    """The detection score tests the explanation on examples the judge did not explain from: the
    held-out positives (the last quantile examples) appear in no explain or classify prompt, and
    each detection prompt shows exactly one of them or one negative."""
    from test_serve_helpers import example

    k = MethodSettings().detection_examples
    quants = [example(f"Bonjour qmark{i} merci", quantile=i % 4) for i in range(k + 4)]
    ev = evidence(3, FRENCH[:4], negatives=[f"nmark{i} {t}" for i, t in enumerate(NEUTRAL)])
    ev = ev.model_copy(update={"quantiles": quants})
    held = {f"qmark{i}" for i in range(4, k + 4)}
    negs = {f"nmark{i}" for i in range(len(NEUTRAL))}
    seen: list[tuple[list | None, str]] = []
    base = scripted()

    def recording(messages, choice, schema):
        seen.append((choice, " ".join(m["content"] for m in messages)))
        return base(messages, choice, schema)

    lab, _ = run(
        Labeller(ScriptedJudge(recording), load_taxonomy(), MethodSettings()).label(ev, detection=True)
    )
    assert lab.detection_score is not None
    detect = [text for choice, text in seen if choice == ["yes", "no"]]
    other = [text for choice, text in seen if choice != ["yes", "no"]]
    assert other and all(not any(m in text for m in held) for text in other)
    assert any("qmark0" in text for text in other)  # the other quantile examples are explained from
    shown = [{m for m in held | negs if m in text} for text in detect]
    assert all(len(x) == 1 for x in shown) and set().union(*shown) == held | negs


def test_cache_key_and_hits(tmp_path):
    tax = load_taxonomy()
    j = ScriptedJudge(scripted())
    lab = Labeller(j, tax, MethodSettings(), cache=LabelCache(100, str(tmp_path)))
    a, hit_a = run(lab.label(evidence(5, FRENCH)))
    calls = j.calls
    b, hit_b = run(lab.label(evidence(9, FRENCH, group="baseline")))  # same judge view, other id/group
    assert (hit_a, hit_b, j.calls) == (False, True, calls)
    assert b.latent == 9 and b.cache_key == a.cache_key and b.category == a.category
    # the key changes with what the judge sees, the judge, the taxonomy and the prompt version
    k0 = lab.key(evidence(5, FRENCH), None, False)
    assert lab.key(evidence(5, REFUSALS), None, False) != k0
    assert lab.key(evidence(5, FRENCH), "ctx", False) != k0
    assert lab.key(evidence(5, FRENCH), None, True) != k0
    other_tax = Taxonomy(version="t2", categories=tax.categories[:3])
    assert Labeller(j, other_tax, MethodSettings()).key(evidence(5, FRENCH), None, False) != k0
    assert (
        Labeller(ScriptedJudge(scripted(), model="other"), tax, MethodSettings()).key(
            evidence(5, FRENCH), None, False
        )
        != k0
    )
    # a judge that reads the system message folded into the user turn sees another prompt
    assert Labeller(j, tax, MethodSettings(), system_role="fold").key(evidence(5, FRENCH), None, False) != k0
    assert (
        Labeller(j, tax, MethodSettings(), system_role="message").key(evidence(5, FRENCH), None, False) == k0
    )
    # ... and with how it is asked: a cache shared by services with other methods answers none of them
    for method in (
        MethodSettings(highlight_frac=0.9),
        MethodSettings(explain_top=3),
        MethodSettings(classify_mode="choice"),
        MethodSettings(window_tokens=12),
    ):
        assert Labeller(j, tax, method).key(evidence(5, FRENCH), None, False) != k0, method
    # the on-disk cache survives a new labeller
    j2 = ScriptedJudge(scripted())
    c, hit = run(
        Labeller(j2, tax, MethodSettings(), cache=LabelCache(100, str(tmp_path))).label(evidence(7, FRENCH))
    )
    assert hit and j2.calls == 0 and c.latent == 7


def test_check_bind():
    check_bind("127.0.0.1", None, False)
    check_bind("::1", None, False)
    check_bind("0.0.0.0", "tok", False)
    check_bind("0.0.0.0", None, True)
    with pytest.raises(PermissionError, match="CROSSDIFF_API_TOKEN"):
        check_bind("0.0.0.0", None, False)
    with pytest.raises(PermissionError):
        check_bind("10.1.2.3", None, False)


# ---------------------------------------------------------------------------------------------- HTTP


def client(judge, token="s3cret", **limits):
    settings = ServiceSettings(limits=LimitSettings(**limits)) if limits else ServiceSettings()
    app = create_app(Service(settings, judge, token))
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    return httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t", headers=headers)


def body(*evs, detection=False):
    return {"latents": [json.loads(e.model_dump_json()) for e in evs], "detection": detection}


def test_http_auth_health_taxonomy_labels():
    async def go():
        j = ScriptedJudge(scripted("multilingual"))
        async with client(j) as c:
            r = await c.post(
                "/v1/labels", json=body(evidence(1, FRENCH)), headers={"Authorization": "Bearer nope"}
            )
            assert r.status_code == 401 and r.json()["field"] == "Authorization"
            assert r.headers["www-authenticate"] == "Bearer"
            r = await c.get("/v1/taxonomy", headers={"Authorization": ""})
            assert r.status_code == 401
            assert (
                await c.get("/healthz", headers={"Authorization": ""})
            ).status_code == 200  # probes need no token
            r = await c.get("/v1/taxonomy")
            assert r.status_code == 200 and [x["name"] for x in r.json()["categories"]] == PAPER
            r = await c.post("/v1/labels", json=body(evidence(1, FRENCH), evidence(2, REFUSALS)))
            assert r.status_code == 200, r.text
            out = r.json()
            labs = [LatentLabel.model_validate(x) for x in out["labels"]]
            assert [x.latent for x in labs] == [1, 2] and {x.category for x in labs} == {"multilingual"}
            assert out["prompt_version"] == prompts.PROMPT_VERSION and out["cached"] == 0
            r = await c.post("/v1/labels", json=body(evidence(3, FRENCH)))
            assert r.json()["cached"] == 1
            assert "/v1/labels" in (await c.get("/openapi.json")).json()["paths"]
            j.healthy = False
            r = await c.get("/healthz")
            assert r.status_code == 503 and r.json()["status"] == "unavailable" and "retry-after" in r.headers

    run(go())


def test_http_limits_name_the_field():
    async def go():
        async with client(
            ScriptedJudge(scripted()), max_body_bytes=20_000, max_batch=2, max_examples=8, max_calibration=4
        ) as c:
            big = body(*(evidence(i, FRENCH) for i in range(30)))
            r = await c.post("/v1/labels", json=big)
            assert (
                r.status_code == 413
                and "max_body_bytes" in r.json()["detail"]
                and r.json()["field"] == "body"
            )
            r = await c.post("/v1/labels", json=body(*(evidence(i, NEUTRAL) for i in range(3))))
            assert (
                r.status_code == 422 and r.json()["field"] == "latents" and "max_batch" in r.json()["detail"]
            )
            r = await c.post("/v1/labels", json=body(evidence(0, FRENCH * 2)))
            assert r.status_code == 422 and r.json()["field"] == "latents.0.quantiles"
            bad = body(evidence(0, NEUTRAL))
            bad["latents"][0]["top"][1]["acts"] = [1.0]  # tokens and acts disagree
            r = await c.post("/v1/labels", json=bad)
            assert r.status_code == 422 and r.json()["field"].startswith("latents.0.top.1")
            bad = body(evidence(0, NEUTRAL))
            del bad["latents"][0]["latent"]
            r = await c.post("/v1/labels", json=bad)
            assert r.status_code == 422 and r.json()["field"] == "latents.0.latent"
            r = await c.post("/v1/labels", content=b"{not json", headers={"Content-Type": "application/json"})
            assert r.status_code == 422
            r = await c.post("/v1/labels", json={"latents": []})
            assert r.status_code == 422 and r.json()["field"] == "latents"
            calib = [evidence(9, NEUTRAL[:1], group="baseline").model_dump(mode="json")]
            one = body(evidence(0, NEUTRAL[:1]))
            r = await c.post("/v1/labels", json={**one, "calibration": calib * 3})
            assert r.status_code == 200  # 3 > max_batch but <= max_calibration
            r = await c.post("/v1/labels", json={**one, "calibration": calib * 5})
            assert r.status_code == 422 and r.json()["field"] == "calibration"
            assert "max_calibration=4" in r.json()["detail"]
            calib[0]["top"] = calib[0]["top"] * 9
            r = await c.post("/v1/labels", json={**one, "calibration": calib})
            assert r.status_code == 422 and r.json()["field"] == "calibration.0.top"
            calib[0]["top"] = calib[0]["top"][:1]
            calib[0]["top"][0] |= {"tokens": ["x"] * 600, "acts": [1.0] * 600, "peak": 0}
            r = await c.post("/v1/labels", json={**one, "calibration": calib})
            assert r.status_code == 422 and r.json()["field"] == "calibration.0.top.0.tokens"
            # a non-finite activation would silently unmark every token (NaN) or all but one (inf)
            raw = json.dumps(body(evidence(0, NEUTRAL))).replace('"acts": [', '"acts": [NaN, ', 1)
            raw = raw.replace('"tokens": [', '"tokens": ["x", ', 1)
            r = await c.post("/v1/labels", content=raw, headers={"Content-Type": "application/json"})
            assert r.status_code == 422 and r.json()["field"] == "latents.0.top.0.acts.0"
            bad = body(evidence(0, NEUTRAL))
            bad["latents"][0]["top"][0] |= {"tokens": ["x" * 5000], "acts": [1.0], "peak": 0}
            r = await c.post("/v1/labels", json=bad)  # one "token" longer than any token: not a window
            assert r.status_code == 422 and r.json()["field"] == "latents.0.top.0.tokens.0"
            bad["latents"][0]["top"][0] |= {"tokens": [], "acts": [], "peak": 0}
            r = await c.post("/v1/labels", json=bad)
            assert r.status_code == 422 and r.json()["field"] == "latents.0.top.0.tokens"

    run(go())


def test_http_limits_take_a_request_exactly_at_each_limit():
    """A client fills requests to the limits (the label job's batches, fit_to_limits' windows): at
    max_batch latents, max_examples examples and max_window tokens a request is labelled; one more
    of any of them names its field."""
    from diffing.evidence import Example

    def wide(i, n_examples=3, width=16):
        toks = ["w"] + [f" t{j}" for j in range(width - 1)]
        ex = Example(tokens=toks, acts=[0.0] * (width - 1) + [2.0], peak=width - 1)
        return evidence(i, NEUTRAL[:1]).model_copy(update={"top": [ex] * n_examples})

    async def go():
        async with client(ScriptedJudge(scripted()), max_batch=2, max_examples=3, max_window=16) as c:
            r = await c.get("/v1/limits")  # what a client reads to fill its requests
            assert r.status_code == 200 and r.json() == {
                "api_version": "v1",
                "max_batch": 2,
                "max_calibration": LimitSettings().max_calibration,
                "max_examples": 3,
                "max_window": 16,
                "max_body_bytes": LimitSettings().max_body_bytes,
            }
            assert (await c.get("/v1/limits", headers={"Authorization": ""})).status_code == 401
            r = await c.post("/v1/labels", json=body(wide(0), wide(1)))
            assert r.status_code == 200 and len(r.json()["labels"]) == 2
            for evs, field in (
                ((wide(0), wide(1), wide(2)), "latents"),
                ((wide(0, n_examples=4),), "latents.0.top"),
                ((wide(0, width=17),), "latents.0.top.0.tokens"),
            ):
                r = await c.post("/v1/labels", json=body(*evs))
                assert r.status_code == 422 and r.json()["field"] == field, (field, r.json())

    run(go())


def test_http_judge_failures_are_503_502_never_a_hang():
    async def go():
        down = ScriptedJudge(lambda m, c, s: JudgeUnavailable("replica gone"))
        async with client(down) as c:
            r = await c.post("/v1/labels", json=body(evidence(1, FRENCH)))
            assert (
                r.status_code == 503
                and int(r.headers["retry-after"]) > 0
                and "replica gone" in r.json()["detail"]
            )
        broken = ScriptedJudge(lambda m, c, s: "garbage")
        async with client(broken) as c:
            r = await c.post("/v1/labels", json=body(evidence(1, FRENCH)))
            # a judge that fails on this input will again: 502 without Retry-After
            assert r.status_code == 502 and "retry-after" not in r.headers
        slow = ScriptedJudge(scripted(), delay_s=30)
        async with client(slow, request_timeout_s=0.3) as c:
            r = await asyncio.wait_for(c.post("/v1/labels", json=body(evidence(1, FRENCH))), 5)
            assert r.status_code == 503 and "request_timeout_s" in r.json()["detail"]

    run(go())


def test_http_load_with_malformed_requests_has_no_5xx():
    """600 requests, 16 at a time, 10% malformed, against the in-process app: 0 5xx, every bad one 4xx."""

    async def go():
        async with client(ScriptedJudge(scripted(), delay_s=0.001)) as c:
            sem = asyncio.Semaphore(16)
            codes = []

            async def one(i):
                async with sem:
                    if i % 10 == 0:
                        r = await c.post("/v1/labels", json={"latents": [{"latent": -i}]})
                    else:
                        r = await c.post("/v1/labels", json=body(evidence(i, FRENCH[i % 7 :])))
                    codes.append((i % 10 == 0, r.status_code))

            await asyncio.gather(*(one(i) for i in range(600)))
            assert not [c for _, c in codes if c >= 500]
            assert {c for bad, c in codes if bad} == {422} and {c for bad, c in codes if not bad} == {200}

    run(go())


@pytest.mark.parametrize("name", ["cpu.yaml", "gpu.yaml"])
def test_serve_configs_are_valid(name):
    """serve/config/*.yaml: valid Serve deploy schema (serve run / deploy / serveConfigV2) with valid args."""
    from pathlib import Path

    import yaml
    from ray.serve.schema import ServeDeploySchema

    cfg = yaml.safe_load((Path(__file__).parents[1] / "serve" / "config" / name).read_text())
    ServeDeploySchema.model_validate(cfg) if hasattr(
        ServeDeploySchema, "model_validate"
    ) else ServeDeploySchema.parse_obj(cfg)
    (app,) = cfg["applications"]
    assert app["import_path"] == "serve.app:build_app"
    settings = ServiceSettings.model_validate(app["args"])
    assert settings.judge.accelerator == name.split(".")[0]
    assert [d["name"] for d in app["deployments"]] == ["LabellingAPI"]


def test_cpu_judge_engine_uses_every_core_unless_told():
    from serve.app import llm_config
    from serve.settings import JudgeSettings

    def env(**kw):
        cfg = llm_config(JudgeSettings(model_source="/models/judge", **kw))
        return (cfg.runtime_env or {}).get("env_vars", {})

    assert env()["VLLM_CPU_NUM_OF_RESERVED_CPU"] == "0"
    assert env(cpu_reserved_cores=1)["VLLM_CPU_NUM_OF_RESERVED_CPU"] == "1"
    assert "VLLM_CPU_NUM_OF_RESERVED_CPU" not in env(cpu_reserved_cores=None)
    assert "VLLM_CPU_NUM_OF_RESERVED_CPU" not in env(accelerator="gpu")


def test_the_judge_engine_logs_as_its_starter_set_them(monkeypatch, tmp_path):
    """VLLM_LOGGING_LEVEL / VLLM_LOGGING_CONFIG_PATH of whoever starts the service reach the
    engine; the local service's own file keeps vLLM's lines but the loader's per-tensor dtype
    ones (a float32 checkpoint run in bfloat16: 122 lines for the embedded judge)."""
    import os
    import subprocess
    import sys

    from serve.app import llm_config
    from serve.local import write_quiet_vllm_logging
    from serve.settings import JudgeSettings

    def env(**kw):
        return (llm_config(JudgeSettings(model_source="/models/judge", **kw)).runtime_env or {}).get(
            "env_vars", {}
        )

    monkeypatch.delenv("VLLM_LOGGING_LEVEL", raising=False)
    monkeypatch.delenv("VLLM_LOGGING_CONFIG_PATH", raising=False)
    assert "VLLM_LOGGING_CONFIG_PATH" not in env() and "VLLM_LOGGING_LEVEL" not in env(accelerator="gpu")
    path = write_quiet_vllm_logging(str(tmp_path))
    monkeypatch.setenv("VLLM_LOGGING_CONFIG_PATH", path)
    monkeypatch.setenv("VLLM_LOGGING_LEVEL", "WARNING")
    assert (
        env()["VLLM_LOGGING_CONFIG_PATH"] == path
        and env(accelerator="gpu")["VLLM_LOGGING_LEVEL"] == "WARNING"
    )
    script = (
        "from vllm.logger import init_logger, configure_logging\n"
        "from vllm.config.logging import LoggingConfig\n"
        "configure_logging(LoggingConfig())\n"  # as an engine process does
        "init_logger('vllm.model_executor.models.utils').warning('Attempted to load weight w with dtype')\n"
        "init_logger('vllm.model_executor.models.utils').error('loader error kept')\n"
        "init_logger('vllm.engine').info('engine info kept')\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", script],
        env={**os.environ, "VLLM_LOGGING_CONFIG_PATH": path, "VLLM_LOGGING_LEVEL": "INFO"},
        capture_output=True,
        text=True,
        timeout=120,
    )
    text = out.stdout + out.stderr
    assert "loader error kept" in text and "engine info kept" in text, text
    assert "Attempted to load weight" not in text


@pytest.mark.parametrize("native", [False, True])
def test_cpu_judge_dtype_follows_the_hardware_unless_told(cpu_bf16, native):
    from serve.app import llm_config
    from serve.settings import JudgeSettings

    cpu_bf16(native)

    def dtype(**kw):
        return llm_config(JudgeSettings(model_source="/models/judge", **kw)).engine_kwargs.get("dtype")

    assert dtype() == ("bfloat16" if native else "float32")
    assert dtype(cpu_dtype="float32") == "float32"
    assert dtype(cpu_dtype="bfloat16") == "bfloat16"
    assert dtype(engine_kwargs={"dtype": "float16"}) == "float16"  # engine_kwargs win
    assert dtype(accelerator="gpu") is None  # vLLM picks the GPU's dtype


def test_websocket_connections_are_refused_before_any_route():
    """The guard authenticates HTTP; a websocket (no route takes one) is closed, never passed on."""
    settings = ServiceSettings()
    app = create_app(Service(settings, ScriptedJudge(lambda *a, **k: ""), "s3cret"))
    sent = []

    async def receive():
        return {"type": "websocket.connect"}

    async def send(msg):
        sent.append(msg)

    scope = {"type": "websocket", "path": "/v1/labels", "headers": [], "root_path": "", "query_string": b""}
    asyncio.run(app(scope, receive, send))
    assert sent == [{"type": "websocket.close", "code": 1008}]
