"""Click-correction sessions on a ProtoSAM server: a real `protosam serve` process on 127.0.0.1
with tiny models, used over HTTP (server_client.session_request and raw httpx requests).

Equality with a local session holds by construction: the server runs the worker's own session
handler (worker_process.WorkerSessions) on the same job code, torch build and CPU, with one
torch thread on both sides (the server with --threads 1, this process with
torch.set_num_threads(1)), and the local reference takes the same path: a segment_volume job
that leaves its encodings in the engine's cache, then a Session adopting its result on that
cache. So every reduction happens in the same order, and masks are compared bit for bit.
"""
from __future__ import annotations

import dataclasses
import json
import struct
import threading
import time

import httpx
import numpy as np
import pytest

from protosam.serving import protocol
from protosam.errors import CancelledError
from protosam.serving.client import ServerConnection, forward_job, forwarding_request, server_health, session_request
from protosam.testing import start_server

from engine_helpers import bearer as headers, box_volume, cpu_engine_spec, segment_volume_request

CACHE = 64 * 1024 * 1024


def engine_spec(models):
    return cpu_engine_spec(models, CACHE)


def job_request(models, volume, mask):
    return segment_volume_request(models, volume, mask, cache_bytes=CACHE)


def open_message(models, volume, masks, fixed, session_id=None):
    return protocol.SessionOpen(id=protocol.new_id(), session_id=session_id or protocol.new_id(),
                                engine=engine_spec(models), volume=protocol.Image(volume), structures={"1": masks},
                                options={"axis": 0, "modality": "auto", "adopt": True, "fixed_slices": {"1": fixed}})


def click(session_id, index, points, labels):
    return protocol.SessionCorrect(id=protocol.new_id(), session_id=session_id, structure="1", axis=0,
                                   slice_index=index, points=points, labels=labels)


def update(session_id):
    return protocol.SessionUpdate(id=protocol.new_id(), session_id=session_id, structure="1")


def close(session_id):
    return protocol.SessionClose(id=protocol.new_id(), session_id=session_id)


def post_request(live, user, message):
    return httpx.post(live.url + "/v1/requests", content=protocol.encode(message), headers=headers(live, user),
                      timeout=120)


def release(live, user):
    assert post_request(live, user, protocol.ReleaseCaches(id="r")).status_code == 200


@pytest.fixture(scope="module")
def live(tiny_models, tmp_path_factory):
    process = start_server(tiny_models, tmp_path_factory.mktemp("server-sessions"),
                           extra_args=["--max-sessions-per-user", "2", "--max-jobs-per-user", "3"])
    yield process
    process.stop()


def connection(live, user="alice"):
    return ServerConnection(live.url, live.tokens[user])


def run_job(live, models, volume, mask, user="alice"):
    return forward_job(forwarding_request(job_request(models, volume, mask), live.url, live.tokens[user]),
                       lambda done, total: None, threading.Event())


def adopted(live, models, volume, mask, user="alice"):
    """Run the job on the server, then open a session adopting its result; (session id, job value)."""
    value = run_job(live, models, volume, mask, user)
    message = open_message(models, volume, value["masks"]["1"], value["support_slices"]["1"])
    opened = session_request(connection(live, user), message)
    np.testing.assert_array_equal(opened["masks"]["1"], value["masks"]["1"])
    return message.session_id, value


@pytest.fixture(scope="module")
def local(tiny_models):
    """The same operations in this process, on the same path: job (its encodings cached), adopt, click, undo, clear,
    click, paint, update."""
    import torch

    from protosam.session import Session
    from protosam.serving.worker_process import Engines, run_job as run_local_job

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        volume, mask = box_volume()
        engines = Engines()
        value = run_local_job(engines, job_request(tiny_models, volume, mask), lambda done, total: None,
                              threading.Event())
        engine = engines.get(engine_spec(tiny_models))
        session = Session(engine, volume, cache_bytes=None, modality="auto")
        session.adopt("1", value["masks"]["1"], value["support_slices"]["1"])
        steps = {"job": value["masks"]["1"]}
        steps["click"] = session.correct("1", 1, [[30, 8]], [1])
        steps["second click"] = session.correct("1", 1, [[20, 20]], [0])
        steps["undo"] = session.undo_click("1", 1)
        steps["clear"] = session.clear_clicks("1", 1)
        steps["click again"] = session.correct("1", 1, [[30, 8]], [1])
        painted = np.zeros(volume.shape[1:], np.uint8)
        painted[12:30, 10:28] = 1
        steps["paint"] = session.add_support("1", 4, painted)
        steps["update"] = session.update("1")
        steps["painted"] = painted
        return steps
    finally:
        torch.set_num_threads(threads)


def test_open_adopting_a_job_then_clicks_undo_clear_paint_update_equal_a_local_session(live, tiny_models, local):
    release(live, "alice")
    volume, mask = box_volume()
    session_id, value = adopted(live, tiny_models, volume, mask)
    np.testing.assert_array_equal(value["masks"]["1"], local["job"])
    cached = server_health(live.url, live.tokens["alice"])["cache_bytes"]
    assert cached > 0
    remote = connection(live)
    before = value["masks"]["1"].copy()

    clicked = session_request(remote, click(session_id, 1, [[30, 8]], [1]))
    np.testing.assert_array_equal(clicked["mask"], local["click"])
    assert not np.array_equal(clicked["mask"], before[1])  # the click changed its slice
    assert clicked["clicks"] == [[30.0, 8.0, 1]] and clicked["slice_index"] == 1
    # The job's encodings served the click: nothing new was encoded on the server.
    assert server_health(live.url, live.tokens["alice"])["cache_bytes"] == cached

    second = session_request(remote, click(session_id, 1, [[20, 20]], [0]))
    np.testing.assert_array_equal(second["mask"], local["second click"])
    undone = session_request(remote, protocol.SessionUndoClick(id="u", session_id=session_id, structure="1", axis=0,
                                                               slice_index=1))
    np.testing.assert_array_equal(undone["mask"], local["undo"])
    assert undone["clicks"] == [[30.0, 8.0, 1]]
    cleared = session_request(remote, protocol.SessionClearClicks(id="c", session_id=session_id, structure="1",
                                                                  axis=0, slice_index=1))
    np.testing.assert_array_equal(cleared["mask"], before[1])
    np.testing.assert_array_equal(cleared["mask"], local["clear"])
    assert cleared["clicks"] == []

    session_request(remote, click(session_id, 1, [[30, 8]], [1]))
    painted = session_request(remote, protocol.SessionAddSupport(id="a", session_id=session_id, structure="1", axis=0,
                                                                 slice_index=4, mask=local["painted"]))
    np.testing.assert_array_equal(painted["mask"], local["paint"])
    progress = []
    updated = session_request(remote, update(session_id), lambda done, total: progress.append((done, total)))
    np.testing.assert_array_equal(updated["mask"], local["update"])
    np.testing.assert_array_equal(updated["mask"][4], local["painted"])  # hand-corrected slices survive the update
    assert updated["fixed_slices"] == [1, 3, 4]
    assert progress and progress[-1][0] == progress[-1][1] > 0
    assert [done for done, _ in progress] == sorted(done for done, _ in progress)
    assert session_request(remote, close(session_id)) == {"closed": True}


def test_close_frees_the_session_and_its_encodings(live, tiny_models):
    release(live, "alice")
    volume, mask = box_volume(seed=1)
    session_id, _ = adopted(live, tiny_models, volume, mask)
    assert server_health(live.url, live.tokens["alice"])["cache_bytes"] > 0
    response = post_request(live, "alice", close(session_id))
    assert response.status_code == 200 and protocol.decode(response.content).value == {"closed": True}
    assert server_health(live.url, live.tokens["alice"])["cache_bytes"] == 0
    response = post_request(live, "alice", click(session_id, 1, [[30, 8]], [1]))
    assert response.status_code == 404 and "No such correction session" in response.json()["message"]


def test_another_users_token_gets_404_on_the_session(live, tiny_models):
    volume, mask = box_volume(seed=2)
    session_id, value = adopted(live, tiny_models, volume, mask)
    made_up = post_request(live, "bob", click("x" * 32, 1, [[30, 8]], [1]))
    assert made_up.status_code == 404
    for message in (click(session_id, 1, [[30, 8]], [1]), close(session_id),
                    protocol.SessionUndoClick(id="u", session_id=session_id, structure="1", axis=0, slice_index=1)):
        response = post_request(live, "bob", message)
        assert response.status_code == 404 and response.json() == made_up.json()  # same answer as a made-up id
    response = httpx.post(live.url + "/v1/jobs", content=protocol.encode(update(session_id)),
                          headers=headers(live, "bob"))
    assert response.status_code == 404
    # Bob's release does not touch alice's session; it still answers alice.
    release(live, "bob")
    clicked = session_request(connection(live), click(session_id, 1, [[30, 8]], [1]))
    assert clicked["mask"].shape == (40, 40)
    session_request(connection(live), close(session_id))


def test_the_session_limit_is_a_clear_429_until_one_is_closed(live, tiny_models):
    release(live, "alice")
    volume, mask = box_volume(seed=3)
    value = run_job(live, tiny_models, volume, mask)
    messages = [open_message(tiny_models, volume, value["masks"]["1"], [3]) for _ in range(3)]
    for message in messages[:2]:
        session_request(connection(live), message)
    response = httpx.post(live.url + "/v1/jobs", content=protocol.encode(messages[2]), headers=headers(live, "alice"))
    assert response.status_code == 429
    assert "limit is 2" in response.json()["message"] and "close one" in response.json()["message"]
    # Reopening an open session's id replaces it: not a new session.
    session_request(connection(live), dataclasses.replace(messages[0], id=protocol.new_id()))
    # Bob's limit is his own.
    bob_value = run_job(live, tiny_models, volume, mask, "bob")
    session_request(connection(live, "bob"), open_message(tiny_models, volume, bob_value["masks"]["1"], [3]))
    session_request(connection(live), close(messages[0].session_id))
    session_request(connection(live), messages[2])
    release(live, "alice")
    release(live, "bob")


def test_releasing_the_caches_closes_the_users_sessions(live, tiny_models):
    volume, mask = box_volume(seed=4)
    session_id, _ = adopted(live, tiny_models, volume, mask)
    release(live, "alice")
    assert server_health(live.url, live.tokens["alice"])["cache_bytes"] == 0
    assert post_request(live, "alice", click(session_id, 1, [[30, 8]], [1])).status_code == 404


def test_cancel_of_an_update_stops_it_and_the_session_goes_on(live, tiny_models):
    release(live, "alice")
    volume, mask = box_volume(slices=24, seed=5)
    session_id, value = adopted(live, tiny_models, volume, mask)
    remote = connection(live)
    cancel = threading.Event()
    with pytest.raises(CancelledError) as caught:
        session_request(remote, update(session_id), lambda done, total: cancel.set() if done >= 1 else None, cancel)
    assert caught.value.details["done_at_stop"] <= caught.value.details["done_at_cancel"] + 1 < 24
    # The cancelled update changed nothing: a click answers from the adopted result.
    clicked = session_request(remote, click(session_id, 2, [[30, 8]], [1]))
    assert clicked["mask"].shape == (40, 40)
    updated = session_request(remote, update(session_id))
    assert updated["mask"].shape == volume.shape and updated["fixed_slices"] == [2, 12]
    session_request(remote, close(session_id))


def test_a_click_does_not_wait_behind_another_users_long_job(live, tiny_models):
    release(live, "alice")
    volume, mask = box_volume(seed=6)
    session_id, _ = adopted(live, tiny_models, volume, mask)
    long_volume, long_mask = box_volume(slices=48, seed=7)
    response = httpx.post(live.url + "/v1/jobs", content=protocol.encode(job_request(tiny_models, long_volume, long_mask)),
                          headers=headers(live, "bob"))
    job_id = response.json()["id"]
    state = ""
    while state != "running":
        poll = httpx.get(f"{live.url}/v1/jobs/{job_id}", params={"wait": 1}, headers=headers(live, "bob"), timeout=40)
        state = poll.headers.get("X-ProtoSAM-Job-State", "finished")
        assert state != "finished", "bob's job ended before the click could be tried"
    started = time.monotonic()
    clicked = session_request(connection(live), click(session_id, 1, [[30, 8]], [1]))
    seconds = time.monotonic() - started
    poll = httpx.get(f"{live.url}/v1/jobs/{job_id}", headers=headers(live, "bob"))
    assert poll.headers.get("X-ProtoSAM-Job-State") == "running"  # answered while bob's job still ran
    assert clicked["mask"].shape == (40, 40) and seconds < 30
    httpx.delete(f"{live.url}/v1/jobs/{job_id}", headers=headers(live, "bob"))
    session_request(connection(live), close(session_id))


def test_a_click_during_the_sessions_own_update_is_refused_with_409(live, tiny_models):
    release(live, "alice")
    volume, mask = box_volume(slices=48, seed=8)
    session_id, _ = adopted(live, tiny_models, volume, mask)
    response = httpx.post(live.url + "/v1/jobs", content=protocol.encode(update(session_id)),
                          headers=headers(live, "alice"))
    job_id = response.json()["id"]
    done = -1
    while done < 1:  # the update is past its first slice: it holds the session
        poll = httpx.get(f"{live.url}/v1/jobs/{job_id}", params={"done": done, "wait": 1},
                         headers=headers(live, "alice"), timeout=40)
        message = protocol.decode(poll.content)
        assert isinstance(message, protocol.JobProgress), "the update ended before the click could be tried"
        done = message.done
    response = post_request(live, "alice", click(session_id, 1, [[30, 8]], [1]))
    assert response.status_code == 409 and "updating" in response.json()["message"]
    httpx.post(f"{live.url}/v1/jobs/{job_id}/cancel", headers=headers(live, "alice"))
    session_request(connection(live), close(session_id))


def test_boxes_lassos_scribbles_undo_and_negatives_over_http_with_the_click_checks(live, tiny_models):
    """The gesture messages are answered like clicks: the slice's mask and corrections, undo
    restores, the engine's refusals and malformed messages are 400s, another user's token 404."""
    release(live, "alice")
    volume, mask = box_volume(seed=5)
    session_id, value = adopted(live, tiny_models, volume, mask)
    remote = connection(live)
    target = dict(session_id=session_id, structure="1", axis=0, slice_index=1)
    boxed = session_request(remote, protocol.SessionBox(id="b", **target, box=[6, 6, 30, 30]))
    assert boxed["corrections"] == ["box"] and boxed["slice_index"] == 1
    lassoed = session_request(remote, protocol.SessionLasso(id="l", **target, points=[[0, 0], [39, 0], [39, 15], [0, 15]],
                                                            positive=False))
    assert not lassoed["mask"][:16].any() and lassoed["corrections"] == ["box", "lasso"]
    scribbled = session_request(remote, protocol.SessionScribble(id="s", **target, points=[[10, 20], [20, 20]],
                                                                 positive=True))
    assert scribbled["mask"][20, 10:21].all() and scribbled["corrections"] == ["box", "lasso", "scribble"]
    undone = session_request(remote, protocol.SessionUndo(id="u", **target))
    np.testing.assert_array_equal(undone["mask"], lassoed["mask"])
    # The engine's refusal: a lasso needs three points (400, InputError, its message).
    response = post_request(live, "alice", protocol.SessionLasso(id="x", **target, points=[[1, 1], [2, 2]],
                                                                 positive=True))
    assert response.status_code == 400 and response.json()["error_type"] == "InputError"
    assert "at least 3" in response.json()["message"]
    # A malformed message: too many points (400, ProtocolError), before any session is looked up.
    raw = {"type": "session_scribble", "fields": dict(target, id="m", points=[[1, 1]] * 10_001, positive=True),
           "arrays": []}
    header = json.dumps(raw).encode()
    body = struct.pack("<4sIQQ", b"PSAM", protocol.PROTOCOL_VERSION, len(header), 0) + header
    response = httpx.post(live.url + "/v1/requests", content=body, headers=headers(live, "alice"), timeout=60)
    assert response.status_code == 400 and "10000" in response.json()["message"]
    # Another user's token: 404, as for clicks.
    assert post_request(live, "bob", protocol.SessionUndo(id="u2", **target)).status_code == 404
    negatives = np.zeros(volume.shape, np.uint8)
    negatives[:, :20] = 1
    assert session_request(remote, protocol.SessionSetNegatives(id="n", session_id=session_id, structure="1",
                                                                negatives=negatives)) == {"negatives": True}
    response = post_request(live, "alice", protocol.SessionSetNegatives(id="n2", session_id=session_id, structure="1",
                                                                        negatives=negatives[:2]))
    assert response.status_code == 400 and response.json()["error_type"] == "InputError"
    updated = session_request(remote, update(session_id))
    np.testing.assert_array_equal(updated["mask"][1], undone["mask"])  # the corrected slice is kept
    propagated = [k for k in range(volume.shape[0]) if k not in updated["fixed_slices"]]
    assert updated["fixed_slices"] == [1, 3] and not updated["mask"][propagated, :20].any()
    assert value["masks"]["1"][propagated, 10:20].any()  # which the negatives removed
    assert session_request(remote, close(session_id)) == {"closed": True}
    assert post_request(live, "alice", protocol.SessionUndo(id="u3", **target)).status_code == 404


def test_session_messages_on_the_wrong_endpoint_are_clear_400s(live, tiny_models):
    volume, mask = box_volume(seed=9)
    response = post_request(live, "alice", open_message(tiny_models, volume, mask, [3]))
    assert response.status_code == 400 and "/v1/jobs" in response.json()["message"]
    response = httpx.post(live.url + "/v1/jobs", content=protocol.encode(click("s", 1, [[1, 1]], [1])),
                          headers=headers(live, "alice"))
    assert response.status_code == 400 and "/v1/requests" in response.json()["message"]


def test_idle_sessions_expire_and_are_freed(tiny_models, tmp_path):
    server = start_server(tiny_models, tmp_path / "expiring", users=("alice",),
                          extra_args=["--session-idle-minutes", "0.05"])  # 3 s
    try:
        volume, mask = box_volume(seed=10)
        session_id, _ = adopted(server, tiny_models, volume, mask)
        assert server_health(server.url, server.tokens["alice"])["cache_bytes"] > 0
        deadline = time.monotonic() + 30
        while server_health(server.url, server.tokens["alice"])["cache_bytes"] and time.monotonic() < deadline:
            time.sleep(0.5)
        assert server_health(server.url, server.tokens["alice"])["cache_bytes"] == 0
        assert post_request(server, "alice", click(session_id, 1, [[30, 8]], [1])).status_code == 404
        assert "idle correction session(s) of alice expired" in server.log()
    finally:
        server.stop()


# --------------------------------------------------------------------------- in-process (no HTTP)
def scheduler_for(models, budget):
    from protosam.serving import scheduler

    served = {"dinov2": models.dinov2, "dinov2_checkpoint": models.dinov2_checkpoint, "sam": models.sam,
              "sam_checkpoint": models.sam_checkpoint, "input_size": models.input_size}
    return scheduler.JobScheduler(scheduler.ServerConfig(models=served, tokens={"t" * 20: "alice"}, device="cpu",
                                                   download=False, cache_bytes_per_user=budget))


def finish(scheduler, job, timeout=300):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        state, _, _, reply = scheduler.snapshot(job)
        if reply is not None:
            return protocol.decode(reply)
        time.sleep(0.05)
    raise AssertionError("the job did not finish")


def test_sessions_volumes_and_encodings_share_the_users_budget(tiny_models):
    from protosam.serving.scheduler import ServerError

    volume, mask = box_volume(seed=11)
    arrays = volume.size * 4 + volume.size  # the session's float32 volume and uint8 mask
    budget = arrays + 8 * 1024 * 1024
    scheduler = scheduler_for(tiny_models, budget)
    scheduler.start()
    try:
        message = protocol.SessionOpen(id="o", session_id="s", engine=engine_spec(tiny_models),
                                       volume=protocol.Image(volume), structures={"1": mask},
                                       options={"axis": 0, "modality": "auto"})
        reply = finish(scheduler, scheduler.submit_session_job("alice", message))
        assert isinstance(reply, protocol.JobResult), reply
        cache = scheduler._caches["alice"]
        # The encodings are in the user's one cache, bounded by the budget minus what the session
        # holds: its volume and mask, and the rest of its state (prompt sets, evidence ...).
        held = scheduler._sessions["alice"].array_bytes()
        assert held > arrays and cache.max_bytes == budget - held and cache.nbytes > 0
        assert scheduler.health("alice", "h").cache_bytes == cache.nbytes
        # A second session that cannot fit beside it is refused before anything runs.
        too_big = dataclasses.replace(message, session_id="t", volume=protocol.Image(np.zeros((6, 400, 1000), np.float32)),
                                      structures={"1": np.zeros((6, 400, 1000), np.uint8)})
        with pytest.raises(ServerError) as caught:
            scheduler.submit_session_job("alice", too_big)
        assert caught.value.status == 413 and "--cache-mb-per-user" in str(caught.value)
        scheduler.session_request("alice", close("s"))
        assert cache.nbytes == 0 and cache.max_bytes == budget  # the session's arrays are given back
    finally:
        scheduler.stop()


def test_the_budget_counts_an_exclusive_sessions_kept_probabilities(tiny_models):
    """An exclusive session keeps each structure's refined probability per propagated slice
    (float32 crops): the server counts them, with the prompt masks and the rest of the session's
    state, against the user's budget (it counted the volume and the output masks only, so the
    encoder cache could take what the probabilities already held)."""
    volume, mask = box_volume(seed=11)
    second = np.zeros_like(mask)
    second[3, 4:14, 4:14] = 1  # another structure beside the box
    budget = 64 * 1024 * 1024
    scheduler = scheduler_for(tiny_models, budget)
    scheduler.start()
    try:
        message = protocol.SessionOpen(id="o", session_id="x", engine=engine_spec(tiny_models),
                                       volume=protocol.Image(volume), structures={"1": mask, "2": second},
                                       options={"axis": 0, "modality": "auto", "exclusive": True})
        reply = finish(scheduler, scheduler.submit_session_job("alice", message))
        assert isinstance(reply, protocol.JobResult), reply
        sessions = scheduler._sessions["alice"]
        (session,) = sessions._sessions.values()
        states = list(session.structures.values())
        probabilities = sum(crop.nbytes for state in states for (_, _, crop) in (state.probabilities or {}).values())
        prompt_masks = sum(m.values.nbytes for state in states for masks in state.prompt_masks.values() for m in masks)
        assert probabilities > 0 and prompt_masks > 0
        at_least = session.volume.nbytes + sum(state.output.nbytes for state in states) + probabilities + prompt_masks
        assert sessions.array_bytes() >= at_least
        assert scheduler._caches["alice"].max_bytes == budget - sessions.array_bytes()
    finally:
        scheduler.stop()


def test_queued_session_opens_count_against_the_users_budget(tiny_models):
    volume, mask = box_volume(seed=11)
    needed = volume.size * 4 + volume.size
    scheduler = scheduler_for(tiny_models, needed * 3 // 2)  # room for one open, not two
    # Not started: the runner is "busy", every open stays queued with its volume in memory.
    message = protocol.SessionOpen(id="o", session_id="s1", engine=engine_spec(tiny_models),
                                   volume=protocol.Image(volume), structures={"1": mask},
                                   options={"axis": 0, "modality": "auto"})
    first = scheduler.submit_session_job("alice", message)
    from protosam.serving.scheduler import ServerError

    with pytest.raises(ServerError) as caught:
        scheduler.submit_session_job("alice", dataclasses.replace(message, session_id="s2"))
    assert caught.value.status == 413 and "--cache-mb-per-user" in str(caught.value)
    scheduler.cancel("alice", first.id)  # a cancelled open gives its bytes back
    assert scheduler.submit_session_job("alice", dataclasses.replace(message, session_id="s3")).state == "queued"
    scheduler.stop()


def test_closing_a_session_on_a_shared_cache_keeps_other_volumes_encodings(tiny_models):
    from protosam import Engine
    from protosam.cache import EmbeddingCache
    from protosam.session import Session

    engine = Engine(tiny_models, preset="default", device="cpu", cache_bytes=CACHE)
    first, first_mask = box_volume(seed=12)
    second, second_mask = box_volume(seed=13)
    sessions = []
    for volume, mask in ((first, first_mask), (second, second_mask)):
        session = Session(engine, volume, cache_bytes=None)
        session.start({"1": mask})
        sessions.append(session)
    both = engine.cache.nbytes
    sessions[0].close()
    assert 0 < engine.cache.nbytes < both  # only the first volume's encodings went
    assert all(key[1] == sessions[1].fingerprint for key in engine.cache._items)
    own = Session(engine, first, cache_bytes=CACHE)
    own.start({"1": first_mask})
    own.close()
    assert own.cache.nbytes == 0
    cache = EmbeddingCache(1000)
    import torch

    for key in range(4):
        cache.put(key, torch.zeros(50))  # 200 bytes each
    cache.resize(500)
    assert len(cache) == 2 and cache.nbytes == 400 and cache.get(3) is not None and cache.get(0) is None
    assert cache.discard(lambda key: key == 3) == 200 and cache.nbytes == 200
