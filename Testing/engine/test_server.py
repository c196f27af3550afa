"""ProtoSAM server (protosam serve): a real server process on 127.0.0.1 with tiny models, used
over HTTP (httpx, raw sockets) and through the worker's forwarding client (server_client).

Equality with a local run holds by construction: the server runs the same job code
(worker_process.run_job) with the same torch build on the same CPU, and both sides use one torch
thread (the server with --threads 1, this process with torch.set_num_threads(1)), so every
reduction happens in the same order.
"""
from __future__ import annotations

import os
import socket
import stat
import threading
import time

import httpx
import numpy as np
import pytest

from protosam import cli
from protosam.cli import serve as serve_cli
from protosam.serving import protocol, scheduler, tokens
from protosam.errors import CancelledError, InputError
from protosam.serving.client import forward_job, forwarding_request, server_health
from protosam.testing import start_server

from engine_helpers import bearer as headers, box_volume, segment_volume_request


def make_request(models, slices=6, size=40, seed=0, cache_bytes=0):
    return segment_volume_request(models, *box_volume(slices, size, seed), cache_bytes=cache_bytes)


@pytest.fixture(scope="module")
def live(tiny_models, tmp_path_factory):
    """One server for the module: users alice and bob, 4 MiB request limit."""
    process = start_server(tiny_models, tmp_path_factory.mktemp("server"),
                           extra_args=["--max-request-mb", "4", "--max-jobs-per-user", "3"])
    yield process
    process.stop()


def submit(live, request, user="alice"):
    response = httpx.post(live.url + "/v1/jobs", content=protocol.encode(request), headers=headers(live, user))
    assert response.status_code == 202, response.text
    return response.json()["id"]


def wait_reply(live, job_id, user="alice", timeout=300):
    deadline = time.monotonic() + timeout
    done = -1
    while time.monotonic() < deadline:
        response = httpx.get(f"{live.url}/v1/jobs/{job_id}", params={"done": done, "wait": 1},
                             headers=headers(live, user), timeout=40)
        assert response.status_code == 200, response.text
        message = protocol.decode(response.content)
        if not isinstance(message, protocol.JobProgress):
            return message
        done = message.done
    raise AssertionError("the job did not finish")


def run_forwarded(live, request, user="alice", cancel=None, on_progress=None):
    progress = []

    def record(done, total):
        progress.append((done, total))
        if on_progress is not None:
            on_progress(done, total)

    value = forward_job(forwarding_request(request, live.url, live.tokens[user]), record,
                        cancel or threading.Event())
    return value, progress


@pytest.fixture(scope="module")
def local_result(tiny_models):
    """The same job run in this process with the worker's code and one torch thread."""
    import torch

    from protosam.serving.worker_process import Engines, run_job

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return run_job(Engines(), make_request(tiny_models), lambda done, total: None, threading.Event())
    finally:
        torch.set_num_threads(threads)


def assert_same_result(value, expected):
    assert set(value["masks"]) == set(expected["masks"]) == {"1"}
    assert expected["masks"]["1"].any() and not expected["masks"]["1"].all()  # not a trivial mask
    np.testing.assert_array_equal(value["masks"]["1"], expected["masks"]["1"])
    assert value["support_slices"] == expected["support_slices"]
    assert value["processed_slices"] == expected["processed_slices"]
    # The confidence travels as arrays (NaN: no score) and numbers, equal to the local run's.
    np.testing.assert_array_equal(value["slice_confidence"]["1"], expected["slice_confidence"]["1"])
    assert np.isfinite(expected["slice_confidence"]["1"]).any()
    assert value["structure_confidence"] == expected["structure_confidence"]
    assert value["volume_confidence"] == expected["volume_confidence"] is not None


def test_a_job_over_http_gives_exactly_the_local_label_map(live, tiny_models, local_result):
    value, progress = run_forwarded(live, make_request(tiny_models))
    assert_same_result(value, local_result)
    dones = [done for done, _ in progress]
    assert dones == sorted(dones) and progress[-1][0] == progress[-1][1] > 0


@pytest.mark.parametrize("method,path", [("GET", "/v1/jobs/abc"), ("POST", "/v1/jobs"), ("POST", "/v1/requests"),
                                         ("GET", "/openapi.json"), ("GET", "/docs"), ("GET", "/no-such-path"),
                                         ("DELETE", "/v1/jobs/abc"), ("POST", "/v1/jobs/abc/cancel")])
@pytest.mark.parametrize("authorization", [None, "Bearer wrong-token-0123456789", "Basic YWxpY2U6eA==", "Bearer"])
def test_no_or_wrong_token_is_401_and_nothing_runs(live, tiny_models, method, path, authorization):
    before = live.log().count("queued")
    body = protocol.encode(make_request(tiny_models, slices=2)) if method == "POST" else None
    response = httpx.request(method, live.url + path, content=body,
                             headers={"Authorization": authorization} if authorization else {})
    assert response.status_code == 401
    assert response.json()["error_type"] == "AuthenticationError" and "Bearer" in response.json()["message"]
    assert response.headers["WWW-Authenticate"] == "Bearer"
    assert live.log().count("queued") == before
    assert httpx.get(live.url + "/health").json()["status"] == "ok"  # the one path without a token


def test_openapi_schema_only_for_authenticated_callers_and_no_public_docs(live):
    schema = httpx.get(live.url + "/openapi.json", headers=headers(live)).json()
    assert "/v1/jobs" in schema["paths"] and "/v1/jobs/{job_id}" in schema["paths"]
    assert httpx.get(live.url + "/docs", headers=headers(live)).status_code == 404
    assert httpx.get(live.url + "/redoc", headers=headers(live)).status_code == 404


def test_another_user_cannot_see_or_cancel_a_job(live, tiny_models):
    job_id = submit(live, make_request(tiny_models, slices=3, seed=3), "alice")
    assert len(job_id) >= 32  # secrets.token_urlsafe(24): not guessable
    unknown = httpx.get(f"{live.url}/v1/jobs/{'x' * 32}", headers=headers(live, "bob"))
    for response in (httpx.get(f"{live.url}/v1/jobs/{job_id}", headers=headers(live, "bob")),
                     httpx.post(f"{live.url}/v1/jobs/{job_id}/cancel", headers=headers(live, "bob")),
                     httpx.delete(f"{live.url}/v1/jobs/{job_id}", headers=headers(live, "bob"))):
        assert response.status_code == 404 and response.json() == unknown.json()  # same answer as a made-up id
    reply = wait_reply(live, job_id, "alice")
    assert isinstance(reply, protocol.JobResult) and reply.value["masks"]["1"].shape == (3, 40, 40)
    assert httpx.delete(f"{live.url}/v1/jobs/{job_id}", headers=headers(live, "alice")).status_code == 204
    assert httpx.get(f"{live.url}/v1/jobs/{job_id}", headers=headers(live, "alice")).status_code == 404


def raw_http(live, head: bytes, body_chunks=()) -> bytes:
    with socket.create_connection(("127.0.0.1", int(live.url.rsplit(":", 1)[1])), timeout=60) as sock:
        sock.sendall(head)
        try:
            for chunk in body_chunks:
                sock.sendall(chunk)
        except OSError:  # the server may answer and close before the body is sent
            pass
        received = b""
        while b"\r\n\r\n" not in received or len(received) < 200:
            data = sock.recv(65536)
            if not data:
                break
            received += data
        return received


def test_oversized_requests_get_413_and_the_server_keeps_serving(live):
    token = live.tokens["alice"].encode()
    # Declared too big: refused from the Content-Length alone, before any body is read.
    answer = raw_http(live, b"POST /v1/jobs HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer " + token +
                      b"\r\nContent-Length: 10000000000\r\n\r\n")
    assert answer.startswith(b"HTTP/1.1 413") and b"--max-request-mb" in answer
    # No Content-Length (chunked): refused while streaming, once 4 MiB are exceeded.
    chunk = b"\0" * (256 * 1024)
    chunks = [b"%x\r\n" % len(chunk) + chunk + b"\r\n"] * 17 + [b"0\r\n\r\n"]
    answer = raw_http(live, b"POST /v1/jobs HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer " + token +
                      b"\r\nTransfer-Encoding: chunked\r\n\r\n", chunks)
    assert answer.startswith(b"HTTP/1.1 413") and b"InputError" in answer
    assert httpx.get(live.url + "/health").status_code == 200
    assert isinstance(server_health(live.url, live.tokens["alice"]), dict)


def stalled_upload(live, path: bytes, user: str, length: int) -> socket.socket:
    """A request whose headers announce ``length`` body bytes, of which only 10 are sent."""
    sock = socket.create_connection(("127.0.0.1", int(live.url.rsplit(":", 1)[1])), timeout=5)
    sock.sendall(b"POST " + path + b" HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer " + live.tokens[user].encode() +
                 b"\r\nContent-Length: %d\r\n\r\n" % length + b"\0" * 10)
    return sock


def answer_now(sock: socket.socket) -> bytes:
    """What the server answers within 5 s while the body is still incomplete (b"" if nothing)."""
    received = b""
    try:
        while True:
            data = sock.recv(65536)
            if not data:
                return received
            received += data
            sock.settimeout(1.0)  # the rest of an answer that has started
    except socket.timeout:
        return received


def test_uploads_are_admitted_from_the_token_and_content_length_before_the_body_is_read(live, tiny_models):
    # bob's job slots (--max-jobs-per-user 3): submissions still uploading count; the next is refused at once.
    stalled = []
    try:
        for _ in range(4):
            sock = stalled_upload(live, b"/v1/jobs", "bob", 200_000)
            stalled.append(sock)
            sock.settimeout(1.0)
            answer = answer_now(sock)
            if answer:
                break
        assert answer.startswith(b"HTTP/1.1 429") and b"still uploading" in answer, answer[:300]
        # bytes in flight: two 3 MiB bodies of alice exceed her 4 MiB (--max-request-mb) at once
        first = stalled_upload(live, b"/v1/requests", "alice", 3 * 1024 * 1024)
        stalled.append(first)
        second = stalled_upload(live, b"/v1/requests", "alice", 3 * 1024 * 1024)
        stalled.append(second)
        answer = answer_now(second)
        assert answer.startswith(b"HTTP/1.1 413") and b"uploads in progress" in answer, answer[:300]
        assert isinstance(server_health(live.url, live.tokens["bob"]), dict)  # small requests still pass
    finally:
        for sock in stalled:
            sock.close()
    # Closed uploads give their slots and bytes back.
    deadline = time.monotonic() + 10
    while True:
        response = httpx.post(live.url + "/v1/jobs", content=protocol.encode(make_request(tiny_models, slices=2)),
                              headers=headers(live, "bob"))
        if response.status_code == 202 or time.monotonic() > deadline:
            break
        time.sleep(0.2)
    assert response.status_code == 202, response.text
    assert isinstance(wait_reply(live, response.json()["id"], user="bob"), protocol.JobResult)
    httpx.delete(f"{live.url}/v1/jobs/{response.json()['id']}", headers=headers(live, "bob"))


def test_malformed_requests_get_clear_json_errors_and_the_server_keeps_serving(live, tiny_models, tmp_path):
    auth = headers(live)

    def post(path, body):
        return httpx.post(live.url + path, content=body, headers=auth)

    cases = [
        (post("/v1/jobs", b"not a message"), 400, "ProtocolError", "truncated message"),
        (post("/v1/jobs", b"GET / HTTP/1.1 and more than 24 bytes"), 400, "ProtocolError", "not a ProtoSAM message"),
        (post("/v1/jobs", protocol.encode(protocol.HealthRequest(id="h"))), 400, "ProtocolError", "job_submit"),
        (post("/v1/requests", protocol.encode(make_request(tiny_models, slices=2))), 400, "ProtocolError",
         "not a request"),
    ]
    for operation in ("download_weights", "forward_to_server", "no_such_operation"):
        request = make_request(tiny_models, slices=2)
        request.operation = operation
        cases.append((post("/v1/jobs", protocol.encode(request)), 400, "NotSupportedError", "segment_volume"))
    wrong_models = make_request(tiny_models, slices=2)
    wrong_models.engine["models"]["sam"] = "vit_h"
    cases.append((post("/v1/jobs", protocol.encode(wrong_models)), 400, "InputError", "This ProtoSAM server runs"))
    # Arrays as file references are refused: a server never reads files a request names.
    (tmp_path / "files").mkdir()
    with_files = protocol.encode(make_request(tiny_models, slices=2), file_dir=tmp_path / "files", file_threshold=1)
    cases.append((post("/v1/jobs", with_files), 400, "ProtocolError", "refers to a file"))
    cases.append((httpx.get(live.url + "/v1/jobs/abc", params={"wait": "soon"}, headers=auth), 422, "InputError",
                  "wait"))
    # Hostile headers: refused with 400 before anything is allocated (these were 500s).
    def raw(header: bytes, blobs: bytes = b"") -> bytes:
        return protocol._PREFIX.pack(protocol.MAGIC, protocol.PROTOCOL_VERSION, len(header), len(blobs)) + header + blobs

    result = b'{"type": "job_result", "fields": {"id": "a", "value": %s}, "arrays": %s}'
    hostile = [
        (raw(b'{"type": "job_submit", "fields": {"id": "a", "operation": "segment_volume", "kwargs": {"x": 1e400}}}'),
         "out of range"),
        (raw(result % (b"[" * 100000 + b"]" * 100000, b"[]")), "deeper than 64"),
        (raw(result % (b'{"$array": 0}', b'[{"dtype": "<f4", "shape": [4294967296, 4294967296], "offset": 0, '
                                          b'"nbytes": 0}]')), "needs"),
        (raw(result % (b"null", b"[" + b",".join([b'{"dtype":"|u1","shape":[0],"offset":0,"nbytes":0}'] * 5000)
                       + b"]")), "more than 4096"),
        (raw(result % (b'"' + b"x" * (1024 * 1024) + b'"', b"[]")), "exceeds 1048576"),
    ]
    for body, text in hostile:
        cases.append((post("/v1/requests", body), 400, "ProtocolError", text))
    for response, status, error_type, text in cases:
        assert response.status_code == status, response.text
        assert response.json()["error_type"] == error_type and text in response.json()["message"], response.text
    # A job the engine rejects fails alone, with the engine's error type; the server goes on.
    bad = make_request(tiny_models, slices=2)
    bad.kwargs["axis"] = 7
    job_id = submit(live, bad)
    reply = wait_reply(live, job_id)
    assert isinstance(reply, protocol.ErrorReply) and reply.error_type in ("InputError", "ValueError"), reply
    httpx.delete(f"{live.url}/v1/jobs/{job_id}", headers=auth)
    assert httpx.get(live.url + "/health").status_code == 200
    value, _ = run_forwarded(live, make_request(tiny_models, slices=2, seed=5))
    assert value["masks"]["1"].shape == (2, 40, 40)


def test_cancel_mid_job_stops_within_a_slice(live, tiny_models):
    cancel = threading.Event()
    with pytest.raises(CancelledError) as caught:
        run_forwarded(live, make_request(tiny_models, slices=24, seed=7), cancel=cancel,
                      on_progress=lambda done, total: cancel.set() if done >= 1 else None)
    details = caught.value.details
    assert details["done_at_stop"] <= details["done_at_cancel"] + 1 < 24
    assert server_health(live.url, live.tokens["alice"])["queued_jobs"] == 0


def test_two_clients_at_once_both_get_the_local_result(live, tiny_models, local_result):
    values, errors = {}, []

    def client(user):
        try:
            values[user] = run_forwarded(live, make_request(tiny_models), user)[0]
        except Exception as error:  # reported below
            errors.append(error)

    threads = [threading.Thread(target=client, args=(user,)) for user in ("alice", "bob")]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(600)
    assert not errors
    for user in ("alice", "bob"):
        assert_same_result(values[user], local_result)


def test_caches_are_per_user(live, tiny_models):
    release = protocol.encode(protocol.ReleaseCaches(id="r"))
    for user in ("alice", "bob"):
        httpx.post(live.url + "/v1/requests", content=release, headers=headers(live, user))
    run_forwarded(live, make_request(tiny_models, slices=2, cache_bytes=64 * 1024 * 1024), "alice")
    assert server_health(live.url, live.tokens["alice"])["cache_bytes"] > 0
    assert server_health(live.url, live.tokens["bob"])["cache_bytes"] == 0  # alice's encodings are not bob's
    httpx.post(live.url + "/v1/requests", content=release, headers=headers(live, "bob"))
    assert server_health(live.url, live.tokens["alice"])["cache_bytes"] > 0  # bob cannot drop alice's cache


def test_user_engines_share_models_but_not_caches(tiny_models):
    from protosam.cache import EmbeddingCache
    from protosam.serving.worker_process import Engines

    shared = Engines()
    spec = make_request(tiny_models).engine
    alice = scheduler._UserEngines(shared, EmbeddingCache(1 << 20)).get(spec)
    bob = scheduler._UserEngines(shared, EmbeddingCache(1 << 20)).get(spec)
    assert alice.encoder is bob.encoder and alice.refiner is bob.refiner  # models loaded once
    assert alice.cache is not bob.cache and shared.get(spec).cache.max_bytes == 0


def test_logs_hold_no_tokens_and_no_image_data(live, tiny_models):
    failing = make_request(tiny_models, slices=2)
    failing.kwargs["axis"] = 7  # a failed job logs too
    for request in (make_request(tiny_models, slices=2, seed=11), failing):
        try:
            run_forwarded(live, request, "bob")
        except (InputError, ValueError):
            pass
    log = live.log()
    assert "queued" in log and "finished" in log  # the log is the server's, with its job lines
    for token in live.tokens.values():
        assert token not in log
    assert "array(" not in log and "Bearer" not in log


def test_the_client_reports_a_server_killed_mid_job(tiny_models, tmp_path):
    killable = start_server(tiny_models, tmp_path / "killable", users=("alice",))
    try:
        with pytest.raises(protocol.WorkerCrashedError, match="connection to the ProtoSAM server was lost"):
            run_forwarded(killable, make_request(tiny_models, slices=24, seed=9),
                          on_progress=lambda done, total: killable.kill() if done >= 1 else None)
    finally:
        killable.stop()


# --------------------------------------------------------------------------- options (no server)
def test_non_loopback_addresses_need_tls_or_insecure(capsys):
    assert cli.main(["serve", "--host", "0.0.0.0", "--token", "t" * 20]) == 1
    assert "Refusing to serve plain HTTP" in capsys.readouterr().err
    assert cli.main(["serve", "--host", "192.0.2.1", "--token", "t" * 20, "--ssl-certfile", "x.pem"]) == 1
    assert "both --ssl-certfile and --ssl-keyfile" in capsys.readouterr().err
    assert cli.main(["serve", "--preset", "paper", "--token", "t" * 20]) == 1
    assert "each request brings its preset" in capsys.readouterr().err
    assert serve_cli.is_loopback("127.0.0.1") and serve_cli.is_loopback("::1") and not serve_cli.is_loopback("0.0.0.0")


def test_generated_token_is_private_never_printed_and_reused(tmp_path):
    printed = []
    first = tokens.load_tokens(None, None, str(tmp_path), announce=printed.append)
    (token,) = first
    path = tmp_path / tokens.TOKEN_FILE_NAME
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600 and path.read_text().strip() == token
    assert token not in printed[0] and str(path) in printed[0]  # journals keep stdout: the path, not the token
    assert tokens.load_tokens(None, None, str(tmp_path), announce=printed.append) == first
    assert token not in printed[1] and str(path) in printed[1]


@pytest.mark.skipif(os.name != "posix", reason="file modes and links")
def test_a_reused_token_file_must_be_a_private_plain_file(tmp_path):
    (token,) = tokens.load_tokens(None, None, str(tmp_path), announce=lambda text: None)
    path = tmp_path / tokens.TOKEN_FILE_NAME
    path.chmod(0o644)
    with pytest.raises(InputError, match="chmod 600"):
        tokens.load_tokens(None, None, str(tmp_path), announce=lambda text: None)
    path.chmod(0o600)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (elsewhere / "secret").write_text(token + "\n")
    (elsewhere / "secret").chmod(0o600)
    path.unlink()
    path.symlink_to(elsewhere / "secret")
    with pytest.raises(InputError, match="symbolic link"):
        tokens.load_tokens(None, None, str(tmp_path), announce=lambda text: None)


@pytest.mark.skipif(os.name != "posix", reason="file modes")
def test_a_tokens_file_others_can_read_or_write_is_refused(tmp_path):
    path = tmp_path / "tokens"
    path.write_text("alice:" + "a" * 20 + "\n")
    for mode in (0o666, 0o644, 0o640, 0o620):
        path.chmod(mode)
        with pytest.raises(InputError, match=f"mode {mode:04o}"):
            tokens.load_tokens(None, str(path))
    path.chmod(0o600)
    assert tokens.load_tokens(None, str(path)) == {"a" * 20: "alice"}


def test_the_generated_token_stays_in_protosam_home_whatever_weights_home_says(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("PROTOSAM_HOME", str(tmp_path / "home"))
    args = serve_cli.build_parser().parse_args(["--weights-home", str(tmp_path / "weights")])
    (token,) = serve_cli.server_tokens(args)
    assert (tmp_path / "home" / tokens.TOKEN_FILE_NAME).read_text().strip() == token
    assert not (tmp_path / "weights" / tokens.TOKEN_FILE_NAME).exists()
    assert token not in capsys.readouterr().out


def test_tokens_file_format_and_errors(tmp_path):
    good = tmp_path / "tokens"
    good.write_text("# lab users\nalice:" + "a" * 20 + "   # Alice, radiology\n\nbob: " + "b" * 20 + "#no space\n")
    good.chmod(0o600)
    assert tokens.load_tokens(None, str(good)) == {"a" * 20: "alice", "b" * 20: "bob"}
    for text, match in (("alice\n", "name:token"), ("alice:short\n", "shorter than"),
                        ("alice:" + "a" * 20 + " more\n", "contains a space"),
                        ("alice:" + "a" * 20 + "\nalice:" + "c" * 20 + "\n", "twice"), ("# nobody\n", "names no user")):
        good.write_text(text)
        with pytest.raises(InputError, match=match):
            tokens.load_tokens(None, str(good))
    with pytest.raises(InputError, match="at least"):
        tokens.load_tokens("short", None)
    table = tokens.TokenTable({"a" * 20: "alice"})
    assert table.user_for(b"Bearer " + b"a" * 20) == "alice" and table.user_for(b"bearer " + b"a" * 20) == "alice"
    assert table.user_for(b"Bearer " + b"a" * 19) is None and table.user_for(None) is None
