"""The server client (protosam.serving.client) against small local HTTP servers on 127.0.0.1:
it never follows a redirect with the token, and refuses plain http:// to another machine
unless the user allowed an unencrypted connection."""
from __future__ import annotations

import http.server
import logging
import threading

import pytest

from protosam.errors import InputError
from protosam.serving import protocol
from protosam.serving import client
from protosam.serving.client import ServerConnection, forwarding_request, server_health

TOKEN = "t" * 24


class _Recorder(http.server.BaseHTTPRequestHandler):
    """Redirects every request to ``target`` (when set), else records its Authorization header."""

    target = None
    seen: list = []

    def _answer(self):
        if self.target is not None:
            self.send_response(302)
            self.send_header("Location", self.target + self.path)
            self.send_header("Content-Length", "0")
            self.end_headers()
            return
        type(self).seen.append(self.headers.get("Authorization"))
        self.send_response(200)
        self.send_header("Content-Length", "2")
        self.end_headers()
        self.wfile.write(b"{}")

    do_GET = do_POST = _answer

    def log_message(self, *args):
        pass


def _serve(handler):
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server


@pytest.fixture
def two_origins():
    """An 'other origin' that records Authorization headers, and a 'server' that redirects there."""
    other_handler = type("Other", (_Recorder,), {"target": None, "seen": []})
    other = _serve(other_handler)
    redirecting = _serve(type("Redirecting", (_Recorder,), {"target": f"http://127.0.0.2:{other.server_port}"}))
    # 127.0.0.2 is another origin than 127.0.0.1 (and still this machine); bind "other" there too
    other_alias = http.server.ThreadingHTTPServer(("127.0.0.2", other.server_port), other_handler)
    threading.Thread(target=other_alias.serve_forever, daemon=True).start()
    yield redirecting, other_handler
    for server in (redirecting, other, other_alias):
        server.shutdown()
        server.server_close()


def test_a_redirect_is_never_followed_with_the_token(two_origins):
    redirecting, other = two_origins
    connection = ServerConnection(f"http://127.0.0.1:{redirecting.server_port}", TOKEN)
    for method, body in (("GET", None), ("POST", b"x")):
        with pytest.raises(InputError, match="redirect .*HTTP 302.* to http://127.0.0.2:.*does not follow redirects"):
            connection.request(method, "/v1/jobs/abc", body)
    with pytest.raises(InputError, match="redirect"):
        server_health(f"http://127.0.0.1:{redirecting.server_port}", TOKEN)
    assert other.seen == []  # the other origin never got a request, let alone the token


def test_plain_http_to_another_machine_needs_an_explicit_choice(caplog):
    for url in ("http://192.0.2.1:8765", "http://gpu-host.example:8765", "http://[2001:db8::1]:8765"):
        with pytest.raises(InputError, match="Refusing plain http:// .*allow_unencrypted"):
            ServerConnection(url, TOKEN)
        with pytest.raises(InputError, match="Refusing plain http://"):
            forwarding_request(protocol.JobSubmit(id="j", operation="segment_volume", kwargs={}, engine={}), url, TOKEN)
    with caplog.at_level(logging.WARNING, logger="protosam.serving.client"):
        connection = ServerConnection("http://192.0.2.1:8765", TOKEN, allow_unencrypted=True)
    assert connection.unencrypted and "Unencrypted connection" in caplog.text and TOKEN not in caplog.text
    job = forwarding_request(protocol.JobSubmit(id="j", operation="segment_volume", kwargs={}, engine={}),
                             "http://192.0.2.1:8765", TOKEN, allow_unencrypted=True)
    assert job.kwargs["allow_unencrypted"] is True
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="protosam.serving.client"):
        for url in ("https://192.0.2.1:8765", "http://127.0.0.1:8765", "http://127.0.0.9:1", "http://localhost:8765",
                    "http://[::1]:8765"):
            assert not ServerConnection(url, TOKEN).unencrypted
    assert caplog.text == ""
    assert client.is_loopback_host("127.3.2.1") and not client.is_loopback_host("localhost.example")
    assert not client.is_loopback_host("10.0.0.1")
