"""How long a front request holds its key's slot: until it has ended *and* every thread it
started has returned, and, for a stream, until the stream is sent or abandoned."""

import asyncio
from collections.abc import AsyncIterator, Callable
from concurrent.futures import Executor
from typing import TypeVar

from fastapi.exceptions import RequestValidationError
from fastapi.responses import StreamingResponse

T = TypeVar("T")


# Threads of one front replica for parsing and image decoding: their own pool, so decodes
# queue behind each other instead of taking the default pool Ray and asyncio also use. A
# front replica asks for a quarter of a CPU; more throughput is more front replicas.
FRONT_THREADS = 8


class Slot:
    """A request's key slot, given back once the request has ended *and* no thread it
    started still runs. A client gone mid-decode cancels the request, not its thread (a
    thread cannot be stopped): freed at the cancellation, the slot let one key start decode
    after decode while the earlier ones ran on, so the per-key limit bounded no CPU."""

    def __init__(self, release: Callable[[], None], pool: Executor):
        self._release, self.pool = release, pool
        self.threads, self.ended = 0, False

    async def run(self, fn: Callable[..., T], *args) -> T:
        """``fn(*args)`` in the pool; the slot is held until it returns, even when this
        request is cancelled first (one still queued is dropped from the queue then)."""
        loop = asyncio.get_running_loop()
        future = self.pool.submit(fn, *args)
        self.threads += 1
        future.add_done_callback(lambda _: loop.call_soon_threadsafe(self._thread_done))
        return await asyncio.wrap_future(future)

    def _thread_done(self) -> None:
        self.threads -= 1
        self._maybe_release()

    def __call__(self) -> None:
        """The request has ended (answered, failed or cancelled)."""
        self.ended = True
        self._maybe_release()

    def _maybe_release(self) -> None:
        if self.ended and not self.threads:
            self._release()


async def parsed(slot: Slot, parse: Callable[[bytes], T], raw: bytes) -> T:
    """``parse(raw)`` off the event loop (bounded by the body limit); bad JSON or a body
    that is not the model is a 400 in OpenAI's shape."""
    try:
        return await slot.run(parse, raw)
    except ValueError as e:  # pydantic.ValidationError is a ValueError; so is bad JSON
        errors = getattr(e, "errors", lambda: [])()
        raise RequestValidationError(errors or [{"msg": str(e)}]) from e


class Stream(StreamingResponse):
    """An SSE stream that calls ``release()`` once it has been sent or abandoned. Around the
    whole ASGI call, not in the body iterator: a client gone while the headers go out cancels
    the stream before its iterator starts, and a generator never started runs no ``finally``
    (its key's slot was lost for good)."""

    def __init__(self, chunks: AsyncIterator[str], release: Callable[[], None]):
        super().__init__(chunks, media_type="text/event-stream")
        self.release = release

    async def __call__(self, scope, receive, send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            self.release()
