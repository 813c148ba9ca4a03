"""Micro-batching: concurrent requests' images go through the model together, one forward pass per batch.

A request thread calls embed_pixels() and waits; one worker thread takes the first waiting request, then
whatever else arrives within wait_ms (up to max_batch images), runs the model once, and hands each request
its rows. An error in the batch is given to every request of that batch.
"""
from __future__ import annotations

import queue
import threading
import time
from concurrent.futures import Future
from typing import TYPE_CHECKING, Callable, Optional

if TYPE_CHECKING:  # pragma: no cover
    import numpy as np

_STOP = object()


class EmbedBatcher:
    def __init__(self, embedder, max_batch: int = 32, wait_ms: float = 5.0,
                 on_batch: Optional[Callable[[int], None]] = None):
        self.embedder = embedder
        self.spec = embedder.spec
        self.dim = embedder.dim
        self.max_batch, self.wait_s = max(1, max_batch), wait_ms / 1000.0
        self.on_batch = on_batch
        self._queue: "queue.Queue" = queue.Queue()
        self._thread = threading.Thread(target=self._run, name="provenance-guard-batcher", daemon=True)
        self._thread.start()

    def embed_pixels(self, pixels, batch_size: int = 32) -> "np.ndarray":
        future: Future = Future()
        self._queue.put((list(pixels), future))
        return future.result()

    def close(self) -> None:
        self._queue.put(_STOP)
        self._thread.join(timeout=30)

    def _run(self) -> None:
        import numpy as np

        while True:
            item = self._queue.get()
            if item is _STOP:
                return
            batch = [item]
            count = len(item[0])
            deadline = time.monotonic() + self.wait_s
            stop = False
            while count < self.max_batch:
                try:
                    nxt = self._queue.get(timeout=max(0.0, deadline - time.monotonic()))
                except queue.Empty:
                    break
                if nxt is _STOP:
                    stop = True
                    break
                batch.append(nxt)
                count += len(nxt[0])
            pixels = [p for px, _ in batch for p in px]
            try:
                vectors = self.embedder.embed_pixels(pixels, max(len(pixels), 1))
            except BaseException as exc:  # noqa: BLE001 - every waiting request learns of the failure
                for _, future in batch:
                    future.set_exception(exc)
            else:
                if self.on_batch:
                    self.on_batch(len(pixels))
                pos = 0
                for px, future in batch:
                    future.set_result(np.asarray(vectors[pos:pos + len(px)]))
                    pos += len(px)
            if stop:
                return
