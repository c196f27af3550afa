"""ProtoSAMLogic with "Compute on: ProtoSAM server" against a real `protosam serve` process.

The logic sends the run to its local worker process, which relays it to the server over HTTP
(server_client.forward_job): no network transfer in this process. The server runs with the
torch thread count a fresh local worker process uses (torch's default here, the same
machine and environment), so the same code gives the same bits on both paths.
"""

import dataclasses
import logging
import threading

import numpy as np
import pytest

from required_modules import require_slicer_core

slicer = require_slicer_core()

from ProtoSAMSlicerLib import mrml_io, results, settings
from ProtoSAMSlicerLib.logic import ProtoSAMLogic
from protosam.serving import protocol
from protosam.errors import InputError
from protosam.testing import start_server
from slicer_mrml_helpers import addSegmentation, addVolume, ijkToRasFrom, rotationMatrix

LPS = np.diag([-1.0, -1.0, 1.0])


@pytest.fixture(scope="module")
def live(tinyModels, tmp_path_factory):
    import torch

    process = start_server(tinyModels, tmp_path_factory.mktemp("slicer-server"), users=("alice",),
                           threads=torch.get_num_threads())
    yield process
    process.stop()


def serverOptions(options, live, token=None):
    return dataclasses.replace(options, computeOn="server", serverUrl=live.url,
                               serverToken=token if token is not None else live.tokens["alice"])


def rotatedAnisotropicCase(scene, slices=6, seed=0):
    """A bright box on noise in a volume rotated 30 degrees about S, LPS-stored, 0.7 x 0.9 x 2.5 mm,
    with the box painted on axial slice 2 ("liver")."""
    rng = np.random.default_rng(seed)
    shape = (slices, 20, 24)
    image = rng.normal(0, 20, size=shape).astype(np.float32)
    image[:, 5:15, 6:18] += 300
    liver = np.zeros(shape, np.uint8)
    liver[2, 5:15, 6:18] = 1
    ijkToRas = ijkToRasFrom(rotationMatrix((0, 0, 1), 30) @ LPS, (0.7, 0.9, 2.5), (4.0, -6.0, 9.0))
    volume = addVolume(scene, image, ijkToRas, name="rotated")
    segmentation, ids = addSegmentation(scene, volume, {"liver": liver})
    return volume, segmentation, ids["liver"], liver


def test_server_run_gives_the_local_segmentation_on_a_rotated_anisotropic_volume(scene, tinyOptions, live):
    volume, segmentation, liverId, liver = rotatedAnisotropicCase(scene)
    logic = ProtoSAMLogic()
    local = logic.process(volume, segmentation, [liverId], options=tinyOptions)
    progress = []
    serverRunsBefore = live.log().count("finished (job_result)")
    remote = logic.process(volume, segmentation, [liverId], options=serverOptions(tinyOptions, live),
                           progressCallback=lambda done, total: progress.append((done, total)))
    localMask = mrml_io.segmentToArray(local.previewSegmentationNode, liverId, volume)
    remoteMask = mrml_io.segmentToArray(remote.previewSegmentationNode, liverId, volume)
    assert localMask.any() and not localMask.all()
    np.testing.assert_array_equal(remoteMask, localMask)
    assert remote.processedSlices == local.processedSlices and remote.supportSlices == local.supportSlices
    assert progress and progress[-1][0] == progress[-1][1]
    assert results.isPreview(remote.previewSegmentationNode)
    # Accept works as for a local run: into the support segmentation, the painted slice kept.
    logic.discard(local)
    mapping = logic.accept(remote)
    accepted = mrml_io.segmentToArray(segmentation, mapping[liverId], volume)
    np.testing.assert_array_equal(accepted[2], liver[2])
    assert live.log().count("finished (job_result)") == serverRunsBefore + 1  # it really ran on the server
    assert live.tokens["alice"] not in live.log()


def test_effect_and_module_settings_select_the_server(live):
    class Store(dict):
        def value(self, key):
            return self.get(key)

        def setValue(self, key, value):
            self[key] = value

    store = Store()
    settings.write(store, "ComputeOn", "server")
    settings.write(store, "ServerURL", live.url)
    settings.write(store, "ServerToken", live.tokens["alice"])
    options = settings.processOptions(store)
    assert (options.computeOn, options.serverUrl, options.serverToken) == ("server", live.url, live.tokens["alice"])
    assert live.tokens["alice"] not in repr(options)  # options may be logged; the token never is
    assert settings.processOptions(Store()).computeOn == "local"


def test_a_wrong_token_is_reported_and_nothing_is_written(scene, tinyOptions, live):
    volume, segmentation, liverId, _ = rotatedAnisotropicCase(scene, slices=3)
    nodesBefore = scene.GetNumberOfNodesByClass("vtkMRMLSegmentationNode")
    with pytest.raises(InputError, match="refused the token"):
        ProtoSAMLogic().process(volume, segmentation, [liverId],
                                options=serverOptions(tinyOptions, live, token="x" * 24))
    assert scene.GetNumberOfNodesByClass("vtkMRMLSegmentationNode") == nodesBefore


def test_server_killed_mid_run_is_reported_and_nothing_is_written(scene, tinyOptions, tinyModels, tmp_path):
    killable = start_server(tinyModels, tmp_path / "killable", users=("alice",))
    try:
        volume, segmentation, liverId, liver = rotatedAnisotropicCase(scene, slices=40)
        nodesBefore = scene.GetNumberOfNodesByClass("vtkMRMLSegmentationNode")
        with pytest.raises(protocol.WorkerCrashedError, match="connection to the ProtoSAM server was lost"):
            ProtoSAMLogic().process(volume, segmentation, [liverId], options=serverOptions(tinyOptions, killable),
                                    progressCallback=lambda done, total: killable.kill() if done >= 1 else None)
        assert scene.GetNumberOfNodesByClass("vtkMRMLSegmentationNode") == nodesBefore
        np.testing.assert_array_equal(mrml_io.segmentToArray(segmentation, liverId, volume), liver)
    finally:
        killable.stop()
    assert slicer.mrmlScene is scene


def test_clicks_and_update_on_the_server_equal_the_local_worker_and_apply(scene, tinyOptions, live):
    """The effect with Compute on: server: a click given in RAS corrects the preview's slice and
    Update volume re-propagates, in a ServerSession on the server (relayed by the local worker
    process; this thread keeps processing events), with exactly what the local worker's session
    gives on the same inputs (same code and thread count on the same CPU)."""
    from ProtoSAMSlicerLib.server_session import ServerSession
    from ProtoSAMSlicerLib.worker_client import WorkerSession
    from test_slicer_corrections import GEOMETRIES, buildEditor, preview, read, startPreview, world

    local, remote = (buildEditor(scene, *GEOMETRIES["rotated"]) for _ in range(2))
    idleCalls = []
    remote["session"].logic.idle = lambda: idleCalls.append(1)
    normal = startPreview(local, tinyOptions)
    startPreview(remote, serverOptions(tinyOptions, live))
    before = preview(remote)
    np.testing.assert_array_equal(before, preview(local))
    session = remote["session"]
    updatesBefore = live.log().count("session_update")

    for e in (local, remote):
        assert e["session"].addClick(world(e["ijkToWorld"], (14.3, 2.7, 4.2)), normal, positive=True) == 4
        e["session"].addClick(world(e["ijkToWorld"], (13, 4, 4)), normal, positive=False)
    assert isinstance(session.corrections, ServerSession) and isinstance(local["session"].corrections, WorkerSession)
    assert idleCalls, "Slicer was not kept processing events while the server answered"
    clicked = preview(remote)
    np.testing.assert_array_equal(clicked, preview(local))
    unchanged = [k for k in range(clicked.shape[0]) if k != 4]
    np.testing.assert_array_equal(clicked[unchanged], before[unchanged])  # a click changes only its slice
    np.testing.assert_array_equal(clicked, session._orientation.from_canonical(session.corrections.mask(remote["ids"]["liver"])))
    assert session.clicks(4) == [(14.0, 3.0, 1), (13.0, 4.0, 0)]
    assertSameReviewScores(local, remote, confirmed=4)  # the server's session replies rescore too
    for e in (local, remote):
        assert e["session"].undoClick() == 4
    np.testing.assert_array_equal(preview(remote), preview(local))
    assert session.corrections.clicks(remote["ids"]["liver"], session._canonicalSlice(4)) == [(14.0, 3.0, 1)]

    idleCalls.clear()
    progress = []
    session.updateVolume(progressCallback=lambda done, total: progress.append((done, total)))
    local["session"].updateVolume()
    updated = preview(remote)
    np.testing.assert_array_equal(updated, preview(local))
    assert idleCalls and progress and progress[-1][0] == progress[-1][1] > 0
    assert live.log().count("session_update") == updatesBefore + 1  # the update ran on the server
    assertSameReviewScores(local, remote, confirmed=4)
    corrected = updated[4].copy()
    session.apply()
    assert remote["saves"] == [1]
    np.testing.assert_array_equal(read(remote, "liver")[4], np.maximum(corrected, remote["arrays"]["liver"][4]))
    np.testing.assert_array_equal(read(remote, "other"), remote["arrays"]["other"])
    local["session"].cancel()
    assert live.tokens["alice"] not in live.log()


def assertSameReviewScores(local, remote, confirmed):
    """The effect's preview scores (rescored from the session replies) are the same on the server
    and in the local worker; slice ``confirmed`` was corrected: out of the review queue."""
    from ProtoSAMSlicerLib import review

    results = [e["session"].result for e in (local, remote)]
    (localScores,), (remoteScores,) = (list(r.sliceConfidence.values()) for r in results)
    np.testing.assert_array_equal(remoteScores, localScores)
    assert results[1].volumeConfidence == results[0].volumeConfidence is not None
    assert [confirmed in slices for slices in results[1].confirmedSlices.values()] == [True]
    assert confirmed not in [row.sliceIndex for row in review.sliceRows([results[1]])]


def test_server_session_without_a_worker_process_talks_to_the_server_directly(tinyOptions, live):
    """Headless scripts (thread worker): the ServerSession makes its requests itself, with the same
    results as through the worker process; after close the server has forgotten the session."""
    from ProtoSAMSlicerLib.server_session import ServerSession
    from ProtoSAMSlicerLib.worker_client import workerForDevice

    rng = np.random.default_rng(4)
    volume = rng.normal(0, 20, (4, 20, 24)).astype(np.float32)
    volume[:, 5:15, 6:18] += 300
    masks = np.zeros(volume.shape, np.uint8)
    masks[:, 5:15, 6:18] = 1
    engineSpec = dataclasses.asdict(protocol.EngineSpec(models=dataclasses.asdict(tinyOptions.models),
                                                        preset="default", device="cpu", cache_bytes=1 << 24))
    sessions = [ServerSession(client, live.url, live.tokens["alice"], engineSpec, volume, 0, {"liver": masks},
                              {"liver": [2]}, {"modality": "auto", "auto_extent": False})
                for client in (None, workerForDevice("cpu"))]
    for session in sessions:
        session.correct("liver", 1, [[20, 3]], [1])
        session.update("liver")
    assert repr(sessions[0]).startswith("ServerSession(") and live.tokens["alice"] not in repr(sessions[0])
    assert sessions[0].clicks("liver", 1) == [(20.0, 3.0, 1)]
    np.testing.assert_array_equal(sessions[0].mask("liver"), sessions[1].mask("liver"))
    for session in sessions:
        session.close()
    with pytest.raises(KeyError, match="No such correction session"):
        sessions[0].correct("liver", 1, [[20, 3]], [1])


@pytest.mark.parametrize("crossVolume", [False, True], ids=["same_volume", "support_from_another_volume"])
def test_module_update_preview_on_the_server_equals_the_local_worker(scene, tinyOptions, live, crossVolume):
    """The module's Update preview with "Compute on: ProtoSAM server": the session opens on the
    server (relayed by the local worker), keeps the other patient's support, and gives what the
    local worker process gives for the same run and repainting (same code, same thread count)."""
    from ProtoSAMSlicerLib.server_session import ServerSession
    from test_slicer_module_update import REPAINTED, buildCase, painted, previewOf, repaintSlice, run

    updated = {}
    updatesBefore = live.log().count("(session_update;")
    for where, options in (("local", tinyOptions), ("server", serverOptions(tinyOptions, live))):
        target, support, segmentation, ids = buildCase(scene, crossVolume)
        logic = ProtoSAMLogic()
        result = run(logic, target, support, segmentation, ids, options)
        paintedSlice = repaintSlice(scene, result, ids["liver"])
        progress = []
        logic.updatePreviews([result], progressCallback=lambda done, total: progress.append((done, total)))
        assert progress and progress[-1][0] == progress[-1][1] > 0
        liver = previewOf(result, ids["liver"])
        np.testing.assert_array_equal(liver[REPAINTED], paintedSlice)
        updated[where] = liver
        if where == "server":
            assert isinstance(result.corrections, ServerSession)
            assert live.log().count("(session_update;") == updatesBefore + 1  # the update ran on the server
        logic.discard(result)
        np.testing.assert_array_equal(mrml_io.segmentToArray(segmentation, ids["liver"], support), painted()["liver"])
    np.testing.assert_array_equal(updated["server"], updated["local"])


def nonLoopbackAddress():
    """An IPv4 address of this machine that is not loopback, or None."""
    import socket

    try:
        infos = socket.getaddrinfo(socket.gethostname(), None, socket.AF_INET)
    except OSError:
        infos = []
    for info in infos:
        address = info[4][0]
        if not address.startswith("127."):
            return address
    probe = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    try:
        probe.connect(("192.0.2.1", 9))  # no packet is sent: picks the outgoing interface
        address = probe.getsockname()[0]
        return None if address.startswith("127.") or address == "0.0.0.0" else address
    except OSError:
        return None
    finally:
        probe.close()


@pytest.fixture
def plainHttpAddress(live):
    """``http://<this machine's non-loopback address>:<port>`` relayed to the live server (which
    listens on 127.0.0.1 only): a URL the client must treat as another computer on the network."""
    import socket

    address = nonLoopbackAddress()
    if address is None:
        pytest.skip("this machine has no non-loopback IPv4 address")
    target = live.url.rsplit("//", 1)[1]
    host, port = target.rsplit(":", 1)
    listener = socket.create_server((address, 0))
    stop = threading.Event()

    def pipe(source, sink):
        try:
            while True:
                data = source.recv(65536)
                if not data:
                    break
                sink.sendall(data)
        except OSError:
            pass
        finally:
            for s in (source, sink):
                try:
                    s.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass

    def serve():
        listener.settimeout(0.2)
        while not stop.is_set():
            try:
                client, _ = listener.accept()
            except OSError:
                continue
            upstream = socket.create_connection((host, int(port)))
            for a, b in ((client, upstream), (upstream, client)):
                threading.Thread(target=pipe, args=(a, b), daemon=True).start()

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    yield f"http://{address}:{listener.getsockname()[1]}"
    stop.set()
    thread.join(5)
    listener.close()


def test_plain_http_to_another_computer_needs_the_explicit_unencrypted_choice(scene, tinyOptions, live,
                                                                              plainHttpAddress, caplog):
    volume, segmentation, liverId, liver = rotatedAnisotropicCase(scene)
    logic = ProtoSAMLogic()
    options = dataclasses.replace(serverOptions(tinyOptions, live), serverUrl=plainHttpAddress)
    with pytest.raises(InputError, match="Refusing plain http://.*Allow unencrypted connection"):
        logic.process(volume, segmentation, [liverId], options=options)
    # The setting (the module's "Allow unencrypted connection" box) reaches the options.
    class Store(dict):  # qt.QSettings' value / setValue
        value, setValue = dict.get, dict.__setitem__

    store = Store()
    assert settings.processOptions(store).serverAllowUnencrypted is False
    settings.write(store, "ServerAllowUnencrypted", "true")
    assert settings.processOptions(store).serverAllowUnencrypted is True
    allowed = dataclasses.replace(options, serverAllowUnencrypted=True)
    serverRunsBefore = live.log().count("finished (job_result)")
    with caplog.at_level(logging.WARNING):
        result = logic.process(volume, segmentation, [liverId], options=allowed)
    assert live.log().count("finished (job_result)") == serverRunsBefore + 1  # it ran on the server, via http
    assert mrml_io.segmentToArray(result.previewSegmentationNode, liverId, volume).any()
    assert "unencrypted connection" in caplog.text.lower() and live.tokens["alice"] not in caplog.text
    # The correction session on the server follows the same choice.
    session = logic.openCorrectionSession(result)
    assert session.allowUnencrypted and session.mask(liverId).any()
    session.close()
    logic.discard(result)
    logic.cleanup()
