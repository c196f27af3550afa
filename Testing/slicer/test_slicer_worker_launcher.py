"""The worker process as Slicer starts it: through a stand-in of CTK's launcher (PythonSlicer
starts the real interpreter as its child), in Slicer's temporary folder, on a machine shared with
other users. Real processes and sockets; see ctk_launcher_standin.py and slow_worker_standin.py.

Covers issue 21 items 1 (private log folder, start errors), 2 (transfer files of requests), 3
(kill and shutdown reach the interpreter; the killed hint), 4 (inactivity limit and JobCancel),
8 (slicer.app.temporaryPath) and issue 22's local-worker item (strangers on the client's socket).
"""

import os
import signal
import socket
import stat
import struct
import sys
import time
import types
from pathlib import Path

import numpy as np
import pytest
from required_modules import require_slicer_core

require_slicer_core()

import slicer
from ProtoSAMSlicerLib.worker_client import WorkerClient, WorkerSession, WorkerStartError
from protosam.errors import InputError
from protosam.serving import protocol
from protosam.serving.protocol import WorkerCrashedError
from test_slicer_worker_process import processAlive

HERE = Path(__file__).resolve().parent
posixOnly = pytest.mark.skipif(sys.platform == "win32", reason="POSIX signals and shell wrappers")


def executable(tmp_path, name, script) -> str:
    """An executable that runs ``script`` with this Python, as PythonSlicer runs its launcher."""
    path = tmp_path / name
    path.write_text(f'#!/bin/sh\nexec "{sys.executable}" "{script}" "$@"\n')
    path.chmod(0o755)
    return str(path)


@pytest.fixture
def launcher(tmp_path):
    return executable(tmp_path, "PythonSlicer", HERE / "ctk_launcher_standin.py")


@pytest.fixture
def slicerTemporaryPath(tmp_path, monkeypatch):
    """A stand-in ``slicer.app`` whose temporaryPath (Slicer's setting) is a folder of its own."""
    folder = tmp_path / "slicer-temporary"
    folder.mkdir()
    monkeypatch.setattr(slicer, "app", types.SimpleNamespace(temporaryPath=str(folder)), raising=False)
    return folder


def waitGone(pid, seconds=20.0) -> bool:
    deadline = time.monotonic() + seconds
    while processAlive(pid) and time.monotonic() < deadline:
        time.sleep(0.05)
    return not processAlive(pid)


# ----------------------------------------------------------------------------- item 3: the launcher
@posixOnly
def test_kill_and_shutdown_end_the_interpreter_behind_the_launcher(launcher, slicerTemporaryPath):
    client = WorkerClient("launched", python=launcher)
    try:
        workerPid = client.health().pid
        launcherPid = client.pid
        assert workerPid != launcherPid and processAlive(workerPid)  # the interpreter is the launcher's child
        client.kill()
        assert waitGone(workerPid), "kill() left the worker's interpreter running"
        # No poll in between: the old worker's end of file may still be on its way (loopback TCP
        # delivers it asynchronously); the next request must start a new worker, not fail on it.
        # A worker that answers nothing (stopped like one stuck in a GIL-holding call): shutdown
        # gives up after its timeout and kills the interpreter too, not only the launcher.
        workerPid = client.health().pid
        os.kill(workerPid, signal.SIGSTOP)
        client.shutdown(timeout=1.0)
        assert waitGone(workerPid), "shutdown() left a stuck worker's interpreter running"
    finally:
        client.shutdown(timeout=1.0)


@posixOnly
def test_an_interpreter_killed_by_sigkill_gets_the_out_of_memory_hint(launcher, slicerTemporaryPath):
    client = WorkerClient("oom-killed", python=launcher)
    try:
        workerPid = client.health().pid
        os.kill(workerPid, signal.SIGKILL)  # what the Linux out-of-memory killer does
        with pytest.raises(WorkerCrashedError, match="out-of-memory killer"):
            client.health()
        assert client.health().pid != workerPid  # the next request starts a new worker
    finally:
        client.shutdown(timeout=5.0)


# ----------------------------------------------------------------------------- items 1 and 8: folders
@posixOnly
def test_files_go_to_slicers_temporary_folder_in_a_private_folder(slicerTemporaryPath, tmp_path, monkeypatch):
    system = tmp_path / "system-temporary"
    system.mkdir()
    monkeypatch.setattr("tempfile.tempdir", str(system))
    client = WorkerClient("private")
    try:
        client.health()
        transfer = client._transferDir
        assert transfer.parent == slicerTemporaryPath and client.logPath.parent == transfer
        assert stat.S_IMODE(transfer.stat().st_mode) == 0o700
        assert stat.S_IMODE(client.logPath.stat().st_mode) == 0o600
        assert list(system.iterdir()) == []  # nothing in the system's temporary folder
    finally:
        client.shutdown()
    assert not transfer.exists()  # a clean exit removes the folder, log included


@posixOnly
def test_a_folder_planted_by_another_user_is_neither_used_nor_followed(tmp_path, monkeypatch):
    """The old fixed <tmp>/ProtoSAM folder: another local user creates it first and plants a link
    named like the next log, pointing at one of your files."""
    shared = tmp_path / "shared-tmp"
    shared.mkdir()
    monkeypatch.setattr("tempfile.tempdir", str(shared))
    monkeypatch.delattr(slicer, "app", raising=False)  # outside Slicer: the system's folder
    victim = tmp_path / "victim.txt"
    victim.write_text("precious")
    victim.chmod(0o600)
    planted = shared / "ProtoSAM"
    planted.mkdir()
    for starts in range(1, 4):
        (planted / f"worker-{os.getpid()}-{starts}.log").symlink_to(victim)
    client = WorkerClient("shared")
    try:
        assert client.health().pid > 0
        assert client.logPath.parent.parent == shared and client.logPath.parent != planted
    finally:
        client.shutdown()
    assert victim.read_text() == "precious"


def test_any_os_error_while_starting_is_a_worker_start_error(slicerTemporaryPath, tmp_path, monkeypatch):
    notAFolder = tmp_path / "not-a-folder"
    notAFolder.write_text("")
    monkeypatch.setattr(slicer.app, "temporaryPath", str(notAFolder))
    client = WorkerClient("unwritable")
    with pytest.raises(WorkerStartError, match="could not be launched") as error:
        client.health()
    assert str(notAFolder) in str(error.value)
    assert client.pid is None and client._transferDir is None


# ----------------------------------------------------------------------------- item 2: transfer files
def npyFiles(client):
    return sorted(p.name for p in client._transferDir.glob("*.npy")) if client._transferDir else []


def test_a_sessions_transfer_files_are_removed_when_its_replies_arrive(slicerTemporaryPath, tinyOptions):
    from ProtoSAMSlicerLib.logic import engineSpecFor

    client = WorkerClient("session-files")
    try:
        client.health()
        assert npyFiles(client) == []
        rng = np.random.default_rng(0)
        volume = rng.random((5, 32, 32)).astype(np.float32)
        support = rng.random((5, 32, 32)).astype(np.float32)
        mask = np.zeros((5, 32, 32), np.uint8)
        mask[:, 8:20, 8:20] = 1
        spec = engineSpecFor(tinyOptions, "cpu")
        session = WorkerSession(client, spec, volume, 0, {"liver": mask}, {"liver": [2]}, {},
                                supportVolume=support, supportMasks={"liver": mask}, supportSlices={"liver": [2]})
        assert npyFiles(client) == [], "the volume and support copies sent to open the session are left behind"
        session.update("liver")
        session.add_support("liver", 1, mask[1])
        assert npyFiles(client) == []
        session.close()
        # A request the worker refuses: its files go too.
        with pytest.raises(InputError):
            client.request(protocol.SessionAddSupport(id=protocol.new_id(), session_id="gone", structure="liver",
                                                      axis=0, slice_index=0, mask=np.ones((256, 256), np.uint8)))
        assert npyFiles(client) == []
    finally:
        client.shutdown()


def test_a_worker_session_sends_boxes_lassos_scribbles_undo_and_negatives(slicerTemporaryPath, tinyOptions):
    """WorkerSession.box / lasso / scribble / undo / setNegatives through a real worker process:
    each reply updates the session's mask volume and the slice's corrections (the engine's
    results themselves are compared with an in-process Session in Testing/engine/test_protocol.py)."""
    from ProtoSAMSlicerLib.logic import engineSpecFor

    client = WorkerClient("session-gestures")
    try:
        rng = np.random.default_rng(1)
        volume = rng.normal(0, 0.05, (5, 32, 32)).astype(np.float32)
        mask = np.zeros((5, 32, 32), np.uint8)
        mask[1:4, 8:20, 8:20] = 1
        volume += 2.0 * mask
        session = WorkerSession(client, engineSpecFor(tinyOptions, "cpu"), volume, 0, {"liver": mask.copy()},
                                {"liver": [2]}, {})
        boxed = session.box("liver", 3, (6, 6, 22, 22)).copy()
        np.testing.assert_array_equal(session.mask("liver")[3], boxed)
        lassoed = session.lasso("liver", 3, [[0, 0], [31, 0], [31, 12], [0, 12]], False).copy()
        assert not lassoed[:12].any() and session.corrections("liver", 3) == ["box", "lasso"]
        np.testing.assert_array_equal(lassoed[13:], boxed[13:])
        scribbled = session.scribble("liver", 3, [[10, 16], [18, 16]], True, radius=1)
        assert scribbled[15:18, 10:19].all() and session.corrections("liver", 3) == ["box", "lasso", "scribble"]
        assert session.clicks("liver", 3) == []  # the points sampled along a scribble are not clicks
        np.testing.assert_array_equal(session.undo("liver", 3), lassoed)
        np.testing.assert_array_equal(session.undo("liver", 3), boxed)
        np.testing.assert_array_equal(session.mask("liver")[3], boxed)
        assert session.corrections("liver", 3) == ["box"]
        with pytest.raises(InputError, match="at least 3"):
            session.lasso("liver", 3, [[1, 1], [2, 2]], True)
        with pytest.raises(protocol.ProtocolError, match="more than the 10000"):
            session.scribble("liver", 3, np.zeros((10_001, 2)), True)
        others = np.zeros(volume.shape, np.uint8)
        others[:, 14:, :] = 3
        assert session.setNegatives("liver", others) is True
        updated = session.update("liver")
        # Propagated slices lose the negatives; fixed slices (2: support, 3: corrected) keep their masks.
        assert not updated[[1, 4], 14:].any() and updated[2, 14:20, 8:20].all()
        np.testing.assert_array_equal(updated[3], boxed)
        assert session.set_negatives("liver", None) is False
        assert npyFiles(client) == []
        session.close()
    finally:
        client.shutdown()


# ----------------------------------------------------------------------------- item 4: inactivity
@pytest.fixture
def slowWorker(tmp_path, monkeypatch):
    marker = tmp_path / "marker.txt"
    monkeypatch.setenv("PROTOSAM_TEST_SLOW_MARKER", str(marker))
    python = executable(tmp_path, "slow-python", HERE / "slow_worker_standin.py")

    def start(mode):
        monkeypatch.setenv("PROTOSAM_TEST_SLOW", mode)
        return WorkerClient("slow", python=python)

    return start, marker


def test_a_request_that_keeps_reporting_progress_is_not_cut_off(slowWorker, slicerTemporaryPath):
    start, marker = slowWorker
    client = start("progress:8:0.4")  # 3.2 s in all, progress every 0.4 s
    try:
        client.health()
        seen = []
        began = time.monotonic()
        client.request(protocol.SessionUpdate(id=protocol.new_id(), session_id="s", structure="a"), timeout=1.5,
                       progress=lambda done, total: seen.append(done))
        assert time.monotonic() - began > 3.0 and seen[-1] == 8
        assert not marker.exists()
    finally:
        client.shutdown()


def test_a_silent_request_times_out_and_the_worker_is_told_to_stop(slowWorker, slicerTemporaryPath):
    start, marker = slowWorker
    client = start("silent:60")
    try:
        pid = client.health().pid
        message = protocol.SessionUpdate(id=protocol.new_id(), session_id="s", structure="a")
        began = time.monotonic()
        with pytest.raises(TimeoutError, match="sent nothing"):
            client.request(message, timeout=1.0)
        assert time.monotonic() - began < 10
        deadline = time.monotonic() + 10
        while not marker.exists() and time.monotonic() < deadline:
            client.poll()
            time.sleep(0.05)
        assert marker.read_text() == f"cancelled {message.id}\n"
        health = client.health()  # the worker is free again: no update blocks it
        assert health.pid == pid and health.running_job is None
    finally:
        client.shutdown()


# ----------------------------------------------------------------------------- issue 22: strangers
def frame(header: bytes, blobLength: int = 0) -> bytes:
    return struct.pack("<4sIQQ", b"PSAM", protocol.PROTOCOL_VERSION, len(header), blobLength) + header


@posixOnly
def test_strangers_on_the_clients_socket_never_delay_or_crash_the_real_worker(launcher, slicerTemporaryPath,
                                                                             monkeypatch):
    """Another local user reads the port on the worker's command line and connects first: silently,
    with a hello whose token is a number, with a prefix claiming a 2**60-byte blob, or a wrong token."""
    monkeypatch.setenv("PROTOSAM_TEST_LAUNCHER_DELAY_S", "1.0")  # the strangers connect first
    client = WorkerClient("strangers", python=launcher, startTimeout=30.0)
    strangers = []

    def intrude():
        port = int(client.commandLine[client.commandLine.index("--connect") + 1].rsplit(":", 1)[1])
        for payload in (None,
                        frame(b'{"type": "hello", "fields": {"token": 12345, "pid": 1}, "arrays": []}'),
                        frame(b"{}", 1 << 60),
                        protocol.encode(protocol.Hello(token="0" * 64, pid=1))):
            sock = socket.create_connection(("127.0.0.1", port))
            if payload is not None:
                sock.sendall(payload)
            strangers.append(sock)

    idle = []

    def onIdle():
        if not idle:
            intrude()
        idle.append(1)

    began = time.monotonic()
    try:
        health = client.request(protocol.HealthRequest(id=protocol.new_id()), timeout=60, idle=onIdle)
        elapsed = time.monotonic() - began
        assert health.pid > 0 and len(strangers) == 4
        assert elapsed < 15, f"the strangers delayed the real worker by {elapsed:.0f} s"
        # Every stranger was dropped: each sees its connection closed.
        for sock in strangers:
            sock.settimeout(5)
            assert sock.recv(1) == b""
    finally:
        for sock in strangers:
            sock.close()
        client.shutdown()
