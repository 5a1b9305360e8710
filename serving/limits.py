"""Request body size limit: 413 when ``Content-Length`` or the bytes actually received exceed it."""

from __future__ import annotations

import json


class BodyLimit:
    """ASGI middleware that reads the whole body (at most ``max_bytes``) before the app runs, then replays it.

    Args:
        app: the wrapped ASGI app.
        max_bytes: the largest body accepted.
    """

    def __init__(self, app, max_bytes: int):
        self.app, self.max_bytes = app, max_bytes

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        declared = dict(scope["headers"]).get(b"content-length")
        if declared is not None:
            if not declared.isdigit():
                return await _reject(send, 400, f"invalid Content-Length header {declared[:40]!r}")
            if int(declared) > self.max_bytes:
                return await _reject(send, 413, self._too_large(f"Content-Length is {int(declared)} bytes"))
        body, more = bytearray(), True
        while more:
            message = await receive()
            if message["type"] == "http.disconnect":
                return None
            body += message.get("body", b"")
            more = message.get("more_body", False)
            if len(body) > self.max_bytes:
                return await _reject(send, 413, self._too_large(f"the body has more than {self.max_bytes} bytes"))
        replayed = False

        async def replay():
            nonlocal replayed
            if replayed:
                return await receive()
            replayed = True
            return {"type": "http.request", "body": bytes(body), "more_body": False}

        return await self.app(scope, replay, send)

    def _too_large(self, found: str) -> str:
        return f"request body too large: {found}, the limit is {self.max_bytes} (settings.max_body_bytes)"


async def _reject(send, status: int, detail: str) -> None:
    payload = json.dumps({"detail": detail}).encode()
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(payload)).encode()),
                            (b"connection", b"close")]})
    await send({"type": "http.response.body", "body": payload})
