"""Micro-batching: concurrent requests' work done together.

EmbedBatcher: images through the model, one forward pass per batch. A request thread calls embed_pixels()
and waits; one worker thread takes the first waiting request, then whatever else arrives within wait_ms (up
to max_batch images), runs the model once, and hands each request its rows. An error in the batch is given
to every request of that batch.

SearchBatcher: embedding searches, several queries to one FAISS call. The event loop queues a request and
awaits it; each search thread takes every request already waiting (up to max_batch; it never waits for
more), works through them together and hands their answers back to the loop in one call. One at a time, a
search ran on caches the previous request's Python had evicted, and that Python on caches the search had
evicted: on 2 cores a /knn-service request cost the server ~3.4-4.2 ms of CPU one at a time, ~2.5-3.0 ms
in batches (the event loop's share fell from ~0.5 ms to ~0.27 ms, one wake-up per batch).
"""
from __future__ import annotations

import queue
import threading
import time
from concurrent.futures import Future
from typing import TYPE_CHECKING, Any, Callable, Optional

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


class SearchBatcher:
    """fn(items) -> one answer per item (an exception instance where that item failed), run on ``threads``
    threads over whatever requests wait. submit() is called on the event loop and returns an asyncio future.
    ``setup`` runs once in each thread before its first batch."""

    def __init__(self, fn: Callable[[list, Callable], None], threads: int, max_batch: int,
                 setup: Optional[Callable[[], None]] = None, flush: int = 4):
        self.fn, self.max_batch, self.setup, self.flush = fn, max(1, max_batch), setup, max(1, flush)
        self._queue: "queue.SimpleQueue" = queue.SimpleQueue()
        self._lock, self._closed = threading.Lock(), False
        self._threads = [threading.Thread(target=self._run, name=f"provenance-guard-search-{n}", daemon=True)
                         for n in range(max(1, threads))]
        for t in self._threads:
            t.start()

    def submit(self, item: Any):
        import asyncio

        loop = asyncio.get_running_loop()
        future = loop.create_future()
        with self._lock:  # nothing is queued once close() has begun: it would wait for a thread forever
            if self._closed:
                future.set_exception(self._refusal)
            else:
                self._queue.put((item, future, loop))
        return future

    def close(self, refusal: BaseException, timeout: float = 30.0) -> None:
        """Stops the threads once the requests queued before this call are answered; any submitted after it
        get ``refusal``. Blocks: call it off the event loop."""
        with self._lock:
            self._closed, self._refusal = True, refusal
            for _ in self._threads:
                self._queue.put(_STOP)
        for t in self._threads:
            t.join(timeout=timeout)
        late = []  # left by a thread that did not finish within timeout (fn is stuck): refused, not lost
        while True:
            try:
                item = self._queue.get_nowait()
            except queue.Empty:
                break
            if item is not _STOP:
                late.append(item)
        self._answer(late, [refusal] * len(late))

    def _run(self) -> None:
        if self.setup is not None:
            self.setup()
        while True:
            item = self._queue.get()
            if item is _STOP:
                return
            batch = [item]
            while len(batch) < self.max_batch:
                try:
                    item = self._queue.get_nowait()
                except queue.Empty:
                    break
                if item is _STOP:
                    self._queue.put(_STOP)  # another thread's, or this one's after the batch
                    break
                batch.append(item)
            ready: list = []
            answered = [False] * len(batch)

            def answer(n: int, value) -> None:
                answered[n] = True
                ready.append((batch[n], value))
                if len(ready) >= self.flush:
                    self._answer([b for b, _ in ready], [v for _, v in ready])
                    ready.clear()

            try:
                self.fn([it for it, _, _ in batch], answer)
            except BaseException as exc:  # noqa: BLE001 - fn answers per item; anything else fails the rest
                for n, done in enumerate(answered):
                    if not done:
                        ready.append((batch[n], exc))
            self._answer([b for b, _ in ready], [v for _, v in ready])

    @staticmethod
    def _answer(batch: list, answers: list) -> None:
        by_loop: dict = {}
        for (_, future, loop), answer in zip(batch, answers):
            futures, given = by_loop.setdefault(loop, ([], []))
            futures.append(future)
            given.append(answer)
        for loop, (futures, given) in by_loop.items():
            try:
                # one wake-up of the loop per batch (each costs it tens of microseconds)
                loop.call_soon_threadsafe(_deliver, futures, given)
            except RuntimeError:  # the loop is closed: nobody waits for these answers any more
                pass


def _deliver(futures: list, answers: list) -> None:
    for future, answer in zip(futures, answers):
        if future.done():  # cancelled: the client went away or the server stopped waiting
            continue
        if isinstance(answer, BaseException):
            future.set_exception(answer)
        else:
            future.set_result(answer)
