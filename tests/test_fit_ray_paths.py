"""The Ray Train fit's driver-side decisions, without starting Ray: reruns of a finished fit,
--overwrite after a config change, relative paths (workers run in their own session directory) and
a run directory the driver cannot see (rank 0 on another node)."""

import json

import pytest
from conftest import planted_fit_store

import jobs.fit as jf
from diffing.config import FitConfig
from diffing.store import open_store


class _ReachedRay(Exception):
    pass


@pytest.fixture(autouse=True)
def _no_ray_left_behind():
    """With ensure_ray faked, the Ray Data calls of the fit's driver start a local Ray of their own
    (ray.data initialises one on first use) where none is up: shut that one down, or later tests find
    Ray already up. The session's Ray (conftest's ray_cluster), up before the test, is left alone."""
    import ray

    was_up = ray.is_initialized()
    yield
    if not was_up and ray.is_initialized():
        ray.shutdown()


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    return planted_fit_store(tmp_path_factory.mktemp("fitpaths") / "store")


def _cfg(steps=20, workers=2):
    return FitConfig.model_validate(
        {
            "crosscoder": {"n_latents": 64, "k": 3},
            "train": {"batch_size": 256, "steps": steps},
            "distributed": {"workers": workers, "cpus_per_worker": 0.5},
        }
    )


def _no_ray(monkeypatch):
    def stop(address=None):
        raise _ReachedRay

    monkeypatch.setattr("cluster.connect.ensure_ray", stop)


def _finished(store, cfg, out):
    """A run directory as a finished Ray fit leaves it (only what the driver reads)."""
    out.mkdir(parents=True)
    resolved = jf.resolve_config(cfg, open_store(store))
    (out / "run_config.json").write_text(
        json.dumps({"fit": resolved.model_dump(mode="json"), "store_rows": open_store(store).n_rows})
    )
    (out / "metrics.json").write_text(json.dumps({"steps": 20, "fve": 0.9}))
    (out / "crosscoder").mkdir()
    (out / "crosscoder" / "model.safetensors").write_text("weights")


def test_finished_fit_is_returned_only_for_its_own_settings(tmp_path, store, monkeypatch):
    _no_ray(monkeypatch)
    out = tmp_path / "run"
    _finished(store, _cfg(steps=20), out)
    # same settings (other restarts, CPUs per worker, logging): the finished run, Ray never started
    d = _cfg(steps=20).model_dump()
    d["distributed"] |= {"max_failures": 7, "cpus_per_worker": 1.5}
    d["train"] |= {"log_every": 3}
    same = FitConfig.model_validate(d)
    assert jf.run_fit_ray(store, same, str(out))["fve"] == 0.9
    # other DDP workers decide which rows each rank sees: another fit
    with pytest.raises(ValueError, match=r"other settings or data \(distributed.workers\).*--overwrite"):
        jf.run_fit_ray(store, _cfg(steps=20, workers=4), str(out))
    with pytest.raises(ValueError, match=r"other settings or data \(train.steps\).*--overwrite"):
        jf.run_fit_ray(store, _cfg(steps=40), str(out))
    assert (out / "metrics.json").exists()  # nothing removed by the refusal
    # the weights deleted since: not finished, and its old metrics.json must not pass for the refit's
    (out / "crosscoder" / "model.safetensors").unlink()
    (out / "run_config.json").unlink()  # (this stand-in's stamp has no checkpoint hash to resume under)
    with pytest.raises(_ReachedRay):
        jf.run_fit_ray(store, _cfg(steps=20), str(out))
    assert not (out / "metrics.json").exists()


def test_overwrite_after_a_config_change_gets_to_training(tmp_path, store, monkeypatch):
    _no_ray(monkeypatch)
    out = tmp_path / "run"
    _finished(store, _cfg(steps=20), out)
    (out / "run_config.json").write_text(json.dumps({"config_hash": "something-else"}))
    with pytest.raises(_ReachedRay):  # past the stamp check: the old stamp went with the old run
        jf.run_fit_ray(store, _cfg(steps=40), str(out), overwrite=True)
    assert not (out / "metrics.json").exists()
    stamp = json.loads((out / "run_config.json").read_text())
    assert stamp["fit"]["train"]["steps"] == 40


def test_unfinished_fit_on_another_store_is_refused(tmp_path, store, monkeypatch):
    """A killed Ray fit rerun on another store of the same shape: refused before Ray starts (its
    checkpoints would resume on other rows); on its own store it goes on to training."""
    _no_ray(monkeypatch)
    out = tmp_path / "run"
    with pytest.raises(_ReachedRay):  # a first start: the stamp names the store's shards
        jf.run_fit_ray(store, _cfg(), str(out))
    stamp = json.loads((out / "run_config.json").read_text())
    assert stamp["store_fingerprint"] == jf.store_fingerprint(open_store(store))
    other = planted_fit_store(tmp_path / "other")  # same rows and shape: the same sample
    with pytest.raises(_ReachedRay):
        jf.run_fit_ray(other, _cfg(), str(out))
    (out / "run_config.json").write_text(json.dumps({**stamp, "store_fingerprint": "0" * 16}))
    with pytest.raises(ValueError, match="another store"):
        jf.run_fit_ray(store, _cfg(), str(out))
    (out / "run_config.json").write_text(json.dumps(stamp))


def test_unfinished_fit_resumes_under_other_operational_settings(tmp_path, store, monkeypatch):
    """CPUs per worker, checkpoints kept, read-ahead and restarts do not change the weights: a killed
    Ray fit resumes under others (also from a stamp of 2026-12-06, which hashed all but restarts);
    the shuffle buffer decides which rows a rank sees: refused."""
    from diffing.fit import config_hash

    _no_ray(monkeypatch)
    out = tmp_path / "run"
    with pytest.raises(_ReachedRay):
        jf.run_fit_ray(store, _cfg(), str(out))

    def with_dist(**kw):
        c = _cfg()
        return c.model_copy(update={"distributed": c.distributed.model_copy(update=kw)})

    with pytest.raises(_ReachedRay):
        jf.run_fit_ray(store, with_dist(cpus_per_worker=2.0, num_to_keep=5, prefetch_batches=0), str(out))
    stamp = json.loads((out / "run_config.json").read_text())
    resolved = jf.resolve_config(_cfg(), open_store(store))
    older = config_hash(resolved, distributed=True, _ignore={"max_failures"})
    (out / "run_config.json").write_text(json.dumps({**stamp, "config_hash": older}))
    with pytest.raises(_ReachedRay):
        jf.run_fit_ray(store, _cfg(), str(out))
    with pytest.raises(ValueError, match="different config"):
        jf.run_fit_ray(store, with_dist(shuffle_buffer_rows=1024), str(out))


class _FakeTrainer:
    seen: dict = {}
    write_metrics = True

    def __init__(self, fn, *, train_loop_config, run_config, **kw):
        _FakeTrainer.seen = {"config": train_loop_config, "storage": run_config.storage_path}

    def fit(self):
        if _FakeTrainer.write_metrics:  # rank 0's last act, where the worker resolves the path
            out = _FakeTrainer.seen["config"]["out"]
            from pathlib import Path

            Path(out, "metrics.json").write_text(json.dumps({"steps": 20}))
            Path(out, "crosscoder").mkdir(exist_ok=True)
            Path(out, "crosscoder", "model.safetensors").write_text("weights")


def _fake_ray(monkeypatch):
    import ray
    import ray.train.torch

    monkeypatch.setattr("cluster.connect.ensure_ray", lambda address=None: None)
    monkeypatch.setattr(ray, "cluster_resources", lambda: {"CPU": 4.0})
    monkeypatch.setattr(ray, "nodes", lambda: [{"Alive": True}, {"Alive": True}])
    monkeypatch.setattr(ray.train.torch, "TorchTrainer", _FakeTrainer)


def test_relative_paths_reach_the_workers_absolute(tmp_path, store, monkeypatch):
    import shutil

    shutil.copytree(store, tmp_path / "st")
    monkeypatch.chdir(tmp_path)
    _fake_ray(monkeypatch)
    _FakeTrainer.write_metrics = True
    res = jf.run_fit_ray("st", _cfg(), "runs/r1")
    cfg = _FakeTrainer.seen["config"]
    assert cfg["store"] == str(tmp_path / "st") and cfg["out"] == str(tmp_path / "runs" / "r1")
    assert _FakeTrainer.seen["storage"] == str(tmp_path / "runs" / "r1")
    assert res == {"steps": 20}


def test_outputs_written_on_another_node_name_the_fix(tmp_path, store, monkeypatch):
    _fake_ray(monkeypatch)
    _FakeTrainer.write_metrics = False  # rank 0 wrote metrics.json on its own node's disk
    with pytest.raises(FileNotFoundError, match="every node reaches"):
        jf.run_fit_ray(store, _cfg(), str(tmp_path / "run"))


def test_a_run_begun_before_the_data_order_changed_resumes_in_its_own_order(tmp_path, store, monkeypatch):
    """Resuming skips the batches a run used by position: a run whose stamp predates the seeded
    shard order (data_order 2) keeps manifest order and the old buffer seeds; new runs get 2."""
    _fake_ray(monkeypatch)
    seen = []
    monkeypatch.setattr(jf, "_store_dataset", lambda st, seed=None: seen.append(seed) or object())
    _FakeTrainer.write_metrics = False
    out = tmp_path / "new"
    with pytest.raises(FileNotFoundError):  # the fake trainer writes no metrics
        jf.run_fit_ray(store, _cfg(), str(out))
    assert _FakeTrainer.seen["config"]["data_order"] == 2 and seen == [0]
    stamp = json.loads((out / "run_config.json").read_text())
    assert stamp["data_order"] == 2
    del stamp["data_order"]  # as a stamp written before 2026-12-06 (late) reads
    old = tmp_path / "old"
    old.mkdir()
    (old / "run_config.json").write_text(json.dumps(stamp))
    with pytest.raises(FileNotFoundError):
        jf.run_fit_ray(store, _cfg(), str(old))
    assert _FakeTrainer.seen["config"]["data_order"] == 1 and seen == [0, None]
    assert json.loads((old / "run_config.json").read_text())["data_order"] == 1
    assert jf._shuffle_seed(3, 1, 2, 1) == 3012 and jf._shuffle_seed(0, 1, 0, 2) != jf._shuffle_seed(
        0, 0, 10, 2
    )
