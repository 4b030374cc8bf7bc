"""The demo's one-time builds on a new user's machine: two processes building one model, builds
killed midway, a run's corpus from an older crossdiff, another transformers patch release, and a
guard that the fine-tune's code is not changed without a new recipe hash."""

from __future__ import annotations

import ast
import hashlib
import json
import threading
import time
from pathlib import Path

from diffing.embedded.base import build_atomically
from diffing.embedded.finetune import base_fingerprint

ROOT = Path(__file__).resolve().parents[1]


def _fake_model(d: Path) -> None:
    (d / "config.json").write_text("{}")
    (d / "model.safetensors").write_bytes(b"x")


def test_one_process_builds_a_model_and_the_other_waits_for_it(tmp_path):
    target = tmp_path / "models" / "m"
    builds = []

    def slow(d: Path) -> None:
        builds.append(threading.current_thread().name)
        time.sleep(0.5)
        _fake_model(d)

    threads = [threading.Thread(target=build_atomically, args=(target, slow), name=f"t{i}") for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(10)
    assert len(builds) == 1 and (target / "config.json").exists()  # the second found it built


def test_what_killed_builds_left_behind_is_removed_by_the_next_build(tmp_path):
    models = tmp_path / "models"
    import os

    old = time.time() - 3600
    for i in range(2):  # as a SIGKILLed or OOM-killed build leaves them
        orphan = models / f".tmp-m-kill{i}abc"
        orphan.mkdir(parents=True)
        (orphan / "model.safetensors").write_bytes(b"0" * 1000)
        os.utime(orphan, (old, old))
    for name in (".tmp-m-base1234-abcdefgh", ".tmp-m-fresh123"):  # another target's; a live build
        (models / name).mkdir()
    os.utime(models / ".tmp-m-base1234-abcdefgh", (old, old))
    build_atomically(models / "m", _fake_model)
    left = sorted(p.name for p in models.iterdir())
    assert left == [".m.lock", ".tmp-m-base1234-abcdefgh", ".tmp-m-fresh123", "m"]


def test_a_runs_corpus_from_an_older_crossdiff_is_not_paired_with_a_new_fine_tune(tmp_path):
    from jobs.presets import _corpus

    run = tmp_path / "run"
    uri = _corpus(str(run), 20, 0)
    assert Path(uri).name == "corpus.jsonl" and _corpus(str(run), 20, 0) == uri  # current: reused
    Path(uri).write_text('{"text": "an older corpus"}\n')
    new = _corpus(str(run), 20, 0)
    assert new != uri and Path(new).name.startswith("corpus-")  # a new name: the harvest is redone
    assert len(Path(new).read_text().splitlines()) == 20 and _corpus(str(run), 20, 0) == new
    assert Path(uri).read_text() == '{"text": "an older corpus"}\n'  # the old run's file stays


def test_the_base_fingerprint_does_not_depend_on_the_transformers_release(tmp_path):
    for version in ("5.19.0", "5.19.1"):
        d = tmp_path / version
        d.mkdir()
        (d / "config.json").write_text(json.dumps({"hidden_size": 8, "transformers_version": version}))
        (d / "model.safetensors").write_bytes(b"weights")
    assert base_fingerprint(tmp_path / "5.19.0") == base_fingerprint(tmp_path / "5.19.1")


# The fine-tune's training code, docstrings and formatting aside. A change to it may change the
# weights a recipe produces while its hash (the model's directory name) stays: a user's cache
# would then hold a model the code no longer makes.
RECIPE_CODE = ("adapter", "banks", "corpus", "finetune")
RECIPE_CODE_SHA = "534d7c909f48c42c"


def _code_hash() -> str:
    """Node types and their plain values in walk order: blind to comments, formatting and
    docstrings, and to the fields newer Pythons add to ast.dump (type_params, say)."""
    h = hashlib.sha256()
    for name in RECIPE_CODE:
        tree = ast.parse((ROOT / "diffing" / "embedded" / f"{name}.py").read_text())
        for node in ast.walk(tree):
            body = getattr(node, "body", None)
            if isinstance(body, list) and body and isinstance(body[0], ast.Expr):
                if isinstance(body[0].value, ast.Constant) and isinstance(body[0].value.value, str):
                    body[0] = ast.Pass()  # docstrings do not train anything
        for node in ast.walk(tree):
            plain = [
                f"{k}={v!r}"
                for k, v in ast.iter_fields(node)
                if isinstance(v, str | int | float | bool | bytes) and k != "kind"
            ]
            h.update(f"{type(node).__name__}({','.join(plain)})".encode())
    return h.hexdigest()[:16]


def test_the_fine_tunes_code_changes_only_with_its_recipe_hash():
    assert _code_hash() == RECIPE_CODE_SHA, (
        "diffing/embedded/{adapter,banks,corpus,finetune}.py changed. If the change can alter the "
        "fine-tuned weights or the corpus, bump BUILD_VERSION (finetune.py) or CORPUS_VERSION "
        "(corpus.py) so the recipe hash, and with it the model directory, changes; then set "
        f"RECIPE_CODE_SHA = {_code_hash()!r} here."
    )
