"""Stand-in for CTK's application launcher, which ``PythonSlicer`` is (CTK's ctkAppLauncher):
it starts the real interpreter as a CHILD process with the arguments it was given, forwards its
own stdin to it, waits, and exits with the child's exit code; when the child dies of a signal
(crash, ``kill -9``, the out-of-memory killer) it prints "[<app>] exit abnormally - Report the
problem." to stderr and exits with EXIT_FAILURE (ctkAppLauncherPrivate::applicationFinished).
Killing this process does not kill the child: the child sees EOF on its stdin instead.

Usage: ``python ctk_launcher_standin.py <python arguments...>``; the interpreter is this one's
``sys.executable``. ``PROTOSAM_TEST_LAUNCHER_DELAY_S`` delays the child's start (CTK sets up the
environment first), so tests can connect to the client's socket before the worker does.
"""
import os
import subprocess
import sys
import threading
import time


def forward(source, target):
    try:
        while True:
            chunk = os.read(source, 65536)  # unbuffered: a daemon thread must not hold stdin's lock at exit
            if not chunk:
                break
            target.write(chunk)
            target.flush()
    except (OSError, ValueError):
        pass
    try:
        target.close()
    except OSError:
        pass


def main():
    delay = float(os.environ.get("PROTOSAM_TEST_LAUNCHER_DELAY_S", "0") or 0)
    if delay:
        time.sleep(delay)
    application = sys.executable
    child = subprocess.Popen([application, *sys.argv[1:]], stdin=subprocess.PIPE)
    threading.Thread(target=forward, args=(sys.stdin.fileno(), child.stdin), daemon=True).start()
    code = child.wait()
    if code < 0:
        print(f"[{application}] exit abnormally - Report the problem.", file=sys.stderr, flush=True)
        return 1
    return code


if __name__ == "__main__":
    status = main()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(status)
