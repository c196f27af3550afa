"""The worker protocol (protosam.serving.protocol) and the worker process (protosam.serving.worker_process):
encode/decode round trips with arrays and geometry, clear errors for malformed messages, and a
real `python -m protosam worker` process answering over a socket."""
from __future__ import annotations

import dataclasses
import json
import os
import socket
import struct
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from protosam.serving import protocol
from protosam.errors import CancelledError, InputError, ProtoSAMError
from protosam.serving.protocol import ProtocolError
from protosam.serving.worker_process import _Channel

ENGINE_ROOT = Path(__file__).resolve().parents[2] / "ProtoSAMLib"


def submit(**kwargs) -> protocol.JobSubmit:
    return protocol.JobSubmit(id="job-1", operation="segment_volume", kwargs=kwargs,
                              engine={"models": {"dinov2": "dinov2_tiny14"}, "device": "cpu"}, name="test")


def arrays_equal(a, b) -> bool:
    return a.dtype == b.dtype and a.shape == b.shape and np.array_equal(a, b)


# ----------------------------------------------------------------------------- round trips
@pytest.mark.parametrize("use_files", [False, True], ids=["inline", "files"])
def test_job_submit_round_trip_with_arrays_geometry_and_nesting(tmp_path, use_files):
    rng = np.random.default_rng(1)
    volume = rng.normal(size=(7, 20, 24)).astype(np.float32)
    masks = {"liver": (rng.random((7, 20, 24)) > 0.5).astype(np.uint8), "spleen": np.zeros((7, 20, 24), np.uint8)}
    ijk_to_ras = np.array([[-0.7, 0, 0, 10.0], [0, -0.9, 0, -5.0], [0, 0, 3.0, 2.5], [0, 0, 0, 1]])
    message = submit(query_volume=volume, support_volume=None, support_masks=masks, axis=np.int64(2),
                     support_slices={"liver": [3, 4]}, slice_range=(1, 5), modality="auto", auto_extent=None,
                     flags=np.array([True, False]), big=np.arange(40000, dtype=np.int64),
                     image=protocol.Image(volume[:2], ijk_to_ras), score=0.25)
    data = protocol.encode(message, file_dir=tmp_path if use_files else None, file_threshold=1024)
    files = protocol.array_files(data)
    assert (len(files) > 0) == use_files and all(Path(f).parent == tmp_path for f in files)
    assert len(data) < volume.nbytes if use_files else len(data) > volume.nbytes + masks["liver"].nbytes
    decoded = protocol.decode(data, file_dir=tmp_path if use_files else None)
    assert isinstance(decoded, protocol.JobSubmit) and decoded.id == "job-1" and decoded.name == "test"
    kwargs = decoded.kwargs
    assert arrays_equal(kwargs["query_volume"], volume) and kwargs["support_volume"] is None
    assert set(kwargs["support_masks"]) == {"liver", "spleen"}
    assert all(arrays_equal(kwargs["support_masks"][k], masks[k]) for k in masks)
    assert kwargs["axis"] == 2 and type(kwargs["axis"]) is int
    assert kwargs["support_slices"] == {"liver": [3, 4]} and kwargs["slice_range"] == [1, 5]
    assert arrays_equal(kwargs["flags"], np.array([True, False])) and arrays_equal(kwargs["big"], np.arange(40000))
    assert isinstance(kwargs["image"], protocol.Image)
    assert arrays_equal(kwargs["image"].array, volume[:2]) and np.array_equal(kwargs["image"].ijk_to_physical, ijk_to_ras)
    assert kwargs["score"] == 0.25 and kwargs["auto_extent"] is None
    assert decoded.engine == message.engine
    # Decoded arrays own their memory: the files can go at once (Windows cannot delete mapped files).
    for path in files:
        os.remove(path)
    assert arrays_equal(kwargs["query_volume"], volume)


def example(cls):
    values = {"id": "x1", "token": "t", "pid": 7, "operation": "segment_volume", "kwargs": {"a": 1}, "done": 2,
              "total": 5, "value": {"masks": {"1": np.ones((2, 2), np.uint8)}, "seconds": 1.5}, "error_type": "InputError",
              "message": "bad", "rss_bytes": None, "cache_bytes": 10, "gpu_bytes": 0, "engines": [], "running_job": None,
              "queued_jobs": 0, "uptime_s": 3.0, "models": {"dinov2": "dinov2_vitb14"}, "weights": [], "loaded": [],
              "session_id": "s1", "engine": {"models": {}}, "volume": protocol.Image(np.zeros((3, 4, 5), np.int16), np.eye(4)),
              "structures": {"liver": np.zeros((3, 4, 5), np.uint8)}, "structure": "liver", "axis": 0, "slice_index": 2,
              "mask": np.ones((4, 5), np.uint8), "points": [[1.5, 2.0]], "labels": [1], "level": 20, "name": "protosam",
              "devices": [{"name": "cpu", "type": "cpu", "label": "CPU"}], "auto": "cpu",
              "box": [1.0, 2.0, 3.5, 4.0], "positive": False, "radius": 1.5, "negatives": np.zeros((3, 4, 5), np.uint8)}
    if cls is protocol.ReleaseCaches:
        values["models"] = True
    fields = {f.name: values[f.name] for f in dataclasses.fields(cls) if f.name in values}
    return cls(**fields)


@pytest.mark.parametrize("cls", sorted(protocol.MESSAGE_TYPES.values(), key=lambda c: c.TYPE), ids=lambda c: c.TYPE)
def test_every_message_type_round_trips(cls):
    message = example(cls)
    decoded = protocol.decode(protocol.encode(message))
    assert type(decoded) is cls
    for field in dataclasses.fields(cls):
        original, copy = getattr(message, field.name), getattr(decoded, field.name)
        assert json.dumps(_plain(original), sort_keys=True) == json.dumps(_plain(copy), sort_keys=True), field.name


def _plain(value):
    if isinstance(value, protocol.Image):
        return {"array": _plain(value.array), "geometry": _plain(value.ijk_to_physical)}
    if isinstance(value, np.ndarray):
        return [value.dtype.str, value.tolist()]
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


def test_errors_cross_the_protocol_as_their_own_types():
    reply = protocol.reply_for_exception("j", CancelledError("stop"), details={"done_at_cancel": 2})
    error = protocol.error_from_reply(protocol.decode(protocol.encode(reply)))
    assert isinstance(error, CancelledError) and str(error) == "stop" and error.details == {"done_at_cancel": 2}
    assert isinstance(protocol.error_from_reply(protocol.reply_for_exception("j", InputError("x"))), InputError)
    assert isinstance(protocol.error_from_reply(protocol.reply_for_exception("j", KeyError("k"))), KeyError)

    class EngineSpecific(InputError):
        pass

    assert protocol.reply_for_exception("j", EngineSpecific("y")).error_type == "InputError"  # nearest known base
    unknown = protocol.error_from_reply(protocol.ErrorReply(id="j", error_type="CUDAWeirdness", message="z"))
    assert type(unknown) is ProtoSAMError and "CUDAWeirdness: z" in str(unknown)
    memory = protocol.error_from_reply(protocol.reply_for_exception("j", MemoryError()))
    assert isinstance(memory, ProtoSAMError) and "ran out of memory" in str(memory)


# ----------------------------------------------------------------------------- malformed input
def good_bytes() -> bytes:
    return protocol.encode(submit(volume=np.arange(12, dtype=np.float32).reshape(3, 4)))


def with_header(header: dict, blobs: bytes = b"") -> bytes:
    raw = json.dumps(header).encode()
    return struct.pack("<4sIQQ", b"PSAM", protocol.PROTOCOL_VERSION, len(raw), len(blobs)) + raw + blobs


@pytest.mark.parametrize("data, match", [
    (b"", "truncated"),
    (b"GET / HTTP/1.1\r\n\r\n" + b"x" * 10, "not a ProtoSAM message"),
    (struct.pack("<4sIQQ", b"PSAM", 99, 2, 0) + b"{}", "protocol version 99"),
    (struct.pack("<4sIQQ", b"PSAM", 1, 1 << 40, 0), "exceeds"),
    (good_bytes()[:-5], "announces"),
    (good_bytes() + b"extra", "announces"),
    (struct.pack("<4sIQQ", b"PSAM", 1, 5, 0) + b"{nope", "not valid JSON"),
    (with_header([1, 2]), "must be an object"),
    (with_header({"type": "rm -rf", "fields": {}}), "unknown message type"),
    (with_header({"type": "job_cancel", "fields": {}}), r"missing field\(s\) \['id'\]"),
    (with_header({"type": "job_cancel", "fields": {"id": "a", "evil": 1}}), r"unknown field\(s\) \['evil'\]"),
    (with_header({"type": "job_result", "fields": {"id": "a", "value": {"$array": 3}}, "arrays": []}), "bad array reference"),
    (with_header({"type": "job_result", "fields": {"id": "a", "value": None},
                  "arrays": [{"dtype": "|O", "shape": [1], "offset": 0, "nbytes": 8}]}, b"\0" * 8), "refused dtype"),
    (with_header({"type": "job_result", "fields": {"id": "a", "value": None},
                  "arrays": [{"dtype": "<f4", "shape": [4], "offset": 0, "nbytes": 8}]}, b"\0" * 8), "needs 16"),
    (with_header({"type": "job_result", "fields": {"id": "a", "value": None},
                  "arrays": [{"dtype": "<f4", "shape": [4], "offset": 8, "nbytes": 16}]}, b"\0" * 16), "outside"),
    (with_header({"type": "job_result", "fields": {"id": "a", "value": None},
                  "arrays": [{"dtype": "<f4", "shape": [-4], "offset": 0, "nbytes": 0}]}), "negative"),
    (with_header({"type": "job_result", "fields": {"id": "a", "value": None},
                  "arrays": [{"dtype": "<f4", "shape": [2], "file": "/etc/passwd"}]}), "does not accept"),
    (with_header({"type": "job_result", "fields": {"id": "a", "value": None},
                  "arrays": [{"dtype": "<f4", "shape": [2], "offset": 0, "nbytes": 8, "ijk_to_physical": [[1]]}]},
                 b"\0" * 8), "not 4x4"),
], ids=lambda v: v if isinstance(v, str) else None)
def test_malformed_messages_get_clear_errors(data, match):
    with pytest.raises(ProtocolError, match=match):
        protocol.decode(data)


def raw_header(text: bytes, blobs: bytes = b"") -> bytes:
    return struct.pack("<4sIQQ", b"PSAM", protocol.PROTOCOL_VERSION, len(text), len(blobs)) + text + blobs


def array_result(entry: dict, blobs: bytes = b"") -> bytes:
    return with_header({"type": "job_result", "fields": {"id": "a", "value": {"$array": 0}}, "arrays": [entry]}, blobs)


@pytest.mark.parametrize("data, match", [
    # a shape whose product overflows int64 (2**32 * 2**32 wraps to 0 bytes in numpy's product)
    (array_result({"dtype": "<f4", "shape": [2 ** 32, 2 ** 32], "offset": 0, "nbytes": 0}), "needs"),
    (array_result({"dtype": "|u1", "shape": [2 ** 62, 4], "offset": 0, "nbytes": 0}), "needs"),
    (array_result({"dtype": "|u1", "shape": [1] * 33, "offset": 0, "nbytes": 1}, b"\0"), "at most 32"),
    (array_result({"dtype": "|u1", "shape": [1.5], "offset": 0, "nbytes": 1}, b"\0"), "list of at most"),
    (array_result({"dtype": "|u1", "shape": "12", "offset": 0, "nbytes": 1}, b"\0"), "list of at most"),
    (array_result({"dtype": ["<f4"], "shape": [1], "offset": 0, "nbytes": 4}, b"\0" * 4), "no valid dtype"),
    (array_result({"dtype": "|u1", "shape": [1], "offset": "0", "nbytes": 1}, b"\0"), "offset/nbytes"),
    (array_result({"dtype": "|u1", "shape": [1], "offset": 0, "nbytes": 1,
                   "ijk_to_physical": [[1, 0, 0, 0]] * 3 + [["a", 0, 0, 1]]}, b"\0"), "non-numbers"),
    (array_result({"dtype": "|u1", "shape": [1], "offset": 0, "nbytes": 1, "ijk_to_physical": {"a": 1}}, b"\0"),
     "not 4x4"),
    # numbers JSON can write but a message may not carry
    (raw_header(b'{"type": "job_result", "fields": {"id": "a", "value": 1e400}}'), "out of range"),
    (raw_header(b'{"type": "job_result", "fields": {"id": "a", "value": -1e400}}'), "out of range"),
    (raw_header(b'{"type": "job_result", "fields": {"id": "a", "value": NaN}}'), "NaN is not a number"),
    (raw_header(b'{"type": "job_result", "fields": {"id": "a", "value": [Infinity]}}'), "Infinity is not"),
    (raw_header(b'{"type": "job_result", "fields": {"id": "a", "value": 9223372036854775808}}'), "int64"),
    (raw_header(b'{"type": "job_result", "fields": {"id": "a", "value": 1' + b"0" * 5000 + b'}}'), "out of range"),
    # nesting: deeper than the cap, and deeper than Python's recursion limit
    (raw_header(b'{"type": "job_result", "fields": {"id": "a", "value": ' + b"[" * 70 + b"]" * 70 + b"}}"),
     "deeper than 64"),
    (raw_header(b'{"type": "job_result", "fields": {"id": "a", "value": ' + b"[" * 100000 + b"]" * 100000 + b"}}"),
     "deeper than 64"),
    (with_header({"type": "job_result", "fields": {"id": "a", "value": None},
                  "arrays": [{"dtype": "|u1", "shape": [0], "offset": 0, "nbytes": 0}] * 4097}),
     "more than 4096"),
], ids=lambda v: v if isinstance(v, str) else None)
def test_hostile_messages_are_refused_before_anything_is_allocated(data, match):
    with pytest.raises(ProtocolError, match=match):
        protocol.decode(data)


def test_many_zero_size_arrays_are_refused_quickly_and_a_smaller_header_cap_applies():
    import time

    data = with_header({"type": "job_result", "fields": {"id": "a", "value": None},
                        "arrays": [{"dtype": "|u1", "shape": [0], "offset": 0, "nbytes": 0}] * 200_000})
    start = time.process_time()
    with pytest.raises(ProtocolError, match="arrays, more than"):
        protocol.decode(data)
    assert time.process_time() - start < 1.5
    with pytest.raises(ProtocolError, match="exceeds 1024"):
        protocol.decode(with_header({"type": "job_result", "fields": {"id": "a", "value": "x" * 2000}}),
                        max_header_bytes=1024)
    # the largest legitimate arrays still decode: many dimensions of size 1, a big 8-byte product
    value = np.zeros((1,) * 32, dtype=np.uint8)
    assert protocol.decode(protocol.encode(protocol.JobResult(id="a", value=value))).value.shape == (1,) * 32


def test_file_references_only_inside_the_trusted_folder(tmp_path):
    trusted, other = tmp_path / "trusted", tmp_path / "other"
    trusted.mkdir()
    other.mkdir()
    data = protocol.encode(submit(volume=np.ones((64, 64), np.float32)), file_dir=other, file_threshold=0)
    with pytest.raises(ProtocolError, match="outside the transfer folder"):
        protocol.decode(data, file_dir=trusted)
    with pytest.raises(ProtocolError, match="does not accept"):
        protocol.decode(data)
    os.remove(protocol.array_files(data)[0])
    with pytest.raises(ProtocolError, match="cannot be read"):
        protocol.decode(data, file_dir=other)


@pytest.mark.parametrize("kwargs, match", [
    ({"x": np.array([object()])}, "dtype object"),
    ({"x": float("nan")}, "not representable"),
    ({"x": {1: "a"}}, "string keys"),
    ({"x": {"$array": 0}}, "reserved"),
    ({"x": object()}, "cannot carry"),
    ({"x": protocol.Image(np.zeros(2), np.eye(3))}, "4x4"),
])
def test_unencodable_values_are_refused(kwargs, match):
    with pytest.raises(ProtocolError, match=match):
        protocol.encode(submit(**kwargs))


# ----------------------------------------------------------------------------- gesture messages
def gesture_header(type_: str, **fields) -> bytes:
    target = {"id": "g", "session_id": "s", "structure": "organ", "axis": 0, "slice_index": 2}
    return with_header({"type": type_, "fields": dict(target, **fields), "arrays": []})


def test_gesture_messages_round_trip_as_plain_floats():
    target = dict(id="g", session_id="s", structure="organ", axis=np.int64(0), slice_index=np.int64(2))
    box = protocol.decode(protocol.encode(protocol.SessionBox(**target, box=np.array([4, 1, 0.5, 3]))))
    assert box.box == [4.0, 1.0, 0.5, 3.0] and box.slice_index == 2 and type(box.slice_index) is int
    points = np.array([[1, 2], [3.5, 4]])
    scribble = protocol.decode(protocol.encode(protocol.SessionScribble(**target, points=points, positive=np.bool_(True))))
    assert scribble.points == [[1.0, 2.0], [3.5, 4.0]] and scribble.positive is True and scribble.radius == 0.0
    lasso = protocol.decode(protocol.encode(protocol.SessionLasso(**target, points=points.tolist(), positive=False)))
    assert lasso.points == [[1.0, 2.0], [3.5, 4.0]] and lasso.positive is False
    assert isinstance(protocol.decode(protocol.encode(protocol.SessionUndo(**target))), protocol.SessionUndo)
    cleared = protocol.decode(protocol.encode(protocol.SessionSetNegatives(id="n", session_id="s", structure="organ")))
    assert cleared.negatives is None
    volume = np.zeros((3, 4, 5), np.uint8)
    volume[1, 2, 3] = 1
    negatives = protocol.decode(protocol.encode(protocol.SessionSetNegatives(id="n", session_id="s", structure="organ",
                                                                             negatives=volume)))
    np.testing.assert_array_equal(negatives.negatives, volume)
    assert all(cls in protocol.SESSION_TYPES for cls in (protocol.SessionBox, protocol.SessionScribble,
                                                          protocol.SessionLasso, protocol.SessionUndo,
                                                          protocol.SessionSetNegatives))


@pytest.mark.parametrize("data, match", [
    (gesture_header("session_box", box=[1, 2, 3]), r"box must be 4 finite numbers"),
    (gesture_header("session_box", box=[1, 2, 3, "4"]), r"box must be 4 finite numbers"),
    (gesture_header("session_box", box=[1, 2, 3, True]), r"box must be 4 finite numbers"),
    (gesture_header("session_box", box=[1, 2, 3, 1e400]), r"Infinity is not a number"),
    (gesture_header("session_box", box=[1, 2, 3, 4], slice_index=2.5), r"slice_index must be an integer"),
    (gesture_header("session_scribble", points=[], positive=True), r"non-empty list"),
    (gesture_header("session_scribble", points=[[1, 2, 3]], positive=True), r"point 0 must be 2 finite numbers"),
    (gesture_header("session_scribble", points=[[1, 2]], positive=1), r"positive must be true or false"),
    (gesture_header("session_scribble", points=[[1, 2]], positive=True, radius=-1), r"radius must be between"),
    (gesture_header("session_scribble", points=[[1, 2]] * (protocol.MAX_GESTURE_POINTS + 1), positive=True),
     r"scribble of 10001 points is more than the 10000"),
    (gesture_header("session_lasso", points=[[0, 0], [1, 0], [None, 1]], positive=False), r"point 2 must be"),
    (gesture_header("session_lasso", points=[[0, 0]] * (protocol.MAX_GESTURE_POINTS + 1), positive=False),
     r"lasso of 10001 points"),
    (with_header({"type": "session_set_negatives", "fields": {"id": "n", "session_id": "s", "structure": "o",
                                                              "negatives": [[[1]]]}}), r"3-D uint8 volume or none"),
    (with_header({"type": "session_set_negatives", "fields": {"id": "n", "session_id": "s", "structure": "o",
                                                              "negatives": {"$array": 0}},
                  "arrays": [{"dtype": "<f4", "shape": [1, 1, 2], "offset": 0, "nbytes": 8}]}, b"\0" * 8),
     r"got float32 \(1, 1, 2\)"),
], ids=lambda v: v if isinstance(v, str) else None)
def test_malformed_gesture_messages_get_clear_errors(data, match):
    with pytest.raises(ProtocolError, match=match):
        protocol.decode(data)


def test_malformed_gesture_messages_cannot_be_built_either():
    target = dict(id="g", session_id="s", structure="organ", axis=0, slice_index=1)
    with pytest.raises(ProtocolError, match="finite"):
        protocol.SessionBox(**target, box=[0, 0, float("nan"), 1])
    with pytest.raises(ProtocolError, match="more than the 10000"):
        protocol.SessionLasso(**target, points=np.zeros((10_001, 2)), positive=True)
    with pytest.raises(ProtocolError, match="3-D uint8"):
        protocol.SessionSetNegatives(id="n", session_id="s", structure="organ", negatives=np.zeros((4, 5), np.uint8))


# ----------------------------------------------------------------------------- the real process
@pytest.fixture
def worker(tmp_path):
    """A real `python -m protosam worker` connected to a socket of this test."""
    listener = socket.create_server(("127.0.0.1", 0))
    port = listener.getsockname()[1]
    env = dict(os.environ, PYTHONPATH=str(ENGINE_ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    process = subprocess.Popen([sys.executable, "-m", "protosam", "worker", "--connect", f"127.0.0.1:{port}",
                                "--transfer-dir", str(tmp_path)], stdin=subprocess.PIPE, env=env,
                               stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    process.stdin.write(b"secret-token\n")
    process.stdin.flush()
    listener.settimeout(60)
    sock, _ = listener.accept()
    listener.close()
    sock.settimeout(60)
    channel = _Channel(sock, tmp_path)
    hello = protocol.decode(channel.receive(), file_dir=tmp_path)
    assert isinstance(hello, protocol.Hello) and hello.token == "secret-token" and hello.pid == process.pid
    yield channel, process
    if process.poll() is None:
        process.kill()
    process.wait(10)
    sock.close()


def receive_reply(channel, tmp_path, identifier):
    while True:  # skip the worker's forwarded log lines
        message = protocol.decode(channel.receive(), file_dir=tmp_path)
        if not isinstance(message, protocol.LogRecord):
            assert getattr(message, "id", None) == identifier, message
            return message


def test_worker_process_answers_rejects_and_exits_with_its_connection(worker, tmp_path):
    channel, process = worker
    channel.send(protocol.HealthRequest(id="h1"))
    health = receive_reply(channel, tmp_path, "h1")
    assert isinstance(health, protocol.Health) and health.pid == process.pid and health.cache_bytes == 0
    assert health.running_job is None and (health.rss_bytes is None or health.rss_bytes > 0)
    # A click for a session the worker does not hold: a typed error, and the worker goes on.
    channel.send(protocol.SessionCorrect(id="s1", session_id="sess", structure="a", axis=0, slice_index=0,
                                         points=[[1, 1]], labels=[1]))
    reply = receive_reply(channel, tmp_path, "s1")
    assert isinstance(reply, protocol.ErrorReply) and reply.error_type == "InputError"
    assert "No correction session 'sess'" in reply.message
    # A well-framed but invalid message gets an error reply; an unknown operation too.
    channel.sock.sendall(with_header({"type": "job_cancel", "fields": {}}))
    bad = receive_reply(channel, tmp_path, "")
    assert bad.error_type == "ProtocolError" and "missing field" in bad.message
    channel.send(protocol.JobSubmit(id="j1", operation="format_disk", kwargs={}))
    unknown = receive_reply(channel, tmp_path, "j1")
    assert unknown.error_type == "NotSupportedError" and "segment_volume" in unknown.message
    channel.send(protocol.JobSubmit(id="j2", operation="segment_volume", kwargs={}, engine=None))
    assert receive_reply(channel, tmp_path, "j2").error_type == "InputError"
    channel.send(protocol.ModelsStatusRequest(id="m1", models={"dinov2": "dinov2_vitb14", "sam": "vit_b"},
                                              weights_home=str(tmp_path / "home")))
    status = receive_reply(channel, tmp_path, "m1")
    assert [w["status"] for w in status.weights] == ["missing", "missing"] and status.loaded == []
    channel.send(protocol.HealthRequest(id="h2"))
    assert receive_reply(channel, tmp_path, "h2").pid == process.pid  # still serving
    # The client's connection closes (the client died): the worker exits by itself.
    channel.sock.close()
    assert process.wait(30) == 0


def test_worker_process_lists_its_devices_and_what_auto_picks(worker, tmp_path):
    """The Slicer process never imports torch: it asks the worker which devices exist."""
    import torch

    channel, _ = worker
    channel.send(protocol.DevicesRequest(id="d1"))
    reply = receive_reply(channel, tmp_path, "d1")
    assert isinstance(reply, protocol.Devices)
    names = [device["name"] for device in reply.devices]
    assert names[-1] == "cpu" and all(device["label"] for device in reply.devices)
    assert ("cuda:0" in names) == torch.cuda.is_available()
    assert reply.auto == ("cuda" if torch.cuda.is_available() else "mps" if "mps" in names else "cpu")


def test_worker_process_exits_when_the_stream_is_garbage(worker):
    channel, process = worker
    channel.sock.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n" + b" " * 64)
    assert process.wait(30) == 3
    assert b"Unreadable message" in process.stderr.read()


def organ_volume(slices):
    """A bright box ("organ") on slices 1 to ``slices`` - 2 of a noisy [slices, 40, 40] volume ->
    (volume float32, truth uint8)."""
    rng = np.random.default_rng(0)
    volume = rng.normal(0, 0.05, (slices, 40, 40)).astype(np.float32)
    truth = np.zeros(volume.shape, np.uint8)
    truth[1:slices - 1, 12:26, 14:28] = 1
    volume += 2.0 * truth
    return volume, truth


def test_worker_process_holds_correction_sessions(worker, tmp_path, tiny_models):
    """Open (a job with progress), click, paint, update and close a session in a real worker:
    the same masks as the same operations on an in-process Session (same code on the same CPU,
    run with the same thread count), and the click and the paint are answered without a job."""
    import dataclasses

    import torch

    from protosam import Engine
    from protosam.session import Session

    channel, process = worker
    volume, truth = organ_volume(6)
    spec = {"models": dataclasses.asdict(tiny_models), "preset": "default", "device": "cpu"}
    options = {"axis": 0, "modality": "none", "support_slices": {"organ": [2]}, "auto_extent": False}

    def reply_to(identifier):
        while True:
            message = protocol.decode(channel.receive(), file_dir=tmp_path)
            if isinstance(message, (protocol.LogRecord, protocol.JobProgress)):
                continue
            assert message.id == identifier, message
            assert not isinstance(message, protocol.ErrorReply), message.message
            return message.value

    channel.send(protocol.SessionOpen(id="o1", session_id="s", engine=spec, volume=protocol.Image(volume, np.eye(4)),
                                      structures={"organ": truth}, options=options))
    opened = reply_to("o1")
    channel.send(protocol.SessionCorrect(id="c1", session_id="s", structure="organ", axis=0, slice_index=4,
                                         points=[[30, 30]], labels=[1]))
    clicked = reply_to("c1")
    channel.send(protocol.SessionAddSupport(id="a1", session_id="s", structure="organ", axis=0, slice_index=1,
                                            mask=truth[1]))
    reply_to("a1")
    channel.send(protocol.SessionUpdate(id="u1", session_id="s", structure="organ"))
    updated = reply_to("u1")
    channel.send(protocol.SessionClose(id="x1", session_id="s"))
    assert reply_to("x1") == {"closed": True}

    torch.set_num_threads(torch.get_num_threads())
    local = Session(Engine(tiny_models, preset="default", device="cpu"), volume, modality="none", auto_extent=False)
    expected = local.start({"organ": truth}, support_slices={"organ": [2]})["organ"]
    np.testing.assert_array_equal(opened["masks"]["organ"], expected)
    np.testing.assert_array_equal(clicked["mask"], local.correct("organ", 4, [[30, 30]], [1]))
    assert clicked["clicks"] == [[30.0, 30.0, 1]]
    local.add_support("organ", 1, truth[1])
    np.testing.assert_array_equal(updated["mask"], local.update("organ"))
    assert updated["fixed_slices"] == [1, 2, 4]
    channel.send(protocol.SessionCorrect(id="c2", session_id="s", structure="organ", axis=0, slice_index=4,
                                         points=[[3, 3]], labels=[1]))
    message = protocol.decode(channel.receive(), file_dir=tmp_path)
    while isinstance(message, protocol.LogRecord):
        message = protocol.decode(channel.receive(), file_dir=tmp_path)
    assert isinstance(message, protocol.ErrorReply) and "propagate again" in message.message


def test_a_click_that_must_encode_its_slice_reports_progress_and_a_cached_one_does_not(worker, tmp_path, tiny_models):
    """protocol.SessionCorrect: a slice without a SAM embedding in the session (here: a session
    whose cache holds nothing, so every slice is "evicted") is encoded as a job, announced by
    JobProgress (0, 1) and (1, 1) before the reply; with a cache, a second click on the same
    slice is answered at once, without progress."""
    import dataclasses

    channel, process = worker
    volume, truth = organ_volume(5)

    def messages_until_reply(identifier):
        seen = []
        while True:
            message = protocol.decode(channel.receive(), file_dir=tmp_path)
            if isinstance(message, protocol.LogRecord):
                continue
            assert message.id == identifier and not isinstance(message, protocol.ErrorReply), message
            if isinstance(message, protocol.JobProgress):
                seen.append((message.done, message.total))
                continue
            return seen

    # An adopted session shares its engine's cache: 0 bytes caches nothing.
    for name, cache_bytes, second_click in (("uncached", 0, [(0, 1), (1, 1)]), ("cached", 64 * 2**20, [])):
        spec = {"models": dataclasses.asdict(tiny_models), "preset": "default", "device": "cpu",
                "cache_bytes": cache_bytes}
        channel.send(protocol.SessionOpen(
            id="o-" + name, session_id=name, engine=spec, volume=protocol.Image(volume), structures={"organ": truth},
            options={"axis": 0, "modality": "none", "adopt": True, "fixed_slices": {"organ": [2]}}))
        messages_until_reply("o-" + name)
        for click in ("a", "b"):
            channel.send(protocol.SessionCorrect(id=f"{name}-{click}", session_id=name, structure="organ", axis=0,
                                                 slice_index=3, points=[[20, 20]], labels=[1]))
            progress = messages_until_reply(f"{name}-{click}")
            assert progress == ([(0, 1), (1, 1)] if click == "a" else second_click), (name, click)


def test_worker_process_answers_boxes_lassos_scribbles_undo_and_negatives_as_the_session_does(worker, tmp_path,
                                                                                               tiny_models):
    """protocol.SessionBox / SessionLasso / SessionScribble / SessionUndo / SessionSetNegatives
    in a real worker: each reply's slice mask equals the same call on an in-process Session on
    the same inputs, the reply lists the slice's corrections, undo restores, and the engine's
    refusals come back as InputError replies."""
    import dataclasses

    import torch

    from protosam import Engine
    from protosam.session import Session

    channel, _ = worker
    volume, truth = organ_volume(6)
    spec = {"models": dataclasses.asdict(tiny_models), "preset": "default", "device": "cpu"}
    options = {"axis": 0, "modality": "none", "support_slices": {"organ": [2]}, "auto_extent": False}

    def reply_to(identifier, error=False):
        while True:
            message = protocol.decode(channel.receive(), file_dir=tmp_path)
            if isinstance(message, (protocol.LogRecord, protocol.JobProgress)):
                continue
            assert message.id == identifier, message
            assert isinstance(message, protocol.ErrorReply) == error, message
            return message if error else message.value

    def target(identifier):
        return dict(id=identifier, session_id="g", structure="organ", axis=0, slice_index=4)

    channel.send(protocol.SessionOpen(id="o", session_id="g", engine=spec, volume=protocol.Image(volume, np.eye(4)),
                                      structures={"organ": truth}, options=options))
    opened = reply_to("o")
    lasso_points = [[10, 10], [30, 10], [30, 30], [10, 30]]
    scribble_points = [[15, 15], [25, 25]]
    channel.send(protocol.SessionBox(**target("b"), box=[12, 10, 30, 28]))
    boxed = reply_to("b")
    channel.send(protocol.SessionLasso(**target("l"), points=lasso_points, positive=False))
    lassoed = reply_to("l")
    channel.send(protocol.SessionScribble(**target("s"), points=scribble_points, positive=True, radius=1))
    scribbled = reply_to("s")
    channel.send(protocol.SessionUndo(**target("u1")))
    undone = reply_to("u1")
    channel.send(protocol.SessionUndoClick(**target("u2")))  # the old name undoes gestures too
    undone_twice = reply_to("u2")
    channel.send(protocol.SessionLasso(**target("bad"), points=[[1, 1], [2, 2]], positive=True))
    refused = reply_to("bad", error=True)
    negatives = np.zeros(volume.shape, np.uint8)
    negatives[:, 20:, :] = 1
    channel.send(protocol.SessionSetNegatives(id="n", session_id="g", structure="organ", negatives=negatives))
    assert reply_to("n") == {"negatives": True}
    channel.send(protocol.SessionUpdate(id="up", session_id="g", structure="organ"))
    updated = reply_to("up")
    channel.send(protocol.SessionSetNegatives(id="n0", session_id="g", structure="organ"))
    assert reply_to("n0") == {"negatives": False}
    channel.send(protocol.SessionClose(id="x", session_id="g"))
    assert reply_to("x") == {"closed": True}

    torch.set_num_threads(torch.get_num_threads())
    local = Session(Engine(tiny_models, preset="default", device="cpu"), volume, modality="none", auto_extent=False)
    before = local.start({"organ": truth}, support_slices={"organ": [2]})["organ"]
    np.testing.assert_array_equal(opened["masks"]["organ"], before)
    np.testing.assert_array_equal(boxed["mask"], local.box("organ", 4, (12, 10, 30, 28)))
    np.testing.assert_array_equal(lassoed["mask"], local.lasso("organ", 4, lasso_points, False))
    np.testing.assert_array_equal(scribbled["mask"], local.scribble("organ", 4, scribble_points, True, radius=1))
    assert not np.array_equal(lassoed["mask"], boxed["mask"])  # the negative lasso changed the slice
    assert scribbled["corrections"] == ["box", "lasso", "scribble"] and scribbled["clicks"] == []
    np.testing.assert_array_equal(undone["mask"], lassoed["mask"])
    np.testing.assert_array_equal(undone_twice["mask"], boxed["mask"])
    assert undone["corrections"] == ["box", "lasso"] and undone_twice["corrections"] == ["box"]
    assert refused.error_type == "InputError" and "at least 3" in refused.message
    local.undo("organ", 4)
    local.undo("organ", 4)
    local.set_negatives("organ", negatives)
    np.testing.assert_array_equal(updated["mask"], local.update("organ"))
