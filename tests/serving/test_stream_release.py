"""A stream gives its API key's slot back however it ends, even when the client is gone
before the first chunk: the stream is then cancelled before its body iterator starts, and an
async generator never started runs no ``finally``."""

import asyncio

from medvl.serving.lifetime import Stream as _Stream


def test_a_stream_abandoned_before_its_first_chunk_gives_its_slot_back():
    released = []

    async def chunks():
        yield "data: x\n\n"

    async def receive() -> dict:  # Serve's ASGI spec 2.0: Starlette listens for the disconnect
        return {"type": "http.disconnect"}

    async def send(message: dict) -> None:  # the client leaves while the headers go out
        await asyncio.sleep(0.1)

    asyncio.run(_Stream(chunks(), lambda: released.append(1))({"type": "http"}, receive, send))
    assert released == [1]
