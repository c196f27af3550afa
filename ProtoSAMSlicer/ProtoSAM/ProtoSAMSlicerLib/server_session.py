"""A click-correction session held by a ProtoSAM server ("Compute on: ProtoSAM server").

Same methods as :class:`~ProtoSAMSlicerLib.worker_client.WorkerSession` (what the effect uses).
The session lives on the server (``protosam serve``), where the preview's run left the volume's
encodings in this user's cache: opening adopts the preview, so a click is one small request
and an update re-propagates from those encodings.

In Slicer every request goes through the local worker process, which relays it over HTTP
(:func:`protosam.server_client.forwarding_session_request`): no network transfer runs in
Slicer's process, and while a request is in flight Slicer keeps processing events (the
logic's ``idle`` callable, called between polls of the worker). Without a worker process
(headless scripts with the thread worker) the requests are made directly on the calling thread.
"""

from __future__ import annotations

import logging
from typing import Any, Callable, Dict, List, Optional

import numpy as np

from protosam import protocol
from protosam.server_client import ServerConnection, forwarding_session_request, session_request

logger = logging.getLogger(__name__)

#: Longest wait for an open or an update (the server may first finish other users' runs).
LONG_REQUEST_TIMEOUT_S = 3600.0
#: Longest wait for a click (the server may have to encode the slice first).
CLICK_TIMEOUT_S = 600.0


class ServerSession:
    """A correction session on the server at ``url`` with ``token``, adopting ``masks_Kji``
    (the preview of structure ``structure`` computed by this user's run on that server).

    ``client``: a worker_client.WorkerClient that relays the requests (the GUI's case), or None
    to make them directly (headless scripts). Arrays are in the engine's canonical order with
    ``axis`` the slicing axis, as for WorkerSession; masks are uint8.
    """

    def __init__(self, client, url: str, token: str, engineSpec: Dict[str, Any], volume_Kji, axis: int,
                 structure: str, masks_Kji, fixedSlices, options: Dict[str, Any],
                 idle: Optional[Callable[[], None]] = None):
        self.client, self.axis, self.idle = client, int(axis), idle
        self.url, self._token = url, token
        self._connection = ServerConnection(url, token)  # checks URL and token before anything is sent
        self.sessionId = protocol.new_id()
        self._masks: Dict[Any, np.ndarray] = {}
        self._clicks: Dict[Any, List] = {}
        value = self._call(protocol.SessionOpen(
            id=protocol.new_id(), session_id=self.sessionId, engine=engineSpec, volume=protocol.Image(volume_Kji),
            structures={structure: masks_Kji},
            options=dict(options, axis=self.axis, adopt=True, fixed_slices={structure: list(fixedSlices)})),
            timeout=LONG_REQUEST_TIMEOUT_S)
        self._masks[structure] = np.asarray(value["masks"][structure])

    def __repr__(self) -> str:  # never the token
        return f"ServerSession({self.url!r}, {self.sessionId[:8]})"

    def _call(self, message: protocol.Message, timeout: float = CLICK_TIMEOUT_S,
              progress: Optional[Callable[[int, int], None]] = None) -> Any:
        if self.client is None:
            return session_request(self._connection, message, progress or (lambda done, total: None))
        relay = forwarding_session_request(message, self.url, self._token)
        return self.client.request(relay, timeout=timeout, idle=self.idle, progress=progress).value

    def _slice(self, structure, index: int, message: protocol.Message):
        value = self._call(message)
        mask = np.asarray(value["mask"])
        volume = np.moveaxis(self._masks[structure], self.axis, 0)
        volume[index] = mask
        self._clicks[(structure, index)] = [tuple(c) for c in value["clicks"]]
        return mask

    def correct(self, structure, index: int, points, labels):
        return self._slice(structure, index, protocol.SessionCorrect(
            id=protocol.new_id(), session_id=self.sessionId, structure=structure, axis=self.axis, slice_index=int(index),
            points=[[float(x), float(y)] for x, y in points], labels=[int(v) for v in labels]))

    def undo_click(self, structure, index: int):
        return self._slice(structure, index, protocol.SessionUndoClick(
            id=protocol.new_id(), session_id=self.sessionId, structure=structure, axis=self.axis, slice_index=int(index)))

    def clear_clicks(self, structure, index: int):
        return self._slice(structure, index, protocol.SessionClearClicks(
            id=protocol.new_id(), session_id=self.sessionId, structure=structure, axis=self.axis, slice_index=int(index)))

    def add_support(self, structure, index: int, mask):
        return self._slice(structure, index, protocol.SessionAddSupport(
            id=protocol.new_id(), session_id=self.sessionId, structure=structure, axis=self.axis, slice_index=int(index),
            mask=np.asarray(mask, np.uint8)))

    def update(self, structure, progress=None):
        value = self._call(protocol.SessionUpdate(id=protocol.new_id(), session_id=self.sessionId, structure=structure),
                           timeout=LONG_REQUEST_TIMEOUT_S, progress=progress)
        self._masks[structure] = np.asarray(value["mask"])
        return self._masks[structure]

    def clicks(self, structure, index: int):
        return list(self._clicks.get((structure, index), []))

    def mask(self, structure):
        return self._masks[structure]

    def close(self) -> None:
        """Free the session on the server (it also expires there when left idle)."""
        try:
            self._call(protocol.SessionClose(id=protocol.new_id(), session_id=self.sessionId), timeout=60.0)
        except Exception as error:  # the server may be gone or have expired the session: nothing to free then
            logger.info("Closing the correction session on the ProtoSAM server: %s", error)
