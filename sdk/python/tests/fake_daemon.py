"""A tiny stand-in for deltaboxd on a Unix socket, for the UNIT tests of the SDK's
own logic (request shapes, error mapping, partial branch failure). It knows nothing of
sandboxes: each test scripts its answers. The real daemon is tested in test_daemon*.py.
"""

from __future__ import annotations

import json
import os
import socketserver
import sys
import tempfile
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler
from typing import Any
from urllib.parse import parse_qsl, urlsplit


@dataclass
class Request:
    """A request the fake received."""

    method: str
    path: str
    query: dict[str, str]
    body: Any


Answer = tuple[int, Any]
Responder = Callable[[Request], Answer]


@dataclass
class FakeDaemon:
    """Answers ``(method, path)`` with what :meth:`on` scripted; 404 route_not_found
    otherwise. ``requests`` records everything received, in order."""

    socket: str
    routes: dict[tuple[str, str], Responder] = field(default_factory=dict)
    requests: list[Request] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def on(self, method: str, path: str, answer: Answer | Responder) -> None:
        """Scripts the answer (a fixed ``(status, body)`` or a function of the request)."""
        if callable(answer):
            self.routes[(method, path)] = answer
        else:
            fixed: Answer = answer
            self.routes[(method, path)] = lambda _request: fixed

    def sent(self, method: str, path: str) -> list[Request]:
        """The requests received for this route."""
        return [r for r in self.requests if r.method == method and r.path == path]


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    fake: FakeDaemon

    def log_message(self, format: str, *args: Any) -> None:
        pass  # the stdlib logger indexes client_address, which a Unix socket has not

    def _serve(self) -> None:
        url = urlsplit(self.path)
        length = int(self.headers.get("Content-Length") or 0)
        raw = self.rfile.read(length) if length else b""
        body = json.loads(raw) if raw else None
        req = Request(self.command, url.path, dict(parse_qsl(url.query)), body)
        with self.fake.lock:
            self.fake.requests.append(req)
            responder = self.fake.routes.get((self.command, url.path))
        if responder is None:
            status, answer = 404, {"error": f"no route {self.command} {url.path}", "kind": "route_not_found"}
        else:
            status, answer = responder(req)
        data = answer if isinstance(answer, bytes) else json.dumps(answer).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    do_GET = do_POST = do_DELETE = do_PUT = _serve


class _Server(socketserver.ThreadingMixIn, socketserver.UnixStreamServer):
    daemon_threads = True

    def handle_error(self, request: Any, client_address: Any) -> None:
        # A client that gave up (the timeout test) closed its end: not an error here.
        if not isinstance(sys.exc_info()[1], (BrokenPipeError, ConnectionResetError)):
            super().handle_error(request, client_address)


class running_fake:
    """Context manager: a :class:`FakeDaemon` served on a fresh socket in a thread,
    shut down and its directory removed on exit."""

    def __enter__(self) -> FakeDaemon:
        self.dir = tempfile.mkdtemp(prefix="deltabox-sdk-fake-")
        self.fake = FakeDaemon(os.path.join(self.dir, "api.sock"))
        handler = type("Handler", (_Handler,), {"fake": self.fake})
        self.server = _Server(self.fake.socket, handler)
        self.thread = threading.Thread(target=self.server.serve_forever, args=(0.02,), daemon=True)
        self.thread.start()
        return self.fake

    def __exit__(self, *exc: object) -> None:
        self.server.shutdown()
        self.server.server_close()
        self.thread.join(timeout=5)
        try:
            os.unlink(self.fake.socket)
        except FileNotFoundError:
            pass
        os.rmdir(self.dir)
