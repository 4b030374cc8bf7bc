"""Ray Train DDP fit: parity with one worker, golden loss, failures, resume, bad input."""

import json
import os
import signal
import subprocess
import sys
import threading
import time

import pytest
import torch
from conftest import planted_fit_store

from diffing.config import FitConfig
from diffing.fit import fit
from diffing.store import StoreError, open_store

# `ray` on the tests that start Ray: the golden loss and the input checks run in `make test-fast` too
pytestmark = [pytest.mark.timeout(600)]
ray_test = pytest.mark.ray
# Ray Train registers a checkpoint in this file of the run's storage; one whose folder exists but is
# not registered yet (a kill right after it was written) is not resumed from
SNAPSHOT = "checkpoint_manager_snapshot.json"


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    return planted_fit_store(tmp_path_factory.mktemp("fitray") / "store")


def _cfg(workers, **train):
    t = {
        "batch_size": 512,
        "lr": 5e-3,
        "epochs": 2,
        "checkpoint_every": 20,
        "log_every": 5,
        "seed": 0,
        **train,
    }
    return FitConfig.model_validate(
        {
            "crosscoder": {"n_latents": 128, "k": 3, "dead_after_tokens": 10_000},
            "train": t,
            "distributed": {
                "workers": workers,
                "cpus_per_worker": 0.5,
                "shuffle_buffer_rows": 0,
                "max_failures": 2,
            },
        }
    )


@pytest.fixture(scope="module")
def two_worker_run(tmp_path_factory, store, ray_cluster):
    """One 2-worker fit shared by the parity and the killed-worker tests: (result, run dir)."""
    from jobs.fit import run_fit_ray

    out = tmp_path_factory.mktemp("fitray2") / "w2"
    return run_fit_ray(store, _cfg(2), str(out)), out


@ray_test
def test_two_workers_match_one_worker(tmp_path, store, ray_cluster, two_worker_run):
    from jobs.fit import run_fit_ray

    one = run_fit_ray(store, _cfg(1), str(tmp_path / "w1"))
    two, w2 = two_worker_run
    assert one["steps"] == two["steps"] == 2 * (30_000 // 512)  # 2 epochs, equal batches per rank
    # same data, seed and global batch; BatchTopK selects per rank, so not bitwise equal
    for m in ("A", "B"):
        assert abs(one["fve"][m] - two["fve"][m]) < 0.05, (one, two)

    def late_loss(run):
        rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
        tail = [r["loss"] for r in rows if r["step"] > 0.7 * rows[-1]["step"]]
        return sum(tail) / len(tail)

    w1 = tmp_path / "w1"
    (tmp_path.parent / "parity.json").write_text(json.dumps([one, two, late_loss(w1), late_loss(w2)]))
    assert abs(late_loss(w1) - late_loss(w2)) / late_loss(w1) < 0.1
    assert two["workers"] == 2
    lines = (w2 / "metrics.jsonl").read_text().splitlines()
    assert json.loads(lines[-1])["step"] == two["steps"]


@ray_test
def test_ray_dataset_yields_the_store_rows_in_order(store, ray_cluster):
    """The training dataset (read with Ray Data's V1 parquet reader) holds exactly the store's rows
    in manifest order (seeded: in a fixed permutation of its shards), and the caller's DataContext
    reader setting is left as it was."""
    import numpy as np
    import ray.data

    from jobs.fit import _store_dataset

    st = open_store(store)
    ctx = ray.data.DataContext.get_current()
    before = getattr(ctx, "use_datasource_v2", None)
    ds = _store_dataset(st)
    assert getattr(ctx, "use_datasource_v2", None) == before
    got = np.concatenate([st.acts_of(b) for b in ds.iter_batches(batch_size=4096, batch_format="pyarrow")])
    want = np.concatenate([st.read_shard(i)[0] for i in range(len(st.manifest.shards))])
    assert got.shape == want.shape == (30_000, 2, 32)
    np.testing.assert_array_equal(got, want)
    # the fit's order: its shards in a seeded permutation, the same on every call (epoch, resume)
    order = np.random.default_rng([0, 7]).permutation(len(st.manifest.shards))
    assert list(order) != sorted(order)
    for _ in range(2):
        ds = _store_dataset(st, seed=0)
        got = np.concatenate(
            [st.acts_of(b) for b in ds.iter_batches(batch_size=4096, batch_format="pyarrow")]
        )
        np.testing.assert_array_equal(got, np.concatenate([st.read_shard(int(i))[0] for i in order]))


def test_golden_loss_in_process(tmp_path, store):
    """A tiny fixed-seed run pins its loss (update GOLDEN deliberately when the math changes)."""
    cfg = _cfg(0, epochs=1, log_every=10)
    fit(open_store(store), cfg, tmp_path / "g")
    rows = [json.loads(x) for x in (tmp_path / "g" / "metrics.jsonl").read_text().splitlines()]
    losses = {r["step"]: r["loss"] for r in rows}
    GOLDEN = {10: 42.24329376220703, 50: 19.8948917388916}  # measured on CPU, torch 2.13.0
    for step, want in GOLDEN.items():
        assert losses[step] == pytest.approx(want, rel=1e-3), {k: losses[k] for k in GOLDEN}


def _worker_pids():
    """Ray Train worker processes of *our* cluster (descendants of this test process)."""
    import psutil

    out = []
    for p in psutil.Process().children(recursive=True):
        try:
            if "RayTrainWorker" in " ".join(p.cmdline()):
                out.append(p.pid)
        except psutil.Error:
            pass
    return out


@ray_test
def test_killed_worker_recovers_from_checkpoint(tmp_path, store, ray_cluster, two_worker_run):
    from jobs.fit import run_fit_ray

    ref, _ = two_worker_run  # the same config run without a failure
    out = tmp_path / "chaos"
    result = {}
    th = threading.Thread(target=lambda: result.update(run_fit_ray(store, _cfg(2), str(out))), daemon=True)
    th.start()
    try:
        deadline = time.time() + 300
        while time.time() < deadline and not (out / "ray" / SNAPSHOT).exists():
            time.sleep(0.2)
        pids = _worker_pids()
        assert pids, "no training workers found"
        assert not (out / "metrics.json").exists(), "the fit ended before the kill: nothing was injected"
        os.kill(pids[-1], signal.SIGKILL)
    finally:
        th.join(timeout=500)
    assert not th.is_alive() and result, "run did not finish after the worker was killed"
    # the worker group restarted from a checkpoint, not from step 0
    assert json.loads((out / "metrics.json").read_text())["resumed_from_step"] > 0
    for m in ("A", "B"):
        assert abs(result["fve"][m] - ref["fve"][m]) < 0.01, (result, ref)


@ray_test
def test_killed_driver_reruns_and_resumes(tmp_path, store, ray_cluster):
    from jobs.fit import run_fit_ray

    out = tmp_path / "drv"
    cfg = _cfg(1)
    script = (
        "import sys; from diffing.config import FitConfig; from jobs.fit import run_fit_ray; "
        "run_fit_ray(sys.argv[1], FitConfig.model_validate_json(sys.argv[2]), sys.argv[3], address=sys.argv[4])"
    )
    proc = subprocess.Popen(
        [sys.executable, "-c", script, store, cfg.model_dump_json(), str(out), ray_cluster],
        start_new_session=True,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.time() + 300
    while time.time() < deadline and not (out / "ray" / SNAPSHOT).exists():
        time.sleep(0.2)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not (out / "metrics.json").exists()
    # an unfinished fit can be followed: rank 0 wrote its history at the checkpoint
    during = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert during and during[-1]["step"] >= cfg.train.checkpoint_every, during[-1:]  # at least the first
    time.sleep(2)  # let Ray notice the dead driver and release its workers
    res = run_fit_ray(store, cfg, str(out))
    assert res["steps"] == 2 * (30_000 // 512)
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert rows[0]["step"] <= 50  # history carried over from before the kill
    steps = [r["step"] for r in rows]  # steps redone after the resume are not logged twice
    assert steps == sorted(set(steps)) and steps[-1] == res["steps"], steps
    assert res["resumed_from_step"] > 0  # and the rerun resumed from the checkpoint, not from step 0


@ray_test
def test_a_diverging_fit_stops_instead_of_restarting(tmp_path, store, ray_cluster):
    """A divergence is the same on every rank and every retry: the driver raises it after the
    first, even where the worker group may restart without limit (it restarted until
    max_failures ran out; at -1, forever). The driver is a child process: killed, it takes its
    worker groups with it, and the session's cluster stays free for the other tests."""
    cfg = _cfg(2, lr=1e8)
    cfg = cfg.model_copy(update={"distributed": cfg.distributed.model_copy(update={"max_failures": -1})})
    script = (
        "import sys; from diffing.config import FitConfig; from diffing.train import FitDiverged; "
        "from jobs.fit import run_fit_ray\n"
        "try: run_fit_ray(sys.argv[1], FitConfig.model_validate_json(sys.argv[2]), sys.argv[3], "
        "address=sys.argv[4])\n"
        "except FitDiverged as e: print(e); sys.exit(3)"
    )
    out = tmp_path / "r"
    proc = subprocess.Popen(
        [sys.executable, "-c", script, store, cfg.model_dump_json(), str(out), ray_cluster],
        start_new_session=True,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        printed, logged = proc.communicate(timeout=300)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        pytest.fail("the diverged fit was still restarting its workers after 300 s")
    assert proc.returncode == 3, logged[-3000:]
    assert "the fit diverged at step" in printed and "train.lr=100000000.0" in printed, printed
    assert not (out / "crosscoder").exists() and not (out / "metrics.json").exists()


def test_bad_inputs_fail_before_training(tmp_path, store):
    from jobs.fit import run_fit_ray

    with pytest.raises(ValueError, match="d_model"):
        run_fit_ray(
            store,
            FitConfig.model_validate({"crosscoder": {"d_model": 7}, "distributed": {"workers": 1}}),
            str(tmp_path / "a"),
        )
    with pytest.raises(ValueError, match="model_names"):
        run_fit_ray(
            store,
            FitConfig.model_validate(
                {"crosscoder": {"model_names": ["x", "y"]}, "distributed": {"workers": 1}}
            ),
            str(tmp_path / "b"),
        )
    with pytest.raises(StoreError, match="no manifest"):
        run_fit_ray(str(tmp_path / "empty"), _cfg(1), str(tmp_path / "c"))
    for name in ("run #1", "run%201", "é", "a?b"):  # Ray Train would cut, decode or refuse them
        with pytest.raises(ValueError, match="plain ASCII without spaces, #, \\? or %"):
            run_fit_ray(store, _cfg(1), f"s3://bucket/runs/{name}")
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o500)
    if os.geteuid() != 0:  # root ignores permissions; use an unwritable path instead
        target = str(ro / "run")
    else:
        (tmp_path / "file").write_text("x")
        target = str(tmp_path / "file" / "run")
    with pytest.raises(StoreError, match="cannot write"):
        run_fit_ray(store, _cfg(1), target)
    with pytest.raises(ValueError, match="divisible"):
        _cfg(3)
    assert torch.tensor(1)  # nothing else ran
