"""The backend-independent part of ``detox serve``: one request's state (:class:`Job`, :class:`Choice`) and the
:class:`Scheduler` that feeds jobs to a backend from a bounded queue on one worker thread.

Backends (:meth:`detox.backends.Backend.decode`) only produce tokens; stop strings, ``max_tokens``, cancellation and the
hand-over of text to the asyncio side live here, once.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import threading
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable, Hashable

from detox.backends.base import TokenInfo

if TYPE_CHECKING:
    from detox.serve.model import ServedModel


@dataclass(frozen=True)
class GenRequest:
    """What one HTTP request asks a backend to decode (already validated against the server's limits)."""

    prompt_ids: list[int]
    max_tokens: int
    temperature: float = 1.0  # 0: greedy
    top_p: float = 1.0
    seed: int | None = None
    stop: tuple[str, ...] = ()
    strength: float | None = None  # None: fusion off (the unwrapped model)
    logprobs: int | None = None  # None: none; k: the chosen token's logprob and the k most likely alternatives
    n: int = 1


@dataclass
class Delta:
    index: int
    text: str
    tokens: list[TokenInfo]


@dataclass
class Finish:
    index: int
    reason: str  # "stop" | "length" | "cancelled"


@dataclass
class Done:
    prompt_tokens: int
    completion_tokens: int


@dataclass
class Failed:
    message: str
    status: int = 500


class QueueFull(Exception):
    """The scheduler's queue holds ``max_queue`` waiting jobs already."""


class Choice:
    """One output sequence: applies ``max_tokens`` and stop strings to the text a backend produces.

    Text that could be the start of a stop string is held back until it is known not to be one, so a client
    never sees a stop string or part of one (as OpenAI's API behaves).
    """

    def __init__(self, job: "Job", index: int) -> None:
        self.job, self.index = job, index
        self.prompt_ids = job.request.prompt_ids
        self.top_logprobs = job.request.logprobs or 0
        self.tokens = 0
        self._held = ""
        self._held_tokens: list[TokenInfo] = []
        self.finish_reason: str | None = None

    @property
    def done(self) -> bool:
        return self.finish_reason is not None or self.job.cancelled.is_set()

    def push(self, piece: str, info: TokenInfo | None = None) -> bool:
        """Add one generated token's text (``piece`` may be empty while a character is incomplete); True when done."""
        if self.finish_reason is not None:
            return True
        self.tokens += 1
        self.job.count_token()
        if info is not None:
            self._held_tokens.append(info)
        held = self._held + piece
        stops = self.job.request.stop
        cut = min((i for i in (held.find(s) for s in stops) if i >= 0), default=-1)
        if cut >= 0:
            self._held = held[:cut]  # sent by finish()
            return self.finish("stop")
        keep = max((k for s in stops for k in range(min(len(s) - 1, len(held)), 0, -1) if held.endswith(s[:k])), default=0)
        self._emit(held[: len(held) - keep])
        self._held = held[len(held) - keep:]
        if self.tokens >= self.job.request.max_tokens:
            return self.finish("length")
        return False

    def _emit(self, text: str) -> None:
        if text or self._held_tokens:
            self.job.emit(Delta(self.index, text, self._held_tokens))
            self._held_tokens = []

    def finish(self, reason: str) -> bool:
        """End this choice (``stop``: end of text or a stop string; ``length``: ``max_tokens``); flushes held text."""
        if self.finish_reason is None:
            self._emit(self._held)  # a held prefix of a stop string that never completed is real text
            self._held = ""
            self.finish_reason = reason
            self.job.emit(Finish(self.index, reason))
        return True


_ids = itertools.count()


class Job:
    """One request in flight: its choices, a cancellation flag, timings, and the events read by the HTTP side.

    The worker thread calls :meth:`emit`; the event loop reads :attr:`events` (thread-safe hand-over).
    """

    def __init__(self, request: GenRequest, loop: asyncio.AbstractEventLoop | None = None) -> None:
        self.id = next(_ids)
        self.request = request
        self.loop = loop or asyncio.get_running_loop()
        self.events: asyncio.Queue[Any] = asyncio.Queue()
        self.cancelled = threading.Event()
        self.choices = [Choice(self, i) for i in range(request.n)]
        self.enqueued = time.perf_counter()
        self.first_token: float | None = None
        self.last_token: float | None = None
        self.completion_tokens = 0

    def count_token(self) -> None:
        now = time.perf_counter()
        if self.first_token is None:
            self.first_token = now
        self.last_token = now
        self.completion_tokens += 1

    def emit(self, event: Any) -> None:
        self.loop.call_soon_threadsafe(self.events.put_nowait, event)

    def cancel(self) -> None:
        """The client went away: the backend stops this job's rows at the next token."""
        self.cancelled.set()

    def close(self) -> None:
        """Called by the worker when the backend is done with the job (finished, cancelled or failed)."""
        for choice in self.choices:
            if choice.finish_reason is None:
                choice.finish("cancelled" if self.cancelled.is_set() else "length")
        self.emit(Done(len(self.request.prompt_ids), self.completion_tokens))


class Scheduler:
    """A bounded queue in front of one worker thread that runs the backend.

    The worker takes the oldest waiting job and every other waiting job the backend can decode with it in one
    batch (same :func:`batch_key_of`), up to ``backend.max_batch`` rows; llama.cpp's backend says 1, so it
    decodes one request at a time. Before a batch starts, the worker waits while requests keep arriving (less than
    ``batch_wait`` seconds apart, at most ``10 * batch_wait`` after the oldest), so requests sent together share a
    batch (:meth:`_gather`). A job that arrives while a batch runs waits for the next one (no
    continuous batching: a batch ends when its longest row ends).
    """

    def __init__(self, backend: "ServedModel", max_queue: int = 64, batch_wait: float = 0.05,
                 on_batch: Callable[[list[Job]], None] = lambda jobs: None,
                 on_done: Callable[[Job], None] = lambda job: None) -> None:
        self.backend = backend
        self.max_queue = max_queue
        self.batch_wait = batch_wait
        self.on_batch = on_batch  # called with the jobs of a batch as it starts (metrics)
        self.on_done = on_done  # called with each job once the backend is done with it (metrics)
        self._waiting: list[Job] = []
        self._last_arrival = 0.0
        self._cond = threading.Condition()
        self._closed = False
        self.running = 0
        self._thread = threading.Thread(target=self._loop, name="detox-serve-worker", daemon=True)
        self._thread.start()

    @property
    def depth(self) -> int:
        """Jobs waiting (not yet running)."""
        return len(self._waiting)

    @property
    def alive(self) -> bool:
        return self._thread.is_alive()

    def submit(self, job: Job) -> None:
        with self._cond:
            if len(self._waiting) >= self.max_queue:
                raise QueueFull(f"the server's queue is full ({self.max_queue} requests waiting); retry later")
            self._waiting.append(job)
            self._last_arrival = time.perf_counter()
            self._cond.notify()

    def close(self) -> None:
        with self._cond:
            self._closed = True
            for job in self._waiting:
                job.cancel()
            self._cond.notify()
        self._thread.join(timeout=30)

    def _take(self) -> list[Job]:
        with self._cond:
            while not self._waiting and not self._closed:
                self._cond.wait()
            if self._closed:
                return []
            if self.batch_wait > 0 and self.backend.max_batch > 1:
                self._gather()
            first = self._waiting[0]
            key = batch_key_of(first)
            batch, rows = [], 0
            for job in list(self._waiting):
                if job.cancelled.is_set():  # gone before it started
                    self._waiting.remove(job)
                    self._finish(job)
                    continue
                if batch_key_of(job) == key and (not batch or rows + job.request.n <= self.backend.max_batch):
                    batch.append(job)
                    rows += job.request.n
                    self._waiting.remove(job)
            return batch

    def _gather(self) -> None:
        """Wait (holding the condition) while requests keep arriving: until none came for ``batch_wait``, the queue
        holds a full batch, or the oldest waiting job has waited ``10 * batch_wait``.

        Requests sent together reach the queue spread out by the event loop's work on each (parsing, tokenizing),
        more so while the worker holds the GIL; a fixed wait after the first one split such a burst into a small
        and a large batch, and with clients that send again when answered the split then repeated every round.
        """
        deadline = self._waiting[0].enqueued + 10 * self.batch_wait
        while not self._closed and sum(j.request.n for j in self._waiting) < self.backend.max_batch:
            until = min(self._last_arrival + self.batch_wait, deadline)
            now = time.perf_counter()
            if now >= until:
                return
            self._cond.wait(until - now)

    def _loop(self) -> None:
        while True:
            jobs = self._take()
            if self._closed:
                return
            if not jobs:
                continue
            self.running = len(jobs)
            self.on_batch(jobs)
            try:
                self.backend.run(jobs)
            except Exception as err:  # noqa: BLE001 - one failed batch must not stop the server
                logging.getLogger("detox.serve").exception("a batch of %d request(s) failed", len(jobs))
                for job in jobs:
                    job.emit(Failed(f"generation failed: {err}"))
            finally:
                for job in jobs:
                    self._finish(job)
                self.running = 0

    def _finish(self, job: Job) -> None:
        """The backend is done with ``job`` (or it left before it started): close it and count it."""
        job.close()
        self.on_done(job)


def batch_key_of(job: Job) -> Hashable:
    """Requests that one ``generate`` call can decode together: the same fusion strength and sampling settings
    (seeded sampling runs alone: its result must not depend on which other requests shared the batch)."""
    request = job.request
    sampled = request.temperature > 0
    seed_key = job.id if sampled and request.seed is not None else None
    return (request.strength, sampled, request.temperature if sampled else None, request.top_p if sampled else None,
            request.logprobs is not None, seed_key)
