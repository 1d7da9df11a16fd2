"""An ``LLMEngine`` in a background thread, for asyncio callers (the HTTP server, the chat CLI).

The thread runs engine steps while there is work and sleeps otherwise; model forwards never run
on the event loop. Each request gets an asyncio queue that the thread fills with its outputs.
A consumer that stops reading (client gone, task cancelled) aborts its request, which frees the
request's slot at the next engine step.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
import time
from collections.abc import AsyncIterator, Sequence

from turbos.serve.engine import LLMEngine
from turbos.serve.sampling import SamplingParams
from turbos.serve.sequence import RequestOutput

log = logging.getLogger("turbos.serve")


class EngineStoppedError(RuntimeError):
    """The engine is shutting down and takes no new requests."""


class AsyncLLMEngine:
    def __init__(self, engine: LLMEngine) -> None:
        self.engine = engine
        self._queues: dict[str, tuple[asyncio.AbstractEventLoop, asyncio.Queue[RequestOutput]]] = {}
        self._queues_lock = threading.Lock()
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="turbos-engine", daemon=True)
        self.accepting = False

    def start(self) -> None:
        self.accepting = True
        self._thread.start()

    @property
    def alive(self) -> bool:
        return self._thread.is_alive() and self.accepting

    # ------------------------------------------------- what the server reads of the engine
    @property
    def token_bytes(self) -> list[bytes]:
        """The bytes each token id stands for (``turbos.serve.detokenizer.token_bytes``)."""
        return self.engine.token_bytes

    @property
    def max_context(self) -> int:
        """Prompt plus completion tokens at most."""
        return self.engine.max_context

    @property
    def max_waiting(self) -> int:
        """Requests the waiting queue holds at most."""
        return self.engine.scheduler.max_waiting

    @property
    def num_running(self) -> int:
        return self.engine.num_running

    @property
    def num_waiting(self) -> int:
        return self.engine.num_waiting

    def cache_bytes(self) -> int:
        """Bytes of decoding state the running batch holds."""
        return self.engine.cache.nbytes()

    async def encode(self, text: str) -> list[int]:
        """``LLMEngine.encode`` in a worker thread, so a long text does not block the event loop."""
        return await asyncio.to_thread(self.engine.encode, text)

    def add_request(
        self, prompt: str | Sequence[int], params: SamplingParams, request_id: str | None = None
    ) -> tuple[str, asyncio.Queue[RequestOutput]]:
        """Queue a request (call from the event loop); returns its id and its output queue.

        Raises what ``LLMEngine.add_request`` raises, and EngineStoppedError after shutdown began.
        """
        if not self.accepting:
            raise EngineStoppedError("the server is shutting down")
        queue: asyncio.Queue[RequestOutput] = asyncio.Queue()
        loop = asyncio.get_running_loop()
        with self._queues_lock:
            request_id = self.engine.add_request(prompt, params, request_id)
            self._queues[request_id] = (loop, queue)
        self._wake.set()
        return request_id, queue

    async def stream(
        self, request_id: str, queue: asyncio.Queue[RequestOutput]
    ) -> AsyncIterator[RequestOutput]:
        """Outputs of a request as they come; a consumer that leaves early cancels the request
        (close the generator, e.g. ``contextlib.aclosing``, to make that immediate)."""
        finished = False
        try:
            while not finished:
                out = await queue.get()
                finished = out.finished
                yield out
        finally:
            if not finished:
                self.abort(request_id)

    def abort(self, request_id: str) -> None:
        self.engine.abort(request_id)
        self._wake.set()

    def _run(self) -> None:
        while not self._stop.is_set():
            if not self.engine.has_unfinished():
                self._wake.wait(timeout=0.5)
                self._wake.clear()
                continue
            try:
                outputs = self.engine.step()
            except Exception as err:  # keep serving: fail the requests in flight, reset the engine
                log.exception("engine step failed")
                outputs = self.engine.fail_all(f"engine error: {type(err).__name__}: {err}")
            for out in outputs:
                self._deliver(out)

    def _deliver(self, out: RequestOutput) -> None:
        with self._queues_lock:
            target = (
                self._queues.pop(out.request_id, None) if out.finished else self._queues.get(out.request_id)
            )
        if target is None:
            return
        loop, queue = target
        with contextlib.suppress(RuntimeError):  # the caller's event loop is closed
            loop.call_soon_threadsafe(queue.put_nowait, out)

    def shutdown(self, drain_timeout: float = 0.0, join_timeout: float = 10.0) -> None:
        """Stop taking requests, let those in flight finish for up to ``drain_timeout`` seconds,
        cancel the rest (their consumers get finish_reason 'abort'), and stop the thread."""
        self.accepting = False
        deadline = time.monotonic() + drain_timeout
        while self.engine.has_unfinished() and time.monotonic() < deadline:
            time.sleep(0.02)
        with self._queues_lock:
            pending = list(self._queues)
        for request_id in pending:
            self.abort(request_id)
        deadline = time.monotonic() + join_timeout
        while self.engine.has_unfinished() and self._thread.is_alive() and time.monotonic() < deadline:
            time.sleep(0.02)
        self._stop.set()
        self._wake.set()
        if self._thread.is_alive():
            self._thread.join(join_timeout)
