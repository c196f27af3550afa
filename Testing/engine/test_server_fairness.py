"""Fair share between users on a ProtoSAM server (issue 22, item 7): jobs of different users take
turns slice by slice (round-robin by user), so one user's short job does not wait behind
another user's long one, and every job's result stays bit for bit what it is alone.

In-process JobScheduler (no HTTP: the scheduling is the scheduler's), tiny random-weight models
on the CPU with one torch thread. Fair share is checked on the order of the turns (which job
computed between which slice boundaries), recorded where the jobs hand the turn on, not on wall
clock times: a shared CI machine slowed one measured run fourfold, and timing bounds either
fail on such noise or are too loose to tell anything.
"""
from __future__ import annotations

import threading
import time

import pytest

from protosam.serving import protocol

from engine_helpers import box_volume, cpu_engine_spec, segment_volume_request

#: A's job is long enough that B's (taking turns with it) ends long before A's does; without fair
#: share B would wait for all of A's slices.
LONG_SLICES = 48
SHORT_SLICES = 3


def scheduler_for(models, users=("alice", "bob", "carol"), max_jobs=8):
    from protosam.serving import scheduler

    served = {"dinov2": models.dinov2, "dinov2_checkpoint": models.dinov2_checkpoint, "sam": models.sam,
              "sam_checkpoint": models.sam_checkpoint, "input_size": models.input_size}
    tokens = {user[0] * 20: user for user in users}
    return scheduler.JobScheduler(scheduler.ServerConfig(models=served, tokens=tokens, device="cpu", download=False,
                                                         max_jobs_per_user=max_jobs))


def request(models, slices, seed):
    return segment_volume_request(models, *box_volume(slices=slices, seed=seed))  # cache_bytes=0: nothing cached


def finish(scheduler, job, timeout=600):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        reply = scheduler.snapshot(job)[3]
        if reply is not None:
            return protocol.decode(reply)
        time.sleep(0.01)
    raise AssertionError("the job did not finish")


def wait_until_running(scheduler, job, done=1, timeout=300):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        state, job_done, _, _ = scheduler.snapshot(job)
        assert state != "finished", "the job ended before the test could go on"
        if state == "running" and job_done >= done:
            return
        time.sleep(0.005)
    raise AssertionError("the job did not start")


def value_of(reply):
    assert isinstance(reply, protocol.JobResult), reply
    return reply.value


def assert_identical(value, expected):
    assert set(value["masks"]) == set(expected["masks"]) == {"1"}
    assert expected["masks"]["1"].any()
    assert value["masks"]["1"].dtype == expected["masks"]["1"].dtype
    assert value["masks"]["1"].tobytes() == expected["masks"]["1"].tobytes()  # bit for bit
    assert value["support_slices"] == expected["support_slices"]
    assert value["processed_slices"] == expected["processed_slices"]


@pytest.fixture
def scheduler(tiny_models, one_thread):
    scheduler = scheduler_for(tiny_models)
    scheduler.start()
    yield scheduler
    scheduler.stop()


@pytest.fixture
def turns(scheduler, monkeypatch):
    """Every slice boundary at which a running job offers the turn to the next user, in order:
    (user, slices done). Recorded by wrapping the scheduler's own hand-over, which it still does."""
    boundaries = []
    hand_over = scheduler._take_turns

    def recorded(job):
        boundaries.append((job.user, job.done))
        hand_over(job)

    monkeypatch.setattr(scheduler, "_take_turns", recorded)
    return boundaries


def assert_took_turns(turns, first, long_user, short_user):
    """From index ``first`` of the turn log (taken just before the short job was submitted) to
    the short job's last slice boundary, the two jobs alternated: the long job computed at most
    one slice between two of the short job's boundaries. Before the short job's first boundary
    the long one may pass two: the one at which the short job started, and one more when the
    submission came just after a boundary was recorded but before the turn was handed on."""
    users = [user for user, _ in turns[first:]]
    assert short_user in users, f"the short job never took a turn: {users}"
    last = len(users) - 1 - users[::-1].index(short_user)
    users = users[:last + 1]
    assert users.index(short_user) <= 2, f"the short job waited for {users.index(short_user)} of the long job's slices: {users}"
    for previous, following in zip(users, users[1:]):
        assert (previous, following) != (long_user, long_user), f"the long job ran two slices in a row: {users}"
    return users


def job_threads():
    return [thread for thread in threading.enumerate() if thread.name.startswith("protosam-job-")]


def test_a_short_job_finishes_during_another_users_long_job_with_identical_results(scheduler, turns, tiny_models):
    long_request = request(tiny_models, LONG_SLICES, seed=1)
    short_request = request(tiny_models, SHORT_SLICES, seed=2)
    short_alone = value_of(finish(scheduler, scheduler.submit("bob", short_request)))
    long_alone = value_of(finish(scheduler, scheduler.submit("alice", long_request)))

    long_job = scheduler.submit("alice", long_request)
    wait_until_running(scheduler, long_job)
    first = len(turns)
    started = time.monotonic()
    short_job = scheduler.submit("bob", short_request)
    short_reply = finish(scheduler, short_job)
    b_beside_s = time.monotonic() - started
    state, a_done, a_total, _ = scheduler.snapshot(long_job)
    users = assert_took_turns(turns, first, "alice", "bob")
    print(f"B beside A {b_beside_s:.2f} s, A at {a_done}/{a_total} slices when B finished; turns: {users}")
    # B finished while A still ran (without fair share B would wait for all of A's slices) ...
    assert state == "running" and a_done < a_total
    # ... A still finishes, and both results are bit for bit those of the jobs alone.
    long_value = value_of(finish(scheduler, long_job))
    assert_identical(long_value, long_alone)
    assert_identical(value_of(short_reply), short_alone)
    deadline = time.monotonic() + 30
    while job_threads() and time.monotonic() < deadline:  # a job's thread ends once it is finished
        time.sleep(0.01)
    assert not job_threads()


def test_turns_go_round_robin_by_user_and_a_users_jobs_run_in_submission_order(scheduler, tiny_models):
    """Three users with long jobs (alice two of them): one job thread per user with work; while
    they run, every user's job advances (turns go round), alice's second job stays queued until
    her first ends, and all finish with their results alone."""
    requests = {name: request(tiny_models, 12, seed=seed)
                for name, seed in (("alice 1", 3), ("alice 2", 4), ("bob", 5), ("carol", 6))}
    alone = {name: value_of(finish(scheduler, scheduler.submit(name.split()[0], message)))
             for name, message in requests.items()}
    jobs = {name: scheduler.submit(name.split()[0], message) for name, message in requests.items()}
    wait_until_running(scheduler, jobs["carol"], done=2)
    snapshots = {name: scheduler.snapshot(job) for name, job in jobs.items()}
    assert snapshots["alice 2"][0] == "queued"  # one job at a time per user, in submission order
    for name in ("alice 1", "bob"):
        state, done, total, _ = snapshots[name]
        assert state == "running" and 1 <= done < total, (name, snapshots[name])
    assert len(job_threads()) <= 3  # one thread per user with work
    health = scheduler.health("alice", "h")
    assert health.running_job == jobs["alice 1"].id and health.queued_jobs == 1
    for name, job in jobs.items():
        assert_identical(value_of(finish(scheduler, job)), alone[name])


def test_cancel_of_a_job_waiting_for_its_turn_stops_it_within_a_slice(scheduler, tiny_models):
    long_job = scheduler.submit("alice", request(tiny_models, LONG_SLICES, seed=1))
    wait_until_running(scheduler, long_job)
    other = scheduler.submit("bob", request(tiny_models, LONG_SLICES, seed=2))
    wait_until_running(scheduler, other, done=2)
    scheduler.cancel("bob", other.id)
    reply = finish(scheduler, other, timeout=120)
    assert isinstance(reply, protocol.ErrorReply) and reply.error_type == "CancelledError"
    assert reply.details["done_at_stop"] <= reply.details["done_at_cancel"] + 1 < LONG_SLICES
    assert scheduler.snapshot(long_job)[0] == "running"  # alice's job goes on
    scheduler.cancel("alice", long_job.id)
    assert finish(scheduler, long_job, timeout=120).error_type == "CancelledError"
    queued = scheduler.submit("carol", request(tiny_models, SHORT_SLICES, seed=3))
    assert isinstance(finish(scheduler, queued), protocol.JobResult)  # the device is free again


def test_a_session_open_takes_turns_with_another_users_job_and_opens_as_alone(scheduler, turns, tiny_models):
    volume, mask = box_volume(slices=12, seed=7)

    def open_session(session_id):
        return scheduler.submit_session_job("carol", protocol.SessionOpen(
            id=protocol.new_id(), session_id=session_id, engine=cpu_engine_spec(tiny_models),
            volume=protocol.Image(volume), structures={"1": mask}, options={"axis": 0, "modality": "auto"}))

    alone = value_of(finish(scheduler, open_session("alone")))
    long_job = scheduler.submit("alice", request(tiny_models, LONG_SLICES, seed=1))
    wait_until_running(scheduler, long_job)
    first = len(turns)
    beside = value_of(finish(scheduler, open_session("beside")))
    state, done, total, _ = scheduler.snapshot(long_job)
    assert state == "running" and done < total  # the open took turns with alice's job ...
    assert_took_turns(turns, first, "alice", "carol")  # ... slice by slice
    assert beside["masks"]["1"].tobytes() == alone["masks"]["1"].tobytes() and alone["masks"]["1"].any()
    assert beside["fixed_slices"] == alone["fixed_slices"]
    scheduler.cancel("alice", long_job.id)
    assert finish(scheduler, long_job, timeout=120).error_type == "CancelledError"
