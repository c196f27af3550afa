# Every file the ProtoSAM extension installs, in one place.
#
# Slicer installs only what CMake lists (no globbing: a missing entry is a file missing from the
# extension users download). Testing/slicer/test_slicer_cmake.py compares these lists with the
# files that exist, so adding a file to the engine, the module, the effect or Resources/ makes
# that test fail until the file is listed here (or in PROTOSAM_NOT_INSTALLED).
#
# Paths are relative to the folder named in each comment.

set(PROTOSAM_MODULE_NAME ProtoSAM)
set(PROTOSAM_EFFECT_MODULE_NAME SegmentEditorProtoSAM)

# Relative to ProtoSAMSlicer/ProtoSAM: the module and its Qt-free library.
set(PROTOSAM_MODULE_SCRIPTS
  ${PROTOSAM_MODULE_NAME}.py
  ProtoSAMSlicerLib/__init__.py
  ProtoSAMSlicerLib/bank.py
  ProtoSAMSlicerLib/dependencies.py
  ProtoSAMSlicerLib/effect_session.py
  ProtoSAMSlicerLib/geometry.py
  ProtoSAMSlicerLib/jobs.py
  ProtoSAMSlicerLib/logic.py
  ProtoSAMSlicerLib/models.py
  ProtoSAMSlicerLib/mrml_io.py
  ProtoSAMSlicerLib/results.py
  ProtoSAMSlicerLib/review.py
  ProtoSAMSlicerLib/selftest.py
  ProtoSAMSlicerLib/server_session.py
  ProtoSAMSlicerLib/settings.py
  ProtoSAMSlicerLib/worker.py
  ProtoSAMSlicerLib/worker_client.py
  )

# Relative to ProtoSAMSlicer/SegmentEditorProtoSAM: the hidden module registering the effect.
set(PROTOSAM_EFFECT_SCRIPTS
  ${PROTOSAM_EFFECT_MODULE_NAME}.py
  SegmentEditorProtoSAMLib/SegmentEditorEffect.py
  SegmentEditorProtoSAMLib/__init__.py
  )

# Relative to ProtoSAMLib: the engine package "protosam", installed next to the modules.
set(PROTOSAM_ENGINE_SCRIPTS
  protosam/__init__.py
  protosam/__main__.py
  protosam/batch.py
  protosam/batch_cli.py
  protosam/batch_ray.py
  protosam/cache.py
  protosam/catalogue.py
  protosam/cli/__init__.py
  protosam/cli/batch.py
  protosam/cli/common.py
  protosam/cli/evaluate.py
  protosam/cli/examples.py
  protosam/cli/serve.py
  protosam/cli/weights.py
  protosam/cli_common.py
  protosam/cohorts/__init__.py
  protosam/cohorts/batch.py
  protosam/cohorts/ray_cluster.py
  protosam/confidence.py
  protosam/engine.py
  protosam/errors.py
  protosam/evaluation/__init__.py
  protosam/evaluation/abdominal.py
  protosam/evaluation/cli.py
  protosam/evaluation/click_simulation.py
  protosam/evaluation/datasets.py
  protosam/evaluation/demo.py
  protosam/evaluation/interactive.py
  protosam/evaluation/interactive_metrics.py
  protosam/evaluation/interactive_report.py
  protosam/evaluation/metrics.py
  protosam/evaluation/pictures.py
  protosam/evaluation/polyp.py
  protosam/evaluation/protocol.py
  protosam/evaluation/pseudo_scans.py
  protosam/evaluation/realistic.py
  protosam/evaluation/report.py
  protosam/evaluation/runner.py
  protosam/evaluation/sample_data.py
  protosam/evaluation/segment_report.py
  protosam/examples/__init__.py
  protosam/examples/bank.py
  protosam/examples/runs.py
  protosam/examples/sessions.py
  protosam/heap.py
  protosam/io.py
  protosam/models/__init__.py
  protosam/models/alpnet.py
  protosam/models/dinov2.py
  protosam/models/refiners.py
  protosam/models/sam.py
  protosam/models/sam2_refiner.py
  protosam/models/sam2_video.py
  protosam/models/sam_decoder.py
  protosam/models/sam_memory.py
  protosam/models/vit_blocks.py
  protosam/orientation.py
  protosam/precision.py
  protosam/preprocessing.py
  protosam/presets.py
  protosam/prompts.py
  protosam/propagation.py
  protosam/protocol.py
  protosam/server.py
  protosam/server_client.py
  protosam/serving/__init__.py
  protosam/serving/client.py
  protosam/serving/protocol.py
  protosam/serving/scheduler.py
  protosam/serving/server.py
  protosam/serving/tokens.py
  protosam/serving/worker_process.py
  protosam/session.py
  protosam/testing.py
  protosam/validation.py
  protosam/weights/__init__.py
  protosam/weights/checkpoints.py
  protosam/weights/cli.py
  protosam/weights/registry.py
  protosam/weights/resolve.py
  protosam/weights/transfer.py
  protosam/worker_process.py
  )

# Relative to ProtoSAMLib: non-Python files of the engine package.
set(PROTOSAM_ENGINE_RESOURCES
  )

# Relative to the repository root: icons, Qt Designer files and the pip requirements, installed
# as <qt-scripted-modules>/Resources/... where both modules look for them.
set(PROTOSAM_SHARED_RESOURCES
  Resources/Icons/ProtoSAM.png
  Resources/Icons/SegmentEditorProtoSAM.png
  Resources/UI/ProtoSAM.ui
  Resources/UI/SegmentEditorProtoSAM.ui
  Resources/requirements.txt
  )

# Relative to the repository root: files under Resources/ that are for developers only.
set(PROTOSAM_NOT_INSTALLED
  Resources/Icons/make_icons.py
  Resources/Screenshots/ProtoSAM-module.png
  Resources/Screenshots/SegmentEditorProtoSAM-effect.png
  Resources/Screenshots/render_ui.py
  )
