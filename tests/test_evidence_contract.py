"""Edges of what the judge and the report are shown, that the rest of the suite let through
(mutation review of diffing/examples.py, evidence.py, splice.py and prefetch.py, 2026-12-07)."""

from __future__ import annotations

import threading
from types import SimpleNamespace

import numpy as np
import pytest
from pydantic import ValidationError

from diffing.config import AnalysisConfig
from diffing.evidence import Example, LatentEvidence, LatentLabel, read_jsonl, visible_pieces
from diffing.examples import Accumulator, heldout_shards
from diffing.prefetch import prefetch


def _store(rows_per_shard: list[int]):
    shards = [SimpleNamespace(n_rows=n) for n in rows_per_shard]
    return SimpleNamespace(manifest=SimpleNamespace(shards=shards))


def test_heldout_shards_round_the_last_fraction_up_and_budget_rows_read():
    ten = _store([333] * 10)
    last = AnalysisConfig(heldout="last_shards", heldout_frac=0.25, evidence_max_tokens=10**9)
    assert heldout_shards(ten, last) == [7, 8, 9]  # 2.5 shards held out: three
    every = AnalysisConfig(heldout="all", heldout_frac=0.25, evidence_max_tokens=1000)
    assert heldout_shards(ten, every) == [0, 1, 2, 3]  # every row counts: 999 < 1000 <= 1332
    hashed = AnalysisConfig(heldout="hash", heldout_frac=0.25, evidence_max_tokens=1000)
    assert heldout_shards(ten, hashed) == list(range(10))  # a quarter of each: 832.5 rows in all ten


def test_accumulators_of_other_latents_do_not_merge():
    cfg = AnalysisConfig()
    with pytest.raises(ValueError, match="different latent sets"):
        Accumulator(np.array([0, 1]), cfg).merge(Accumulator(np.array([0, 2]), cfg))


def test_evidence_models_refuse_what_a_judge_must_not_see():
    with pytest.raises(ValidationError, match="outside the window of 1 tokens"):
        Example(tokens=["a"], acts=[0.0], peak=1)
    ex = Example(tokens=["a"], acts=[0.5], peak=0)
    with pytest.raises(ValidationError, match="negativs"):
        LatentEvidence.model_validate({"latent": 0, "examples": [ex.model_dump()], "negativs": []})
    for field in ("confidence", "detection_score"):
        kw = {"latent": 0, "explanation": "x", "category": "c", "confidence": 0.5, field: 1.5}
        with pytest.raises(ValidationError, match=field):
            LatentLabel(**kw)


def test_a_bad_jsonl_line_is_named_by_its_number(tmp_path):
    good = LatentLabel(latent=0, explanation="x", category="c", confidence=0.5).model_dump_json()
    (tmp_path / "l.jsonl").write_text(good + '\n{"latent": "x"}\n')
    with pytest.raises(ValueError, match=r"l\.jsonl:2"):
        read_jsonl(tmp_path / "l.jsonl", LatentLabel)


def test_a_character_split_over_tokens_keeps_the_largest_activation_of_its_pieces():
    tokens, acts, _ = visible_pieces(["", "", "文"], [0.9, 0.1, 0.2], 0)
    assert tokens == ["文"] and acts == [0.9]


def test_prefetch_depth_zero_reads_inline():
    made, readers = [], set()

    def batches():
        for i in range(5):
            made.append(i)
            readers.add(threading.current_thread())
            yield i

    it = prefetch(batches(), 0)
    assert next(it) == 0 and made == [0]  # nothing read ahead
    assert list(it) == [1, 2, 3, 4]
    assert readers == {threading.current_thread()}  # read by the caller, no reader thread
    readers.clear()
    assert list(prefetch(batches(), 2)) == [0, 1, 2, 3, 4]
    assert readers and threading.current_thread() not in readers  # depth 2: a reader thread
