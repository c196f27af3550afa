"""The real worker process (protosam.serving.worker_process) with one change: a session update
is a slow, cancellable loop instead of a propagation, so tests can see how the client waits.

Started as the worker's "python": ``python slow_worker_standin.py -c <bootstrap> <engine path>
--connect ... --transfer-dir ...`` (the client's own command line). ``PROTOSAM_TEST_SLOW``:
``progress:<steps>:<seconds a step>`` reports progress after every step (like a propagation
reporting each slice); ``silent:<seconds>`` sends nothing until it ends. When the update sees
Cancel it writes ``cancelled <id>`` into the file ``PROTOSAM_TEST_SLOW_MARKER`` and raises
CancelledError, as the real update does at its next slice.
"""
import os
import sys
import time


def main():
    assert sys.argv[1] == "-c"
    bootstrap = sys.argv[2]
    sys.argv = ["-c", *sys.argv[3:]]
    sys.path.insert(0, sys.argv[1])
    from protosam.errors import CancelledError
    from protosam.serving import protocol, worker_process

    mode, *numbers = os.environ["PROTOSAM_TEST_SLOW"].split(":")
    original = worker_process.WorkerSessions.job

    def job(self, message, progress, cancel):
        if not isinstance(message, protocol.SessionUpdate):
            return original(self, message, progress, cancel)
        steps, step = (int(numbers[0]), float(numbers[1])) if mode == "progress" else (1, float(numbers[0]))
        for done in range(steps):
            deadline = time.monotonic() + step
            while time.monotonic() < deadline:
                if cancel.is_set():
                    with open(os.environ["PROTOSAM_TEST_SLOW_MARKER"], "a") as marker:
                        marker.write(f"cancelled {message.id}\n")
                    raise CancelledError("Cancelled by the client.")
                time.sleep(0.02)
            if mode == "progress":
                progress(done + 1, steps)
        return {"mask": [[0]], "fixed_slices": []}

    worker_process.WorkerSessions.job = job
    exec(compile(bootstrap, "<bootstrap>", "exec"), {"__name__": "__main__"})


if __name__ == "__main__":
    main()
