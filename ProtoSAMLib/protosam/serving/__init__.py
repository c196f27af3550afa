"""Serving: the engine behind a wire, for Slicer's worker process and for remote users.

* :mod:`.protocol` - the messages (JSON header + inline array blobs) and their checks;
* :mod:`.worker_process` - the persistent worker process a Slicer session starts, and
  :func:`~.worker_process.run_job`, the one place a request becomes engine work (the server runs it too);
* :mod:`.scheduler` - the server's job queue, runner thread, per-user limits and sessions (no HTTP);
* :mod:`.tokens` - the server's users and the constant-time token check;
* :mod:`.server` - the HTTP API (FastAPI) in front of the scheduler;
* :mod:`.client` - the client of a ProtoSAM server (the worker process forwards jobs with it).

``protosam serve`` is :mod:`protosam.cli.serve`. Nothing outside the command line and this package
imports it (docs/layout.md).
"""
