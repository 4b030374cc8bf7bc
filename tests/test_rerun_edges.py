"""Fit and analyze on bring-your-own stores: reruns that ask for something else are refused (not
answered with the old results), odd model names, constant models, and clear store errors."""

from __future__ import annotations

import math

import numpy as np
import pytest

from diffing.analysis import analyze_run
from diffing.config import AnalysisConfig, FitConfig
from diffing.fit import fit
from diffing.store import StoreError, open_store, write_arrays

pytestmark = pytest.mark.timeout(120)


def _store(path, names=("a", "b"), n=600, d=8, zero=False):
    rng = np.random.default_rng(0)
    x = (
        np.zeros((n, len(names), d), np.float32)
        if zero
        else rng.normal(size=(n, len(names), d)).astype(np.float32)
    )
    write_arrays(str(path), x, model_names=list(names), dtype="float32", shard_rows=300)
    return open_store(str(path))


def _cfg(**train):
    return FitConfig.model_validate(
        {"crosscoder": {"n_latents": 16, "k": 2}, "train": {"batch_size": 64, "epochs": 1, **train}}
    )


def test_a_finished_fit_is_not_returned_for_another_config_or_store(tmp_path):
    a = _store(tmp_path / "A")
    fit(a, _cfg(), tmp_path / "run")
    assert fit(a, _cfg(log_every=7), tmp_path / "run")  # a logging change: the finished run
    with pytest.raises(ValueError, match=r"other settings or data \(train.lr\)"):
        fit(a, _cfg(lr=1e-2), tmp_path / "run")
    b = _store(tmp_path / "B", names=("c", "d"))
    with pytest.raises(ValueError, match="crosscoder.model_names"):
        fit(b, _cfg(), tmp_path / "run")
    fit(b, _cfg(), tmp_path / "run", overwrite=True)


def test_an_analysis_is_not_returned_for_another_pair_or_settings(tmp_path):
    s = _store(tmp_path / "S", names=("x", "y", "z"))
    fit(s, _cfg(), tmp_path / "run")
    cfg = AnalysisConfig(evidence=False)
    analyze_run(tmp_path / "run", s, cfg, pair=("x", "z"))
    analyze_run(
        tmp_path / "run", s, cfg.model_copy(update={"batch_size": 128}), pair=("x", "z")
    )  # operational
    with pytest.raises(ValueError, match=r"made for the pair \['x', 'z'\], not \['y', 'z'\]"):
        analyze_run(tmp_path / "run", s, cfg, pair=("y", "z"))
    with pytest.raises(ValueError, match=r"other analysis settings \(tail_frac: 0.02 -> 0.05\)"):
        analyze_run(tmp_path / "run", s, cfg.model_copy(update={"tail_frac": 0.05}), pair=("x", "z"))
    with pytest.raises(ValueError, match="two different models"):
        analyze_run(tmp_path / "run", s, cfg, pair=("z", "z"), overwrite=True)


def test_model_names_with_commas_are_refused(tmp_path):
    from diffing.harvest import ModelSpec

    with pytest.raises(StoreError, match="contain ','"):
        write_arrays(str(tmp_path / "s"), np.ones((4, 2, 3), np.float32), model_names=["base,v1", "ft"])
    with pytest.raises(ValueError, match="name"):
        ModelSpec(name="base,v1", path="x")


def test_a_constant_model_has_no_fve(tmp_path):
    s = _store(tmp_path / "Z", zero=True)
    m = fit(s, _cfg(), tmp_path / "run")
    assert all(math.isnan(v) for v in m["fve"].values()) and m["dead_fraction"] == 1.0


def test_float16_overflow_names_the_fix(tmp_path):
    x = np.ones((10, 2, 4), np.float32)
    x[3, 0, 1] = 1e5
    with pytest.raises(StoreError, match="beyond float16.s range; nothing was written; store in float32"):
        write_arrays(str(tmp_path / "s"), x, model_names=["a", "b"])


def test_cli_pair_names_may_have_spaces_after_the_comma(tmp_path):
    from typer.testing import CliRunner

    from jobs.cli import app

    s = _store(tmp_path / "S")
    fit(s, _cfg(), tmp_path / "run")
    res = CliRunner().invoke(
        app, ["analyze", "--run", str(tmp_path / "run"), "--store", s.uri, "--pair", "a, b", "--no-evidence"]
    )
    assert res.exit_code == 0, res.output
