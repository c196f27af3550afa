"""Bounded denial-of-service test of `protosam serve` (127.0.0.1 only; stops by itself in well
under a minute): a few hundred idle, slow-header and slow-body connections from many loopback
addresses (all of 127.0.0.0/8 is this machine on Linux), and meanwhile /health and a small job
are answered; the idle and slow connections are closed by the server's limits (here 2 s
instead of the default 10 s, to keep the test short)."""
from __future__ import annotations

import socket
import sys
import threading
import time

import httpx
import pytest

from protosam.serving.client import forward_job, forwarding_request
from protosam.testing import start_server

from engine_helpers import box_volume, segment_volume_request

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="binds 127.0.0.x source addresses")

TIMEOUT_S = 2.0
IDLE_ADDRESSES = 8        # 127.0.1.1 .. 127.0.1.8, 30 idle connections each
SLOW_HEADER = 40          # from 127.0.2.1: one header byte every 0.5 s
SLOW_BODY = 20            # from 127.0.3.1: authenticated, one body byte every 0.5 s
CAP_PROBE = 40            # from 127.0.4.1: more than --max-connections-per-address 32


@pytest.fixture(scope="module")
def live(tiny_models, tmp_path_factory):
    process = start_server(tiny_models, tmp_path_factory.mktemp("server-dos"), extra_args=[
        "--header-timeout", str(TIMEOUT_S), "--body-grace", str(TIMEOUT_S), "--max-connections-per-address", "32"])
    yield process
    process.stop()


def connect(live, source: str) -> socket.socket:
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.bind((source, 0))
    sock.settimeout(5)
    sock.connect(("127.0.0.1", int(live.url.rsplit(":", 1)[1])))
    return sock


def closed_by_server(sock: socket.socket, wait: float) -> bool:
    sock.settimeout(wait)
    try:
        while True:
            data = sock.recv(4096)
            if not data:
                return True
    except socket.timeout:
        return False
    except OSError:  # reset
        return True


def test_idle_slow_and_excess_connections_neither_stall_health_nor_jobs(live, tiny_models):
    stop = threading.Event()
    sockets = {"idle": [], "slow_header": [], "slow_body": [], "cap": []}
    try:
        for a in range(1, IDLE_ADDRESSES + 1):
            sockets["idle"] += [connect(live, f"127.0.1.{a}") for _ in range(30)]
        sockets["slow_header"] = [connect(live, "127.0.2.1") for _ in range(SLOW_HEADER)]
        sockets["slow_body"] = [connect(live, "127.0.3.1") for _ in range(SLOW_BODY)]
        for sock in sockets["slow_body"]:
            sock.sendall(b"POST /v1/requests HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer " +
                         live.tokens["alice"].encode() + b"\r\nContent-Length: 1000000\r\n\r\n")
        sockets["cap"] = [connect(live, "127.0.4.1") for _ in range(CAP_PROBE)]
        opened = sum(len(group) for group in sockets.values())
        # The per-address cap: beyond 32, connections from 127.0.4.1 are closed at once.
        time.sleep(0.2)
        over_cap = sum(closed_by_server(sock, 0.01) for sock in sockets["cap"])
        assert over_cap == CAP_PROBE - 32, over_cap

        def trickle():  # one byte per connection every 0.5 s, until stopped or closed
            head = b"GET /health HTTP/1.1\r\nHost: x\r\n"
            step = 0
            while not stop.wait(0.5):
                for sock in sockets["slow_header"]:
                    try:
                        sock.send(head[step % len(head):step % len(head) + 1])
                    except OSError:
                        pass
                for sock in sockets["slow_body"]:
                    try:
                        sock.send(b"\0")
                    except OSError:
                        pass
                step += 1

        threading.Thread(target=trickle, daemon=True).start()
        # Meanwhile: /health answers at once, and a small job of alice runs to the end.
        started = time.monotonic()
        for _ in range(5):
            response = httpx.get(live.url + "/health", timeout=5)
            assert response.status_code == 200
        health_s = (time.monotonic() - started) / 5
        started = time.monotonic()
        request = segment_volume_request(tiny_models, *box_volume(3, 40, 1))
        value = forward_job(forwarding_request(request, live.url, live.tokens["alice"]), lambda d, t: None,
                            threading.Event())
        job_s = time.monotonic() - started
        assert value["masks"]["1"].shape == (3, 40, 40)
        # The idle and slow-header connections are closed after the header timeout, slow bodies after the grace.
        deadline = time.monotonic() + TIMEOUT_S + 4
        for name in ("idle", "slow_header", "slow_body"):
            still_open = [sock for sock in sockets[name] if not closed_by_server(sock, max(0.01, deadline - time.monotonic()))]
            assert not still_open, f"{len(still_open)} {name} connections still open"
        print(f"\n{opened} connections opened; /health {health_s * 1000:.0f} ms, 3-slice job {job_s:.1f} s during "
              f"them; {over_cap} refused over the per-address cap; idle/slow closed within {TIMEOUT_S + 4:.0f} s")
        assert httpx.get(live.url + "/health", timeout=5).status_code == 200
    finally:
        stop.set()
        for group in sockets.values():
            for sock in group:
                sock.close()
