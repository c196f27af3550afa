"""Qt-free building blocks of the ProtoSAM Slicer module and Segment Editor effect.

geometry (numpy only), mrml_io (MRML <-> arrays), jobs (job states and handles; no Qt/MRML),
worker_client (the device worker processes, the one compute path; no Qt/MRML), worker (the
deprecated in-process thread worker, removed in the next release), logic (headless
ProtoSAMLogic), results (preview and accepted segments), dependencies and models (first-run
setup), effect_session (Segment Editor effect behaviour).
"""

import pathlib

_PACKAGE_DIR = pathlib.Path(__file__).resolve().parent
#: Installed: <qt-scripted-modules>/Resources next to this package. Source tree: <repo>/Resources.
_RESOURCE_DIRS = (_PACKAGE_DIR.parent / "Resources", _PACKAGE_DIR.parents[2] / "Resources")


def resourcePath(*parts: str) -> pathlib.Path:
    """Path of a file under the extension's Resources folder (e.g. "UI", "ProtoSAM.ui")."""
    for folder in _RESOURCE_DIRS:
        candidate = folder.joinpath(*parts)
        if candidate.exists():
            return candidate
    raise FileNotFoundError(f"Resource {'/'.join(parts)} not found in " + " or ".join(map(str, _RESOURCE_DIRS)))
