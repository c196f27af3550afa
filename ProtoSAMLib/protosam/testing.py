"""Tiny random-weight models in the official checkpoint formats, for tests, self-tests and CI.

They run the same loading and inference code as the published models, in a fraction of a
second per slice; their masks mean nothing.
"""
from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Union

import torch

from . import catalogue
from .engine import ModelSelection
from .models.dinov2 import DinoV2Encoder, PathLike, get_dinov2_architecture
from .models.sam import build_sam

__all__ = [
    "TINY_DINOV2", "TINY_SAM", "TINY_MEDSAM", "TINY_SAM2", "write_tiny_checkpoints", "write_tiny_medsam",
    "save_random_checkpoint", "save_random_sam_checkpoint", "save_random_sam2_checkpoint", "write_tiny_sam2_checkpoint",
    "start_server", "ServerProcess", "free_port",
]

TINY_DINOV2 = catalogue.TINY_DINOV2
TINY_SAM = catalogue.TINY_SAM
TINY_MEDSAM = catalogue.TINY_MEDSAM
TINY_SAM2 = catalogue.TINY_SAM2


def write_tiny_checkpoints(folder: Union[str, Path], *, input_size: int = 224, seed: int = 0) -> ModelSelection:
    """Write ``dinov2_tiny14.pth`` and ``sam_tiny.pth`` into ``folder`` (created if needed)
    unless present, and return a :class:`ModelSelection` that uses them."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    dinov2_path = folder / f"{TINY_DINOV2}.pth"
    sam_path = folder / f"{TINY_SAM}.pth"
    if not dinov2_path.exists():
        save_random_checkpoint(TINY_DINOV2, dinov2_path, seed=seed)
    if not sam_path.exists():
        save_random_sam_checkpoint(TINY_SAM, sam_path, seed=seed)
    return ModelSelection(
        dinov2=TINY_DINOV2, dinov2_checkpoint=str(dinov2_path), sam=TINY_SAM, sam_checkpoint=str(sam_path),
        input_size=input_size,
    )


def write_tiny_medsam(folder: Union[str, Path], *, seed: int = 0) -> Path:
    """Write ``medsam_tiny.pth`` (a box-only refiner, as MedSAM) into ``folder`` unless present;
    returns its path (use it with ``ModelSelection(sam=TINY_MEDSAM, sam_checkpoint=...)``)."""
    path = Path(folder) / f"{TINY_MEDSAM}.pth"
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        save_random_sam_checkpoint(TINY_MEDSAM, path, seed=seed)
    return path


# ----------------------------------------------------------------------------- random-weight checkpoints
def _randomize_(model: DinoV2Encoder, generator: torch.Generator) -> None:
    """Fill every parameter with non-degenerate random values (all drawn on the CPU, fixed order).

    Unlike the training init, layer-scale gammas, norms, biases and tokens all get values far
    from their defaults, and weights are scaled (1/sqrt(fan_in), qkv x 1.5) so activations stay
    O(1) and attention is peaked: features then depend measurably on every part of the model.
    """
    def normal(shape, std, mean=0.0):
        return torch.randn(shape, generator=generator) * std + mean

    with torch.no_grad():
        for key, param in model.named_parameters():
            shape = param.shape
            if key.endswith(".gamma"):
                value = normal(shape, 0.3, mean=0.5)
            elif key in ("pos_embed", "cls_token", "register_tokens", "mask_token"):
                value = normal(shape, 0.3)
            elif param.ndim == 1 and ("norm" in key.split(".")[-2]):
                value = normal(shape, 0.2, mean=1.0) if key.endswith("weight") else normal(shape, 0.1)
            elif key.endswith("bias"):
                value = normal(shape, 0.05)
            else:  # linear or conv weight: out x in (x kh x kw)
                fan_in = param[0].numel()
                value = normal(shape, (1.5 if ".qkv." in key else 1.0) / fan_in ** 0.5)
            param.copy_(value)


def save_random_checkpoint(name: str, path: PathLike, seed: int = 0) -> Path:
    """Write a random-weight checkpoint in Meta's file format and return its path.

    The file is a plain ``torch.save``-d state dict with the official keys, shapes and order
    (float32, CPU), written atomically. The same ``seed`` gives the same weights on any machine.
    For tests, self-checks and benchmarks; the values are not a trained model.
    """
    arch = get_dinov2_architecture(name)
    path = Path(path)
    with torch.device("meta"):
        model = DinoV2Encoder(arch)
    model = model.to_empty(device="cpu")
    _randomize_(model, torch.Generator().manual_seed(int(seed)))
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(path.name + ".partial")
    torch.save({k: v.detach().contiguous() for k, v in model.state_dict().items()}, partial)
    os.replace(partial, path)
    return path


def save_random_sam_checkpoint(name: str, path, seed: int = 0) -> None:
    """Write a random-weight SAM checkpoint in the official format (a plain state dict)."""
    torch.manual_seed(seed)
    torch.save(build_sam(name).state_dict(), path)


def save_random_sam2_checkpoint(name: str, path, seed: int = 0) -> Path:
    """Write a random-weight SAM 2 checkpoint in the official format (``{"model": state_dict}``,
    as Meta's ``sam2.1_hiera_*.pt`` files and MedSAM2's are) and return its path.

    The sam2 package's own initialisation leaves some tensors at zero (Hiera's position
    embeddings, ...) or constant (norms); every tensor gets random values here, so every part
    of the model changes the masks measurably (the parity test relies on it)."""
    from .models.sam2_refiner import build_sam2_model

    model = build_sam2_model(name)
    with torch.no_grad():
        for key, tensor in model.state_dict().items():
            if not tensor.is_floating_point():
                continue
            # Each tensor from its own stream (seed and name): resizing one module of the test
            # model leaves every other tensor's values as they were.
            stream = int.from_bytes(hashlib.blake2b(f"{seed}:{key}".encode(), digest_size=8).digest(), "little")
            noise = torch.randn(tensor.shape, generator=torch.Generator().manual_seed(stream))
            if tensor.ndim >= 2:  # linear or conv weight, embeddings: O(1) activations
                fan_in = tensor[0].numel() if tensor.ndim > 1 else 1
                tensor.copy_(noise / max(fan_in, 1) ** 0.5)
            elif key.endswith("weight"):  # norm scales around 1
                tensor.copy_(1.0 + 0.2 * noise)
            else:
                tensor.copy_(0.05 * noise)
        # Random object scores can say "no object" on every slice, and the video predictor then
        # gives empty masks that no memory can change: the test model sees its object, so memory
        # mode's tests see the memory's effect (the image predictor does not read this score).
        model.state_dict()["sam_mask_decoder.pred_obj_score_head.layers.2.bias"].fill_(4.0)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(path.name + ".partial")
    torch.save({"model": {k: v.detach().contiguous() for k, v in model.state_dict().items()}}, partial)
    os.replace(partial, path)
    return path


def write_tiny_sam2_checkpoint(folder: Union[str, Path], *, input_size: int = 224, seed: int = 0) -> ModelSelection:
    """:func:`write_tiny_checkpoints` with the tiny SAM 2 as the refiner (``sam2_tiny.pt``)."""
    selection = write_tiny_checkpoints(folder, input_size=input_size, seed=seed)
    path = Path(folder) / f"{TINY_SAM2}.pt"
    if not path.exists():
        save_random_sam2_checkpoint(TINY_SAM2, path, seed=seed)
    return ModelSelection(dinov2=selection.dinov2, dinov2_checkpoint=selection.dinov2_checkpoint, sam=TINY_SAM2,
                          sam_checkpoint=str(path), input_size=input_size)


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
    tokens_file.chmod(0o600)  # the server refuses a tokens file others can read
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
