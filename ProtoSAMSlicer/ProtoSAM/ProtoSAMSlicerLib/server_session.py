"""A click-correction session held by a ProtoSAM server ("Compute on: ProtoSAM server").

Same methods as :class:`~ProtoSAMSlicerLib.worker_client.WorkerSession` (what the effect uses).
The session lives on the server (``protosam serve``), where the preview's run left the volume's
encodings in this user's cache: opening adopts the preview, so a click is one small request
and an update re-propagates from those encodings.

In Slicer every request goes through the local worker process, which relays it over HTTP
(:func:`protosam.serving.client.forwarding_session_request`): no network transfer runs in
Slicer's process, and while a request is in flight Slicer keeps processing events (the
logic's ``idle`` callable, called between polls of the worker). Without a worker process
(the deprecated thread worker) the requests are made directly on the calling thread.
"""

from __future__ import annotations

import threading
from typing import Any, Callable, Dict, List, Optional

from protosam.serving import protocol
from protosam.serving.client import ServerConnection, forwarding_session_request, session_request

from .worker_client import WorkerSession

#: Longest wait for an open or an update (the server may first finish other users' runs).
LONG_REQUEST_TIMEOUT_S = 3600.0
#: Longest wait for a click (the server may have to encode the slice first).
CLICK_TIMEOUT_S = 600.0


class ServerSession(WorkerSession):
    """A correction session on the server at ``url`` with ``token``, adopting the previews in
    ``structures`` (computed by this user's run on that server). Arguments after ``token`` and
    every method are WorkerSession's; only where the requests go differs.

    ``client``: a worker_client.WorkerClient that relays the requests (the GUI's case), or None
    to make them directly (headless scripts). ``allowUnencrypted``: the user's explicit choice to
    allow ``http://`` to another computer (refused otherwise, see ServerConnection).
    """

    def __init__(self, client, url: str, token: str, engineSpec: Dict[str, Any], volume, axis: int,
                 structures: Dict[str, Any], fixedSlices: Dict[str, List[int]], options: Dict[str, Any], *,
                 allowUnencrypted: bool = False, **kwargs):
        self.url, self._token, self.allowUnencrypted = url, token, bool(allowUnencrypted)
        # Checks URL and token before anything is sent.
        self._connection = ServerConnection(url, token, allow_unencrypted=self.allowUnencrypted)
        super().__init__(client, engineSpec, volume, axis, structures, fixedSlices, options, **kwargs)

    def __repr__(self) -> str:  # never the token
        return f"ServerSession({self.url!r}, {self.sessionId[:8]})"

    def _call(self, message: protocol.Message, progress: Optional[Callable[[int, int], None]] = None,
              cancel: Optional[threading.Event] = None) -> Any:
        long = isinstance(message, (protocol.SessionOpen, protocol.SessionUpdate))
        if self.client is None:
            return session_request(self._connection, message, progress or (lambda done, total: None), cancel)
        relay = forwarding_session_request(message, self.url, self._token, allow_unencrypted=self.allowUnencrypted)
        return self.client.request(relay, timeout=LONG_REQUEST_TIMEOUT_S if long else CLICK_TIMEOUT_S,
                                   idle=self.idle, progress=progress, cancel=cancel).value
