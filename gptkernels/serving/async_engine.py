"""The engine on a background thread, driven from asyncio: requests go in through a queue, outputs come back
to each caller's event loop. Only this thread touches the :class:`Engine`, so the engine needs no locks."""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
import uuid
from collections.abc import AsyncIterator

from .engine import Engine, Output, SamplingParams

log = logging.getLogger("gptkernels.serving")


class EngineError(RuntimeError):
    """The engine failed while running a request (the request ends; the engine goes on)."""


class AsyncEngine:
    """Runs ``engine.step()`` in a loop on a daemon thread while any request is unfinished."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self._inbox: queue.SimpleQueue = queue.SimpleQueue()
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._routes: dict[str, tuple[asyncio.AbstractEventLoop, asyncio.Queue, int]] = {}
        self._thread: threading.Thread | None = None

    def start(self) -> AsyncEngine:
        if self._thread is None:
            self._thread = threading.Thread(target=self._loop, name="gptkernels-engine", daemon=True)
            self._thread.start()
        return self

    def stop(self, timeout: float = 10.0) -> None:
        """End the thread; requests still in flight end with :class:`EngineError`."""
        self._stop.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout)
            self._thread = None
        with self._lock:
            pending = list(self._routes)
        for rid in pending:
            self._deliver(rid, EngineError("the server is shutting down"))

    async def generate(self, requests: list[tuple[list[int], SamplingParams]]) -> AsyncIterator[tuple[int, Output]]:
        """Run several requests (e.g. the ``n`` choices of one HTTP request); yield ``(index, output)`` as they
        come. Requests must have passed ``engine.check_request``. Leaving the loop early (a client that went
        away, a cancelled task) aborts whatever is still running and frees its slots."""
        loop = asyncio.get_running_loop()
        q: asyncio.Queue = asyncio.Queue()
        ids = [f"{uuid.uuid4().hex}-{i}" for i in range(len(requests))]
        with self._lock:
            for i, rid in enumerate(ids):
                self._routes[rid] = (loop, q, i)
        for rid, (prompt_ids, params) in zip(ids, requests):
            self._inbox.put(("add", rid, prompt_ids, params))
        self._wake.set()
        unfinished = set(ids)
        try:
            while unfinished:
                item = await q.get()
                if isinstance(item, BaseException):
                    raise item
                index, out = item
                if out.finished:
                    unfinished.discard(out.request_id)
                yield index, out
        finally:
            with self._lock:
                for rid in ids:
                    self._routes.pop(rid, None)
            for rid in unfinished:
                self._inbox.put(("abort", rid))
            self._wake.set()

    # -------------------------------------------------------------------------------------------------
    def _deliver(self, rid: str, item) -> None:
        with self._lock:
            route = self._routes.get(rid)
        if route is None:
            return
        loop, q, index = route
        payload = item if isinstance(item, BaseException) else (index, item)
        try:
            loop.call_soon_threadsafe(q.put_nowait, payload)
        except RuntimeError:  # the caller's loop is closed
            pass

    def _drain_inbox(self) -> None:
        while True:
            try:
                cmd = self._inbox.get_nowait()
            except queue.Empty:
                return
            if cmd[0] == "add":
                _, rid, prompt_ids, params = cmd
                with self._lock:
                    wanted = rid in self._routes
                if not wanted:  # the caller left before the request started
                    continue
                try:
                    self.engine.add_request(prompt_ids, params, request_id=rid)
                except Exception as e:  # checked before queueing; a failure here is the caller's to see
                    self._deliver(rid, e if isinstance(e, ValueError) else EngineError(str(e)))
            else:
                self.engine.abort_request(cmd[1])

    def _loop(self) -> None:
        while not self._stop.is_set():
            self._drain_inbox()
            if not self.engine.has_unfinished():
                self._wake.wait(0.5)
                self._wake.clear()
                continue
            try:
                outputs = self.engine.step()
            except Exception as e:  # a bug or out of memory: end the requests in flight, keep serving
                log.exception("engine step failed; aborting the requests in flight")
                for rid in self.engine.abort_all():
                    self._deliver(rid, EngineError(f"generation failed: {type(e).__name__}: {e}"))
                continue
            for out in outputs:
                self._deliver(out.request_id, out)
