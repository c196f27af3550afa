"""A small scripted HTTP server on 127.0.0.1 for download tests.

Serves byte payloads with optional faults: ignore Range requests, cut the connection after
N bytes (for the first K requests), send slowly, answer with a redirect or a status code.
Every request is recorded. The server binds an ephemeral port on the loopback interface
only, and shuts itself down after ``lifetime`` seconds even if a test forgets to.
"""
from __future__ import annotations

import http.server
import re
import socket
import threading
import time
from dataclasses import dataclass
from typing import Dict, List, Optional

_RANGE = re.compile(r"bytes=(\d+)-$")


@dataclass
class Route:
    """How one path is served.

    Attributes:
        body: the file's bytes.
        honour_range: answer ``Range: bytes=N-`` with 206 (else ignore it and send 200).
        cut_after: close the connection after sending this many body bytes ...
        cuts: ... on this many requests; later requests are served in full.
        chunk_delay: seconds to sleep between 16 KiB chunks (a slow server).
        status: answer this status with an empty body instead (e.g. 404, 500).
        redirect_to: answer 302 with this Location instead.
        content_length: announce this Content-Length instead of the true one (a lying server).
    """

    body: bytes = b""
    honour_range: bool = True
    cut_after: Optional[int] = None
    cuts: int = 0
    chunk_delay: float = 0.0
    status: int = 200
    redirect_to: Optional[str] = None
    content_length: Optional[int] = None


@dataclass
class Request:
    path: str
    range: Optional[str]
    status: int


class LocalHTTPServer:
    """``with LocalHTTPServer({"/f.pth": Route(body)}) as server: server.url("/f.pth")``."""

    def __init__(self, routes: Dict[str, Route], lifetime: float = 60.0) -> None:
        self.routes = routes
        self.requests: List[Request] = []
        self._lock = threading.Lock()
        owner = self

        class Handler(http.server.BaseHTTPRequestHandler):
            timeout = 10  # socket timeout per connection

            def log_message(self, *args) -> None:  # keep test output clean
                pass

            def do_GET(self) -> None:  # noqa: N802 (http.server API)
                owner._serve(self)

        self._httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._httpd.daemon_threads = True
        self.port = self._httpd.server_address[1]
        self._thread = threading.Thread(target=self._httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
        self._watchdog = threading.Timer(lifetime, self.stop)
        self._watchdog.daemon = True
        self._stopped = False

    # -- lifecycle
    def start(self) -> "LocalHTTPServer":
        self._thread.start()
        self._watchdog.start()
        return self

    def stop(self) -> None:
        if self._stopped:
            return
        self._stopped = True
        self._watchdog.cancel()
        self._httpd.shutdown()
        self._httpd.server_close()

    def __enter__(self) -> "LocalHTTPServer":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.port}{path}"

    def gets(self, path: str) -> List[Request]:
        with self._lock:
            return [r for r in self.requests if r.path == path]

    # -- serving
    def _record(self, path: str, range_header: Optional[str], status: int) -> None:
        with self._lock:
            self.requests.append(Request(path, range_header, status))

    def _serve(self, handler: http.server.BaseHTTPRequestHandler) -> None:
        path = handler.path.split("?")[0]
        range_header = handler.headers.get("Range")
        route = self.routes.get(path)
        if route is None or route.status != 200:
            status = 404 if route is None else route.status
            self._record(path, range_header, status)
            handler.send_response(status)
            handler.send_header("Content-Length", "0")
            handler.end_headers()
            return
        if route.redirect_to is not None:
            self._record(path, range_header, 302)
            handler.send_response(302)
            handler.send_header("Location", route.redirect_to)
            handler.send_header("Content-Length", "0")
            handler.end_headers()
            return
        body, start = route.body, 0
        match = _RANGE.match(range_header or "")
        if route.honour_range and match:
            start = int(match.group(1))
            if start >= len(body):
                self._record(path, range_header, 416)
                handler.send_response(416)
                handler.send_header("Content-Range", f"bytes */{len(body)}")
                handler.send_header("Content-Length", "0")
                handler.end_headers()
                return
            status = 206
        else:
            status = 200
        payload = body[start:]
        self._record(path, range_header, status)
        handler.send_response(status)
        handler.send_header("Content-Type", "application/octet-stream")
        announced = len(payload) if route.content_length is None else route.content_length - start
        handler.send_header("Content-Length", str(announced))
        if status == 206:
            handler.send_header("Content-Range", f"bytes {start}-{len(body) - 1}/{len(body)}")
        handler.send_header("Accept-Ranges", "bytes")
        handler.end_headers()
        limit = len(payload)
        with self._lock:
            if route.cut_after is not None and route.cuts > 0:
                route.cuts -= 1
                limit = min(limit, route.cut_after)
        sent = 0
        try:
            while sent < limit:
                piece = payload[sent: min(limit, sent + 16 * 1024)]
                handler.wfile.write(piece)
                sent += len(piece)
                if route.chunk_delay:
                    handler.wfile.flush()
                    time.sleep(route.chunk_delay)
            handler.wfile.flush()
        except (BrokenPipeError, ConnectionResetError):
            return
        if limit < len(payload):  # cut the connection mid-body
            handler.close_connection = True
            try:
                handler.connection.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass


def unused_loopback_url(path: str = "/gone.pth") -> str:
    """A URL on 127.0.0.1 where nothing listens (connection refused)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    return f"http://127.0.0.1:{port}{path}"
