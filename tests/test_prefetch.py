"""The in-process fit's read-ahead thread: same batches in the same order, errors where they
happen, a reader that stops when the consumer does, and a fit whose weights do not depend on it."""

import threading
import time

import pytest
import torch

from diffing.prefetch import prefetch


def _batches(n, fail_at=None):
    for i in range(n):
        if i == fail_at:
            raise OSError(f"shard {i} unreadable")
        yield torch.full((2, 3), float(i))


@pytest.mark.parametrize("depth", [0, 1, 4])
def test_same_items_in_order(depth):
    got = [int(b[0, 0]) for b in prefetch(_batches(50), depth)]
    assert got == list(range(50))


def test_reader_error_surfaces_at_its_position():
    seen = []
    with pytest.raises(OSError, match="shard 7"):
        for b in prefetch(_batches(20, fail_at=7), 3):
            seen.append(int(b[0, 0]))
    assert seen == list(range(7))


def _new_readers(before: set) -> list:
    """Reader threads started since `before` (another test's may still await collection)."""
    return [t for t in threading.enumerate() if t.name == "crossdiff-prefetch" and t not in before]


def test_closing_early_stops_the_reader():
    before = set(threading.enumerate())
    produced = []

    def endless():
        i = 0
        while True:
            produced.append(i)
            yield torch.zeros(1)
            i += 1

    gen = prefetch(endless(), 2)
    for _ in range(3):
        next(gen)
    gen.close()
    time.sleep(0.3)
    n = len(produced)
    time.sleep(0.3)
    assert len(produced) == n <= 3 + 2 + 2  # consumed + queue + one in hand
    assert not _new_readers(before)


@pytest.mark.timeout(300)
def test_fit_weights_do_not_depend_on_read_ahead(tmp_path):
    from conftest import planted_fit_store

    from diffing.config import CrosscoderConfig, DistributedConfig, FitConfig, TrainConfig
    from diffing.crosscoder import Crosscoder
    from diffing.fit import fit
    from diffing.store import open_store

    store = open_store(planted_fit_store(tmp_path / "store"))
    weights = {}
    for depth in (0, 4):
        cfg = FitConfig(
            crosscoder=CrosscoderConfig(n_latents=128, k=8),
            train=TrainConfig(batch_size=512, steps=40, shuffle_buffer_rows=8192, log_every=10),
            distributed=DistributedConfig(prefetch_batches=depth),
        )
        fit(store, cfg, tmp_path / f"run{depth}")
        weights[depth] = Crosscoder.load(tmp_path / f"run{depth}" / "crosscoder").state_dict()
    assert all(torch.equal(weights[0][k], weights[4][k]) for k in weights[0])


def test_a_fit_that_fails_mid_epoch_stops_its_reader(tmp_path):
    """A divergence raised between batches: the reader thread stops with the fit, not when the
    traceback that holds its generator is collected (a CLI keeps it, so did pytest)."""
    from conftest import planted_fit_store

    from diffing.config import CrosscoderConfig, DistributedConfig, FitConfig, TrainConfig
    from diffing.fit import fit
    from diffing.store import open_store
    from diffing.train import FitDiverged

    store = open_store(planted_fit_store(tmp_path / "store"))
    cfg = FitConfig(
        crosscoder=CrosscoderConfig(n_latents=128, k=8),
        train=TrainConfig(batch_size=512, steps=40, lr=1e8, shuffle_buffer_rows=8192),
        distributed=DistributedConfig(prefetch_batches=4),
    )
    before = set(threading.enumerate())
    with pytest.raises(FitDiverged) as e:
        fit(store, cfg, tmp_path / "run")
    assert e.value.__traceback__ is not None and not _new_readers(before)
