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


def test_closing_early_stops_the_reader():
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
    assert not any(t.name == "crossdiff-prefetch" for t in threading.enumerate())


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
