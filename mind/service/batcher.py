"""Dynamic batching: concurrent requests gathered into one Recommender call, as Triton's dynamic batcher.

One worker thread owns every model call.  A request handler (on the event loop) puts a job on a
queue and awaits its future.  The worker takes the first job and every job already queued; then,
while requests that have arrived are still being read and parsed by the event loop (``arriving``),
it waits for them, until ``max_wait_s`` has passed since it took the first job or the batch holds
``max_batch`` users.  A lone request goes straight to the model: unlike Triton's fixed queue delay,
no time is spent waiting for requests that have not arrived (on a loaded machine a timed wait also
costs a scheduler wake-up, often several ms).  The jobs that can share a call (same model state,
``n``, ``exclude_history`` and merge arguments; see ``Query.key``) go through one ``ModelState.run``:
one user-tower call and one index search for all of their users; their answers go back to the event
loop in one wake-up (``call_soon_threadsafe``) per batch.  ``max_batch=1`` turns batching off: one
call per request, in arrival order.

A call that raises (one request's history has no known item, say) is retried request by request,
so a bad request fails alone and the others in its batch are still answered.  The Recommender is
never called from two threads at once, and the event loop never runs a model.
"""

from __future__ import annotations

import asyncio
import queue
import threading
import time
from typing import Callable, Optional

import numpy as np

from ..ann import match_threads
from .models import Query

_STOP = object()


class Overloaded(Exception):
    """The queue holds ``max_queue`` users already: answer 503 rather than queue without bound."""


class _Job:
    __slots__ = ("state", "query", "future", "loop")

    def __init__(self, state, query: Query, future: asyncio.Future, loop):
        self.state, self.query, self.future, self.loop = state, query, future, loop


def _resolve(answers: list) -> None:
    """Set each (future, result, error) of ``answers`` (on the future's event loop)."""
    for future, result, error in answers:
        if future.done():           # the client went away and the handler was cancelled
            continue
        if error is not None:
            future.set_exception(error)
        else:
            future.set_result(result)


def _answer(jobs_results: list) -> None:
    """Hand (job, result, error) triples to their event loops: one wake-up per loop, not one per job."""
    by_loop: dict = {}
    for job, result, error in jobs_results:
        by_loop.setdefault(job.loop, []).append((job.future, result, error))
    for loop, answers in by_loop.items():
        loop.call_soon_threadsafe(_resolve, answers)


class Batcher:
    """The worker thread and its queue.  ``on_batch(users)`` is called once per model call (metrics)."""

    def __init__(self, max_wait_s: float = 0.001, max_batch: int = 64, max_queue: int = 4096,
                 on_batch: Optional[Callable[[int], None]] = None):
        if max_wait_s < 0 or max_batch < 1 or max_queue < 1:
            raise ValueError("max_wait_s >= 0, max_batch >= 1 and max_queue >= 1 are required")
        self.max_wait_s, self.max_batch, self.max_queue = float(max_wait_s), int(max_batch), int(max_queue)
        self.on_batch = on_batch
        self._queue: queue.SimpleQueue = queue.SimpleQueue()
        self._queued_users = 0          # users put but not yet taken; read and written under _count_lock
        self._count_lock = threading.Lock()
        self._thread: Optional[threading.Thread] = None
        #: requests the event loop has started to read but not yet submitted (written by the loop only)
        self.arriving = 0

    @property
    def queued_users(self) -> int:
        """Users put on the queue and not yet taken by the worker."""
        return self._queued_users

    @property
    def batching(self) -> bool:
        return self.max_batch > 1

    def start(self) -> None:
        if self._thread is None:
            self._thread = threading.Thread(target=self._work, name="mind-serve-batcher", daemon=True)
            self._thread.start()

    def stop(self, timeout: float = 10.0) -> None:
        """Answer what is queued, then end the worker."""
        if self._thread is not None:
            self._queue.put(_STOP)
            self._thread.join(timeout)
            self._thread = None

    def put(self, state, query: Query, on_queued: Optional[Callable[[], None]] = None) -> asyncio.Future:
        """Queue ``query`` for a model call with ``state`` (on the event loop); the future's result is the
        answers (one dict per user), or what the model call raised.  Raises :class:`Overloaded`.
        ``on_queued``: called once the job is on the queue."""
        users = len(query.histories)
        with self._count_lock:
            if self._queued_users + users > self.max_queue:
                raise Overloaded(f"{self._queued_users} users are queued already (--max-queue {self.max_queue})")
            self._queued_users += users
        loop = asyncio.get_running_loop()
        future = loop.create_future()
        self._queue.put(_Job(state, query, future, loop))
        if on_queued is not None:
            on_queued()
        return future

    async def submit(self, state, query: Query, on_queued: Optional[Callable[[], None]] = None) -> list[dict]:
        """``await put(...)``: the answers, or raises what the model call raised, or :class:`Overloaded`."""
        return await self.put(state, query, on_queued)

    # --- the worker thread -------------------------------------------------------------------
    def _take(self, block: bool, timeout: Optional[float] = None):
        item = self._queue.get(block, timeout)
        if item is not _STOP:
            with self._count_lock:
                self._queued_users -= len(item.query.histories)
        return item

    def _work(self) -> None:
        match_threads()         # the searches run on this thread: faiss gets torch's thread count here too
        stopping = False
        while not stopping:
            first = self._take(True)
            if first is _STOP:
                break
            jobs, users = [first], len(first.query.histories)
            deadline = time.monotonic() + self.max_wait_s
            while users < self.max_batch:
                remaining = deadline - time.monotonic()
                wait = remaining > 0 and self.arriving > 0
                try:
                    job = self._take(wait, remaining if wait else None)
                except queue.Empty:
                    break
                if job is _STOP:
                    stopping = True
                    break
                jobs.append(job)
                users += len(job.query.histories)
            groups: dict = {}
            for job in jobs:
                groups.setdefault((id(job.state), job.query.key()), []).append(job)
            for group in groups.values():
                self._run(group)

    def _run(self, group: list) -> None:
        state, q = group[0].state, group[0].query
        histories = [h for job in group for h in job.query.histories]
        feats = None
        if any(job.query.features is not None for job in group):
            width = len(state.feature_names)
            feats = np.concatenate([job.query.features if job.query.features is not None
                                    else np.zeros((len(job.query.histories), width), np.int64) for job in group])
        try:
            results = state.run(histories, q.n, feats, q.exclude_history, q.merge_kwargs)
        except Exception as e:  # noqa: BLE001 - handed to the request that caused it
            if len(group) > 1:
                for job in group:           # find the request that failed; answer the others
                    self._run([job])
                return
            _answer([(group[0], None, e)])
            return
        if self.on_batch is not None:
            self.on_batch(len(histories))
        answers, start = [], 0
        for job in group:
            stop = start + len(job.query.histories)
            answers.append((job, results[start:stop], None))
            start = stop
        _answer(answers)
