"""A limit on request bodies (`--max-request-bytes`), enforced before anything parses them.

A body larger than the limit gets 413 with OpenAI's error body, whether the client declared its size
(Content-Length: refused before a byte of it is read) or streams it in chunks (refused as soon as the running
count passes the limit). The over-limit rest of the body is read and dropped up to DRAIN_BYTES, so that a client
that sends its whole body before reading the answer (most do) gets the 413 rather than a reset connection; past
that the connection is closed.

An accepted body is read whole here and replayed to the app as one message; later receive() calls (the
disconnect watch of streaming responses) go to the server as before.
"""

from __future__ import annotations

import json
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]

DRAIN_BYTES = 64 << 20
_METHODS_WITH_BODY = ("POST", "PUT", "PATCH")


def _declared_length(scope: Scope) -> int | None:
    for name, value in scope.get("headers", []):
        if name == b"content-length":
            try:
                return int(value)
            except ValueError:
                return None
    return None


async def _too_large(send: Send, size: str, limit: int) -> None:
    error = {"message": f"the request body is {size} bytes; this server accepts at most {limit} bytes "
                        "(--max-request-bytes)", "type": "RequestTooLargeError", "param": None, "code": 413}
    body = json.dumps({"error": error}).encode()
    await send({"type": "http.response.start", "status": 413,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
                            (b"connection", b"close")]})
    await send({"type": "http.response.body", "body": body})


async def _drain(receive: Receive, num_bytes: int) -> None:
    """Reads and drops up to num_bytes more of the body (or until it ends, or the client leaves)."""
    while num_bytes > 0:
        message = await receive()
        if message["type"] != "http.request":
            return
        num_bytes -= len(message.get("body", b""))
        if not message.get("more_body", False):
            return


class BodyLimitMiddleware:
    def __init__(self, app: ASGIApp, max_bytes: int) -> None:
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["method"] not in _METHODS_WITH_BODY:
            await self.app(scope, receive, send)
            return
        declared = _declared_length(scope)
        if declared is not None and declared > self.max_bytes:
            if declared <= self.max_bytes + DRAIN_BYTES:
                await _drain(receive, declared)
            await _too_large(send, str(declared), self.max_bytes)
            return
        body, more = await self._read(receive)
        if body is None:
            if more:
                await _drain(receive, DRAIN_BYTES)
            await _too_large(send, f"more than {self.max_bytes}", self.max_bytes)
            return
        await self.app(scope, _replay(body, receive), send)

    async def _read(self, receive: Receive) -> tuple[bytes | None, bool]:
        """(the whole body, False), or (None, whether more of it is to come) as soon as it passes max_bytes.
        A client that leaves ends the body early."""
        chunks: list[bytes] = []
        size = 0
        while True:
            message = await receive()
            if message["type"] != "http.request":
                break
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > self.max_bytes:
                return None, bool(message.get("more_body", False))
            chunks.append(chunk)
            if not message.get("more_body", False):
                break
        return b"".join(chunks), False


def _replay(body: bytes, receive: Receive) -> Receive:
    sent = False

    async def replay() -> Message:
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}
        return await receive()

    return replay
