"""Example banks: support slices kept across scans, so what was taught on one volume segments
the next (docs/cohorts.md, "Teach once").

:class:`ExampleBank` is the folder and its index; :func:`add_session_slices` adds a
correction session's painted and corrected slices. The engine itself knows nothing of banks:
:meth:`ExampleBank.supports` hands ``segment_volume`` plain
:class:`protosam.propagation.SupportExample` arrays.
"""
from .bank import INDEX_VERSION, Example, ExampleBank, encode_example, feature_setting
from .sessions import add_session_slices

__all__ = ["ExampleBank", "Example", "INDEX_VERSION", "feature_setting", "encode_example", "add_session_slices"]
