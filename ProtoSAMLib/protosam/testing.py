"""Tiny random-weight models in the official checkpoint formats, for tests, self-tests and CI.

They run the same loading and inference code as the published models, in a fraction of a
second per slice; their masks mean nothing.
"""
from __future__ import annotations

from pathlib import Path
from typing import Union

from . import catalogue
from .models.dinov2 import save_random_checkpoint as save_random_dinov2_checkpoint
from .models.sam import save_random_sam_checkpoint
from .engine import ModelSelection

__all__ = ["TINY_DINOV2", "TINY_SAM", "write_tiny_checkpoints", "start_server", "ServerProcess", "free_port"]

TINY_DINOV2 = catalogue.TINY_DINOV2
TINY_SAM = catalogue.TINY_SAM


def write_tiny_checkpoints(folder: Union[str, Path], *, input_size: int = 224, seed: int = 0) -> ModelSelection:
    """Write ``dinov2_tiny14.pth`` and ``sam_tiny.pth`` into ``folder`` (created if needed)
    unless present, and return a :class:`ModelSelection` that uses them."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    dinov2_path = folder / f"{TINY_DINOV2}.pth"
    sam_path = folder / f"{TINY_SAM}.pth"
    if not dinov2_path.exists():
        save_random_dinov2_checkpoint(TINY_DINOV2, dinov2_path, seed=seed)
    if not sam_path.exists():
        save_random_sam_checkpoint(TINY_SAM, sam_path, seed=seed)
    return ModelSelection(
        dinov2=TINY_DINOV2, dinov2_checkpoint=str(dinov2_path), sam=TINY_SAM, sam_checkpoint=str(sam_path),
        input_size=input_size,
    )


# ----------------------------------------------------------------------------- test server
class ServerProcess:
    """A real ``protosam serve`` process on 127.0.0.1 (tests and benchmarks): ``url``,
    ``tokens`` (user -> token), ``log_path`` (its stdout and stderr)."""

    def __init__(self, process, url: str, tokens, log_path: Path):
        self.process, self.url, self.tokens, self.log_path = process, url, dict(tokens), log_path

    def log(self) -> str:
        return self.log_path.read_text(encoding="utf-8", errors="replace")

    def kill(self) -> None:
        """Kill it at once (SIGKILL), as a crash or a lost machine would."""
        if self.process.poll() is None:
            self.process.kill()
        self.process.wait(10)

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(15)
            except Exception:  # did not stop in time
                self.process.kill()
                self.process.wait(10)


def free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def start_server(models: ModelSelection, folder: Union[str, Path], *, users=("alice", "bob"), threads: int = 1,
                 extra_args=(), timeout: float = 180.0) -> ServerProcess:
    """Start ``python -m protosam serve`` with ``models`` on the CPU with ``threads`` torch
    threads, one random token per user (a tokens file in ``folder``), and wait for /health."""
    import os
    import secrets
    import subprocess
    import sys
    import time
    import urllib.request

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    tokens = {user: secrets.token_urlsafe(24) for user in users}
    tokens_file = folder / "tokens"
    tokens_file.write_text("".join(f"{user}:{token}\n" for user, token in tokens.items()), encoding="utf-8")
    port = free_port()
    command = [sys.executable, "-m", "protosam", "serve", "--host", "127.0.0.1", "--port", str(port),
               "--tokens", str(tokens_file), "--device", "cpu", "--no-download", "--threads", str(threads),
               "--dinov2", models.dinov2, "--sam", models.sam, "--input-size", str(models.input_size)]
    if models.dinov2_checkpoint:
        command += ["--dinov2-checkpoint", models.dinov2_checkpoint]
    if models.sam_checkpoint:
        command += ["--sam-checkpoint", models.sam_checkpoint]
    command += list(extra_args)
    environment = dict(os.environ, PROTOSAM_HOME=str(folder / "home"),
                       PYTHONPATH=os.pathsep.join([str(Path(__file__).resolve().parents[1])] + sys.path))
    log_path = folder / "server.log"
    log = open(log_path, "wb")
    process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=environment)
    log.close()
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + timeout
    while True:
        if process.poll() is not None:
            raise RuntimeError(f"protosam serve exited with {process.returncode}:\n{log_path.read_text()}")
        try:
            with urllib.request.urlopen(url + "/health", timeout=2) as response:
                if response.status == 200:
                    return ServerProcess(process, url, tokens, log_path)
        except OSError:
            pass
        if time.monotonic() > deadline:
            process.kill()
            raise RuntimeError(f"protosam serve did not answer within {timeout} s:\n{log_path.read_text()}")
        time.sleep(0.2)
