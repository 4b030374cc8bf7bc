"""Read-ahead for the in-process fit: the store's batches come from a background thread.

Reading parquet shards, refilling and permuting the shuffle buffer and (on a GPU) page-locking
each batch run beside the training step instead of between steps; pyarrow and numpy release the
GIL for that work. The batches and their order are exactly those of the plain iterator.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Iterator

import torch

_DONE = object()


def prefetch(batches: Iterator[torch.Tensor], depth: int, *, pin: bool = False) -> Iterator[torch.Tensor]:
    """Yield the items of `batches`, read up to `depth` ahead in a background thread (0: inline).

    pin: page-lock each batch in that thread, so the training step's
    ``.to("cuda", non_blocking=True)`` copies asynchronously. An error in the reader is raised
    here, at the position where it happened; closing this generator early stops the reader.
    """
    if depth <= 0:
        yield from batches
        return
    q: queue.Queue = queue.Queue(maxsize=depth)
    stop = threading.Event()

    def put(item) -> bool:
        while not stop.is_set():
            try:
                q.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def read() -> None:
        try:
            for b in batches:
                if not put(b.pin_memory() if pin else b):
                    return
            put(_DONE)
        except BaseException as e:  # handed to the consumer, raised there
            put(e)

    reader = threading.Thread(target=read, name="crossdiff-prefetch", daemon=True)
    reader.start()
    try:
        while True:
            item = q.get()
            if item is _DONE:
                return
            if isinstance(item, BaseException):
                raise item
            yield item
    finally:
        stop.set()
        reader.join(timeout=10)
