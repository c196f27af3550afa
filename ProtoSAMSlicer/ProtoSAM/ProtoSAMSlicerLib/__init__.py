"""Qt-free building blocks of the ProtoSAM Slicer module and Segment Editor effect.

geometry (numpy only), mrml_io (MRML <-> arrays), worker (background thread, no Qt/MRML),
logic (headless ProtoSAMLogic), results (preview and accepted segments), dependencies and
models (first-run setup), effect_session (Segment Editor effect behaviour).
"""
