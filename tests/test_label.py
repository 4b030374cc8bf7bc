"""Bulk labelling job against a real HTTP server (uvicorn on loopback, scripted judge): all
evidence labelled once, resume, torn lines, retries on 503, 413 splitting, auth, groups."""

from __future__ import annotations

import json
import socket
import threading
import time

import pytest
import uvicorn
from test_serve_helpers import FRENCH, NEUTRAL, REFUSALS, evidence, scripted

from diffing.evidence import LABELS_FILE, iter_evidence, read_labels, write_jsonl
from jobs.label import (
    LabelConfig,
    LabelJobError,
    LabelSettingsChanged,
    calibration_set,
    label_run,
    label_settings,
)
from serve.app import Service, create_app
from serve.judge import JudgeError, JudgeUnavailable, ScriptedJudge
from serve.settings import LimitSettings, ServiceSettings
from serve.taxonomy import load_taxonomy


class Server:
    def __init__(self, judge, token="tok", settings=None, **limits):
        settings = settings or ServiceSettings(limits=LimitSettings(retry_after_s=1, **limits))
        self.app = create_app(Service(settings, judge, token))
        # Bound here and handed to uvicorn: no window in which another process takes the port.
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        cfg = uvicorn.Config(self.app, host="127.0.0.1", port=self.port, log_level="warning")
        self.server = uvicorn.Server(cfg)
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.sock]}, daemon=True)

    def __enter__(self):
        self.thread.start()
        while not self.server.started:
            assert self.thread.is_alive(), "the test server failed to start"
            time.sleep(0.02)
        return self

    def __exit__(self, *a):
        self.server.should_exit = True
        self.thread.join(10)
        self.sock.close()


@pytest.fixture
def run_dir(tmp_path):
    def texts(base, i):  # distinct per latent, so the service's cache does not answer for the judge
        return [f"{t} n{i}" for t in base]

    evs = [evidence(i, texts(FRENCH if i % 2 else REFUSALS, i), negatives=NEUTRAL) for i in range(20)]
    evs += [evidence(i, texts(NEUTRAL, i), group="baseline") for i in range(100, 106)]
    write_jsonl(tmp_path / "examples" / "0-20.jsonl", evs[:20])
    write_jsonl(tmp_path / "examples" / "100-106.jsonl", evs[20:])
    return tmp_path


def by_text(messages, choice, schema):
    """multilingual for French examples, safety for the rest."""
    cat = "multilingual" if "Bonjour" in messages[-1]["content"] else "safety & content moderation"
    return scripted(cat)(messages, choice, schema)


def test_labels_every_latent_once_then_resumes(run_dir, monkeypatch):
    monkeypatch.setenv("CROSSDIFF_API_TOKEN", "tok")
    judge = ScriptedJudge(by_text)
    cfg = LabelConfig(batch_size=3, concurrency=4)
    with Server(judge) as srv:
        res = label_run(run_dir, cfg, endpoint=srv.url)
        assert (res["total"], res["labelled_now"], res["skipped"], res["missing"]) == (26, 26, 0, 0)
        labels = read_labels(run_dir)
        assert sorted(labels) == [*range(20), *range(100, 106)]
        assert all(
            labels[i].category == ("multilingual" if i % 2 else "safety & content moderation")
            for i in range(20)
        )
        assert (run_dir / LABELS_FILE).read_text().count("\n") == 26  # each latent exactly once
        said = json.loads((run_dir / "label_endpoint.json").read_text())  # for the report's provenance
        from serve.taxonomy import load_taxonomy

        assert said["remote"] is True and said["taxonomy_version"] == load_taxonomy().version
        assert said["url"] == srv.url and said["settings_fingerprint"]
        calls = judge.calls
        res = label_run(run_dir, cfg, endpoint=srv.url)  # resume: nothing left
        assert (res["labelled_now"], res["skipped"], judge.calls) == (0, 26, calls)
        # a killed run leaves a torn last line: it is dropped and that latent relabelled
        p = run_dir / LABELS_FILE
        lines = p.read_text().splitlines()
        p.write_text("\n".join(lines[:-1]) + "\n" + lines[-1][:30])
        res = label_run(run_dir, cfg, endpoint=srv.url)
        assert (res["labelled_now"], res["missing"]) == (1, 0)
        assert len(p.read_text().splitlines()) == 26
        res = label_run(run_dir, {"groups": ["baseline"]}, endpoint=srv.url, overwrite=True)
        assert (res["total"], res["labelled_now"]) == (6, 6) and sorted(read_labels(run_dir)) == list(
            range(100, 106)
        )


def test_channel_labels_are_calibrated_on_the_runs_baseline_latents(run_dir, monkeypatch):
    """Channel scoring measures each category against the run's own ordinary latents: the job sends
    the baseline group's top examples with every request (not labelled themselves unless asked),
    and the service scores them once instead of the fixed neutral text; calibration_group=None
    falls back to the neutral text."""
    from serve import prompts
    from serve.labeller import calibration_texts
    from serve.settings import MethodSettings

    monkeypatch.setenv("CROSSDIFF_API_TOKEN", "tok")
    scored = []

    def scorer(messages, prefill):
        scored.append(prefill)
        return -1.0 if "French" in messages[-1]["content"] else -2.0

    settings = ServiceSettings(
        taxonomy="serve/taxonomies/demo.yaml", method=MethodSettings(classify_mode="channel")
    )
    baseline = [e for e in iter_evidence(run_dir) if e.group == "baseline"]
    calib = set(calibration_texts(baseline, settings.method))
    assert len(calib) == 6
    with Server(ScriptedJudge(by_text, scorer=scorer), settings=settings) as srv:
        mode = {"service": {"method": {"classify_mode": "channel"}}}  # the endpoint's mode
        res = label_run(run_dir, {"groups": ["ft-specific"], "batch_size": 4, **mode}, endpoint=srv.url)
        assert (res["total"], res["labelled_now"]) == (20, 20)
        n = len(load_taxonomy("serve/taxonomies/demo.yaml").names)
        assert sum(t in calib for t in scored) == 6 * n  # once, though five requests carried it
        assert prompts.CHANNEL_BASELINE not in scored
        scored.clear()
        label_run(
            run_dir,
            {"groups": ["ft-specific"], "calibration_group": None, **mode},
            endpoint=srv.url,
            overwrite=True,
        )
        assert prompts.CHANNEL_BASELINE in scored and not calib & set(scored)
    # what is sent: the group's first calibration_size latents, trimmed to the top examples that
    # channel scoring reads; nothing in json/choice mode (the service would ignore it)
    every = list(iter_evidence(run_dir))
    channel = {"service": {"method": {"classify_mode": "channel", "channel_examples": 2}}}
    sent = calibration_set(every, LabelConfig(calibration_size=4, **channel))
    assert [x["latent"] for x in sent] == [100, 101, 102, 103]
    assert all(len(x["top"]) == 2 and not x["quantiles"] and not x["negatives"] for x in sent)
    assert calibration_set(every, LabelConfig(calibration_group="nope", **channel)) == []
    assert calibration_set(every, LabelConfig()) == []  # json mode
    with pytest.raises(ValueError, match="max_calibration"):
        LabelConfig(calibration_size=500)


def test_resume_under_changed_label_settings_is_refused_not_mixed(run_dir, monkeypatch):
    """A run interrupted and resumed with other label-deciding settings (another method, judge,
    detection, a config from before the calibration existed) would append labels of a second kind
    to the first: refused, naming the setting and --overwrite; operational settings still resume."""
    import json

    monkeypatch.setenv("CROSSDIFF_API_TOKEN", "tok")
    p = run_dir / LABELS_FILE
    with Server(ScriptedJudge(by_text)) as srv:
        label_run(run_dir, LabelConfig(batch_size=4), endpoint=srv.url)
        p.write_text("".join(p.read_text().splitlines(keepends=True)[:8]))  # "killed" after 8 labels
        before = p.read_text()
        changed = LabelConfig.model_validate({"detection": True, "service": {"method": {"explain_top": 5}}})
        with pytest.raises(LabelSettingsChanged, match=r"detection: False -> True.*--overwrite") as e:
            label_run(run_dir, changed, endpoint=srv.url)
        assert "service.method.explain_top: 8 -> 5" in str(e.value)
        assert p.read_text() == before  # nothing appended, nothing lost
        # operational settings (batch, concurrency, retries, groups, limits) resume
        ops = {"batch_size": 7, "concurrency": 1, "max_attempts": 2, "service": {"limits": {"max_batch": 32}}}
        res = label_run(run_dir, LabelConfig.model_validate(ops), endpoint=srv.url)
        assert (res["labelled_now"], res["skipped"], res["missing"]) == (18, 8, 0)
        res = label_run(run_dir, changed, endpoint=srv.url, overwrite=True)
        assert res["labelled_now"] == 26
        assert json.loads((run_dir / "label_config.json").read_text())["detection"] is True
        assert json.loads((run_dir / "label_settings.json").read_text())["detection"] is True
        # a run from an older crossdiff (no label_settings.json; its label_config.json without the
        # calibration fields) resumed under channel scoring: refused
        (run_dir / "label_settings.json").unlink()
        channel = LabelConfig.model_validate({"service": {"method": {"classify_mode": "channel"}}})
        saved = json.loads(channel.model_dump_json())
        del saved["calibration_group"], saved["calibration_size"]
        (run_dir / "label_config.json").write_text(json.dumps(saved))
        with pytest.raises(LabelSettingsChanged, match="calibration_group: '<absent>' -> 'baseline'"):
            label_run(run_dir, channel, endpoint=srv.url)
        # a taxonomy edited in place (same path, other content) is another taxonomy
        import shutil
        from pathlib import Path

        tax = run_dir / "tax.yaml"
        shutil.copy(Path(__file__).resolve().parents[1] / "serve" / "taxonomy.yaml", tax)
        own = LabelConfig.model_validate({"service": {"taxonomy": str(tax)}})
        label_run(run_dir, own, endpoint=srv.url, overwrite=True)
        p.write_text("".join(p.read_text().splitlines(keepends=True)[:5]))
        tax.write_text(tax.read_text().replace("description:", "description: Edited.", 1))
        with pytest.raises(LabelSettingsChanged, match="taxonomy_fingerprint"):
            label_run(run_dir, own, endpoint=srv.url)
    # the endpoint now serves another judge: the first answer stops the resume, nothing appended
    tax.write_text(tax.read_text().replace("description: Edited.", "description:", 1))
    before = p.read_text()
    with Server(ScriptedJudge(by_text, model="other-judge")) as srv:
        with pytest.raises(LabelSettingsChanged, match="other-judge"):
            label_run(run_dir, own, endpoint=srv.url)
        assert p.read_text() == before
        assert label_run(run_dir, own, endpoint=srv.url, overwrite=True)["labelled_now"] == 26
    # the calibration decides nothing outside channel mode; operational judge settings never do
    a = LabelConfig.model_validate({"calibration_size": 3, "service": {"judge": {"timeout_s": 5}}})
    assert label_settings(a) == label_settings(LabelConfig())
    assert label_settings(LabelConfig(groups=("baseline",))) == label_settings(LabelConfig())


def test_retries_503_with_backoff_and_splits_413(run_dir, monkeypatch):
    monkeypatch.setenv("CROSSDIFF_API_TOKEN", "tok")
    state = {"fail": 5}

    def flaky(messages, choice, schema):
        if state["fail"] > 0:
            state["fail"] -= 1
            return JudgeUnavailable("replica restarting")
        return by_text(messages, choice, schema)

    cfg = LabelConfig(batch_size=8, concurrency=2, backoff_s=0.05, max_backoff_s=0.2)
    with Server(ScriptedJudge(flaky), max_body_bytes=12_000) as srv:  # ~4 latents per body fit
        res = label_run(run_dir, cfg, endpoint=srv.url)
    assert res["missing"] == 0 and state["fail"] == 0


def test_wrong_token_fails_clearly_and_persistent_outage_keeps_progress(run_dir, monkeypatch):
    monkeypatch.setenv("CROSSDIFF_API_TOKEN", "wrong")
    with Server(ScriptedJudge(by_text)) as srv:
        with pytest.raises(LabelJobError, match="401") as rejected:
            label_run(run_dir, LabelConfig(), endpoint=srv.url)
    assert not rejected.value.retryable  # the input (here the token) needs a fix: exit 2, not 3
    monkeypatch.setenv("CROSSDIFF_API_TOKEN", "tok")
    n = {"ok": 0}

    def dies(messages, choice, schema):
        n["ok"] += 1
        return by_text(messages, choice, schema) if n["ok"] <= 12 else JudgeUnavailable("gone")

    cfg = LabelConfig(batch_size=2, concurrency=1, max_attempts=2, backoff_s=0.01, max_backoff_s=0.02)
    with Server(ScriptedJudge(dies)) as srv:
        with pytest.raises(LabelJobError, match="rerun to resume") as outage:
            label_run(run_dir, cfg, endpoint=srv.url)
    assert outage.value.retryable  # a rerun later may succeed: exit 3
    import pickle

    assert pickle.loads(pickle.dumps(outage.value)).retryable  # also when Ray re-raises it
    kept = read_labels(run_dir)
    assert 0 < len(kept) < 26  # finished batches were kept
    with Server(ScriptedJudge(by_text)) as srv:
        res = label_run(run_dir, cfg, endpoint=srv.url)
    assert res["skipped"] == len(kept) and res["missing"] == 0


def test_config_errors_name_the_field(tmp_path):
    from diffing.config import ConfigError

    with pytest.raises(ConfigError, match="batch_size"):
        label_run(tmp_path, {"batch_size": 0})
    with pytest.raises(FileNotFoundError, match="examples"):
        label_run(tmp_path, LabelConfig(), endpoint="http://127.0.0.1:9")


def test_cli_label_against_an_endpoint(run_dir, monkeypatch):
    import json

    from typer.testing import CliRunner

    from jobs.cli import app

    monkeypatch.setenv("CROSSDIFF_API_TOKEN", "tok")
    with Server(ScriptedJudge(by_text)) as srv:
        args = ["label", "--run", str(run_dir), "--endpoint", srv.url, "--set", "batch_size=5"]
        r = CliRunner().invoke(app, args)
        assert r.exit_code == 0, r.output
        out = json.loads(r.stdout[r.stdout.index("{") :])
        assert out["labelled_now"] == 26 and out["categories"]["multilingual"] == 10
        r = CliRunner().invoke(app, ["label", "--run", str(run_dir), "--set", "batch_size=0"])
        assert r.exit_code == 2 and "batch_size" in r.output


def test_a_latent_listed_twice_is_labelled_once(run_dir, monkeypatch):
    monkeypatch.setenv("CROSSDIFF_API_TOKEN", "tok")
    write_jsonl(run_dir / "examples" / "0-20-copy.jsonl", [evidence(3, FRENCH, negatives=NEUTRAL)])
    with Server(ScriptedJudge(by_text)) as srv:
        res = label_run(run_dir, LabelConfig(batch_size=4), endpoint=srv.url)
    assert res["labelled_now"] == 26 and res["missing"] == 0
    assert (run_dir / LABELS_FILE).read_text().count("\n") == 26


def test_a_judge_that_fails_on_the_input_is_not_retried_forever(run_dir, monkeypatch):
    monkeypatch.setenv("CROSSDIFF_API_TOKEN", "tok")
    judge = ScriptedJudge(lambda m, c, s: JudgeError("answered 400: bad request"))
    cfg = LabelConfig(batch_size=30, max_attempts=6, backoff_s=0.01, max_backoff_s=0.02)
    with Server(judge) as srv:
        with pytest.raises(LabelJobError, match="failed twice"):
            label_run(run_dir, cfg, endpoint=srv.url)


def test_a_last_line_without_its_newline_is_kept_and_closed(tmp_path):
    """Killed after a whole line but before its newline: the label stays, and the next append
    starts on a line of its own (before, it was glued on and both labels were lost)."""
    from diffing.evidence import LatentLabel
    from jobs.label import _append, read_labels_tolerant

    def lab(i):
        return LatentLabel(latent=i, category="other", explanation="x", confidence=0.5)

    path = tmp_path / "labels.jsonl"
    path.write_text(lab(1).model_dump_json() + "\n" + lab(2).model_dump_json())
    assert set(read_labels_tolerant(path)) == {1, 2}
    _append(path, [lab(3)])
    assert set(read_labels_tolerant(path)) == {1, 2, 3}


def test_a_remote_endpoint_that_changed_its_taxonomy_is_not_resumed_into_the_same_file(run_dir, monkeypatch):
    """The taxonomy and method of a remote endpoint are its own settings, not the job's: a resume
    against the same URL after the service was redeployed with another taxonomy is refused before
    anything is appended (its settings fingerprint comes with every response)."""
    from pathlib import Path

    from jobs.label import ENDPOINT_FILE

    monkeypatch.setenv("CROSSDIFF_API_TOKEN", "tok")
    p = run_dir / LABELS_FILE
    demo = str(Path(__file__).resolve().parents[1] / "serve" / "taxonomies" / "demo.yaml")
    cfg = LabelConfig(batch_size=4)
    with Server(ScriptedJudge(by_text)) as srv:
        label_run(run_dir, cfg, endpoint=srv.url)
    rec = json.loads((run_dir / ENDPOINT_FILE).read_text())
    # what ran is recorded from the endpoint's answers (the job's own `service` settings were unused)
    assert rec["url"] == srv.url and rec["settings_fingerprint"]
    first = json.loads(p.read_text().splitlines()[0])
    assert (rec["judge_model"], rec["prompt_version"]) == (first["judge_model"], first["prompt_version"])
    p.write_text("".join(p.read_text().splitlines(keepends=True)[:8]))  # "killed" after 8 labels
    before = p.read_text()
    other = ServiceSettings(taxonomy=demo, limits=LimitSettings(retry_after_s=1))
    with Server(ScriptedJudge(by_text), settings=other) as srv:
        with pytest.raises(LabelSettingsChanged, match="fingerprint.*--overwrite"):
            label_run(run_dir, cfg, endpoint=srv.url)
        assert p.read_text() == before
        assert label_run(run_dir, cfg, endpoint=srv.url, overwrite=True)["labelled_now"] == 26
    # the same service as before, restarted: resumes
    p.write_text("".join(p.read_text().splitlines(keepends=True)[:8]))
    with Server(ScriptedJudge(by_text), settings=other) as srv:
        assert label_run(run_dir, cfg, endpoint=srv.url)["labelled_now"] == 18
    # a file begun before fingerprints existed: nothing to compare with, and the endpoint's present
    # fingerprint is not recorded as if it described the labels already there
    p.write_text("".join(p.read_text().splitlines(keepends=True)[:8]))
    (run_dir / ENDPOINT_FILE).unlink()
    with Server(ScriptedJudge(by_text)) as srv:
        assert label_run(run_dir, cfg, endpoint=srv.url)["labelled_now"] == 18
    assert not (run_dir / ENDPOINT_FILE).exists()


def test_a_corrupt_line_inside_the_labels_is_rewritten_on_resume(run_dir, monkeypatch):
    """A line torn in the middle of the file (a crash of an older writer, a bad copy): the resume
    relabels that latent and rewrites the file, so the report's strict reader parses it and every
    latent is there once."""
    monkeypatch.setenv("CROSSDIFF_API_TOKEN", "tok")
    cfg = LabelConfig(batch_size=5, concurrency=2)
    with Server(ScriptedJudge(by_text)) as srv:
        label_run(run_dir, cfg, endpoint=srv.url)
        p = run_dir / LABELS_FILE
        lines = p.read_text().splitlines()
        lines[3] = lines[3][:25]  # garbage in the middle, on a line of its own
        p.write_text("\n".join(lines) + "\n")
        with pytest.raises(ValueError):
            read_labels(run_dir)
        res = label_run(run_dir, cfg, endpoint=srv.url)
        assert (res["labelled_now"], res["missing"]) == (1, 0)
    labels = read_labels(run_dir)  # strict: no bad line left
    assert sorted(labels) == [*range(20), *range(100, 106)]
    assert len(p.read_text().splitlines()) == 26


def test_evidence_over_the_services_limits_is_labelled_from_what_fits(tmp_path, monkeypatch):
    """An analysis with a large n_top and a wide window: the job cuts each latent's evidence to the
    endpoint's limits (around each peak) instead of failing every request with 422."""
    from diffing.evidence import Example

    monkeypatch.setenv("CROSSDIFF_API_TOKEN", "tok")

    def wide(i):
        toks = ["Bonjour"] + [f" mot{j}" for j in range(39)]
        top = [Example(tokens=toks, acts=[0.0] * 30 + [2.0 + k] + [0.0] * 9, peak=30) for k in range(12)]
        return evidence(i, FRENCH[:1]).model_copy(update={"top": top})

    write_jsonl(tmp_path / "examples" / "0-3.jsonl", [wide(i) for i in range(3)])
    with Server(ScriptedJudge(by_text), max_examples=5, max_window=16) as srv:
        res = label_run(tmp_path, LabelConfig(batch_size=3), endpoint=srv.url)
    assert (res["labelled_now"], res["missing"]) == (3, 0)
    assert sorted(read_labels(tmp_path)) == [0, 1, 2]


def test_the_settings_fingerprint_ignores_where_the_judge_is_and_counts_how_it_is_asked():
    from serve.app import Service

    def fp(**judge):
        base = {"kind": "openai", "endpoint": "http://a:8000/v1", "model_id": "m"}
        return Service(
            ServiceSettings(judge={**base, **judge}), ScriptedJudge(by_text, model="m"), "t"
        ).settings_fingerprint

    assert fp() == fp(endpoint="http://b:9000/v1") == fp(timeout_s=5)
    assert fp() != fp(system_role="fold") and fp() != fp(temperature=0.7)

    def fp_method(**method):
        return Service(
            ServiceSettings(method=method), ScriptedJudge(by_text, model="m"), "t"
        ).settings_fingerprint

    # a resuming client must see an endpoint whose method changed (its labels would mix with the old)
    base = fp_method()
    for change in ({"highlight_frac": 0.9}, {"explain_top": 3}, {"classify_mode": "choice"}):
        assert fp_method(**change) != base, change


def test_a_proxy_request_timeout_is_retried_not_fatal():
    import asyncio

    import httpx

    from jobs.label_client import _post_batch

    ev = evidence(5, FRENCH)
    answers = [httpx.Response(408, json={"detail": "request timed out"})]
    ok = {
        "labels": [{"latent": 5, "explanation": "x.", "category": "multilingual", "confidence": 0.5}],
        "judge_model": "j",
        "prompt_version": "p",
        "taxonomy_version": "t",
        "settings_fingerprint": "f",
    }

    def handler(req):
        return answers.pop(0) if answers else httpx.Response(200, json=ok)

    async def go():
        async with httpx.AsyncClient(transport=httpx.MockTransport(handler), base_url="http://x") as c:
            return await _post_batch(c, [ev], LabelConfig(backoff_s=0.01, max_backoff_s=0.02), [])

    ((lab, fp, tax),) = asyncio.run(go())
    assert lab.latent == 5 and fp == "f" and tax == "t" and not answers


def test_an_analysis_that_selected_nothing_is_labelled_as_nothing(tmp_path):
    """No latent passed the cuts, so analyze wrote no examples/: label finishes with an empty labels
    file (the pipeline's output check) instead of asking for an analysis that already ran."""
    run = tmp_path / "run"
    run.mkdir()
    with pytest.raises(FileNotFoundError, match="crossdiff analyze"):
        label_run(run, {})
    import pyarrow as pa
    import pyarrow.parquet as pq

    # analysed without evidence (`analyze.evidence: false`): latents were selected, so still an error
    pq.write_table(pa.table({"latent": [0, 1], "group": ["ft-specific", ""]}), run / "latents.parquet")
    with pytest.raises(FileNotFoundError, match="crossdiff analyze"):
        label_run(run, {})
    pq.write_table(pa.table({"latent": [0, 1], "group": ["", ""]}), run / "latents.parquet")  # none selected
    out = label_run(run, {})
    assert out["total"] == 0 and (run / "labels.jsonl").read_text() == ""


def test_a_label_group_named_after_no_model_and_an_endpoint_without_scheme_are_refused(tmp_path):
    """A typo'd group labelled nothing and exited 0; `--endpoint localhost:8000` retried for
    minutes, then suggested a rerun."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    from typer.testing import CliRunner

    from diffing.config import ConfigError
    from jobs.cli import app
    from jobs.label import label_run

    pq.write_table(
        pa.table(
            {"latent": [0, 1], "group": ["ft-specific", ""], "norm/base": [0.1, 1.0], "norm/ft": [1.0, 1.0]}
        ),
        tmp_path / "latents.parquet",
    )
    with pytest.raises(
        ConfigError,
        match=r"groups: \['ft-specfic'\] name no group.*'base-specific', 'baseline', 'ft-specific'",
    ):
        label_run(tmp_path, {"groups": ["ft-specfic"]})
    with pytest.raises(ConfigError, match="needs its scheme: http://localhost:8000"):
        label_run(tmp_path, {}, endpoint="localhost:8000")
    r = CliRunner().invoke(app, ["label", "--run", str(tmp_path), "--endpoint", "localhost:8000"])
    assert r.exit_code == 2 and "needs its scheme" in r.output
    r = CliRunner().invoke(
        app, ["pipeline", "--preset", "tiny", "--out", str(tmp_path / "p"), "--endpoint", "h:1"]
    )
    assert r.exit_code == 2 and "needs its scheme" in r.output and not (tmp_path / "p").exists()
