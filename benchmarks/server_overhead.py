"""Overhead of the ProtoSAM server against an in-process run of the same job.

Both sides run the same job code (``protosam.serving.worker_process.run_job``) on the CPU with the same
torch thread count; the server is a real ``protosam serve`` process on 127.0.0.1 reached through
the worker's forwarding client (``protosam.serving.client.forward_job``: encode, HTTP upload,
long-polled progress, result download, decode). Models are loaded by one untimed warm-up run
on each side, so the figures are per-job overhead: transfers, (de)serialisation, polling.
The "not compute" line subtracts the server's own segment_volume time from the client's wall
time: it does not depend on how fast the two processes happened to compute (on a shared
machine their compute times differ by more than the transport costs).

    python benchmarks/server_overhead.py                    # tiny random-weight models
    python benchmarks/server_overhead.py --vitb             # DINOv2 ViT-B/14 + SAM ViT-B
                                                            # (official weights in the cache)

Wall times are medians over ``--repeats`` runs; the masks of both sides are checked identical.
"""
from __future__ import annotations

import argparse
import dataclasses
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "ProtoSAMLib"))

from protosam.serving import protocol  # noqa: E402
from protosam.engine import ModelSelection  # noqa: E402
from protosam.serving.client import forward_job, forwarding_request  # noqa: E402
from protosam.testing import start_server, write_tiny_checkpoints  # noqa: E402
from protosam.serving.worker_process import Engines, run_job  # noqa: E402


def make_request(models: ModelSelection, slices: int, size: int) -> protocol.JobSubmit:
    rng = np.random.default_rng(0)
    volume = rng.normal(100.0, 20.0, size=(slices, size, size)).astype(np.float32)
    box = (slice(None), slice(size // 4, size * 3 // 4), slice(size // 4, size * 3 // 4))
    volume[box] += 80.0
    mask = np.zeros(volume.shape, np.uint8)
    mask[slices // 2][box[1:]] = 1
    engine = protocol.EngineSpec(models=dataclasses.asdict(models), preset="default", device="cpu", download=False)
    return protocol.JobSubmit(id=protocol.new_id(), operation="segment_volume", engine=dataclasses.asdict(engine),
                              kwargs=dict(query_volume=volume, support_volume=None, support_masks={"1": mask}, axis=0,
                                          support_slices=None, slice_range=None, modality="auto", auto_extent=False))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--vitb", action="store_true", help="DINOv2 ViT-B/14 + SAM ViT-B instead of tiny models")
    parser.add_argument("--slices", type=int, default=8)
    parser.add_argument("--size", type=int, default=256, help="slice height and width (pixels)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1, help="torch threads on both sides")
    args = parser.parse_args()

    import torch

    torch.set_num_threads(args.threads)
    folder = Path(tempfile.mkdtemp(prefix="protosam-server-bench-"))
    models = ModelSelection() if args.vitb else write_tiny_checkpoints(folder / "models", input_size=112)
    request = make_request(models, args.slices, args.size)
    nothing = threading.Event()

    engines = Engines()
    run_job(engines, request, lambda done, total: None, nothing)  # warm-up: loads the models
    local_times, local_value = [], None
    for _ in range(args.repeats):
        started = time.perf_counter()
        local_value = run_job(engines, request, lambda done, total: None, nothing)
        local_times.append(time.perf_counter() - started)
    del engines

    server = start_server(models, folder / "server", users=("bench",), threads=args.threads)
    try:
        forwarded = forwarding_request(request, server.url, server.tokens["bench"])
        forward_job(forwarded, lambda done, total: None, nothing)  # warm-up: the server loads the models
        server_times, server_compute, server_value = [], [], None
        for _ in range(args.repeats):
            started = time.perf_counter()
            server_value = forward_job(forwarded, lambda done, total: None, nothing)
            server_times.append(time.perf_counter() - started)
            server_compute.append(server_value["seconds"])  # segment_volume's own wall time, on the server
    finally:
        server.stop()

    identical = np.array_equal(local_value["masks"]["1"], server_value["masks"]["1"])
    request_mb = len(protocol.encode(request)) / 1e6
    reply_mb = len(protocol.encode(protocol.JobResult(id="r", value=server_value))) / 1e6
    local, remote = statistics.median(local_times), statistics.median(server_times)
    transport = statistics.median(t - c for t, c in zip(server_times, server_compute))
    name = "DINOv2 ViT-B/14 + SAM ViT-B" if args.vitb else "tiny random-weight models"
    print(f"job: {args.slices} slices of {args.size}x{args.size}, {name}, CPU, {args.threads} torch thread(s), "
          f"median of {args.repeats}")
    print(f"request {request_mb:.2f} MB, reply {reply_mb:.2f} MB")
    print(f"in-process run_job : {local:8.3f} s   ({', '.join(f'{t:.3f}' for t in local_times)})")
    print(f"server (HTTP)      : {remote:8.3f} s   ({', '.join(f'{t:.3f}' for t in server_times)})")
    print(f"overhead           : {remote - local:+8.3f} s  ({(remote - local) / local * 100:+.1f} %)")
    print(f"of which not compute: {transport:7.3f} s   (client wall time minus segment_volume's time on the server: "
          "transfers, (de)serialisation, queueing, polling)")
    print(f"masks identical    : {identical}")
    return 0 if identical else 2


if __name__ == "__main__":
    sys.exit(main())
