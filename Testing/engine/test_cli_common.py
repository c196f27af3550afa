"""The one progress printer every command uses (segment, batch, demo, weights download)."""
from __future__ import annotations

import io

from protosam.cli.common import ProgressBar, add_model_options
from protosam.presets import PRESETS


class _Terminal(io.StringIO):
    def isatty(self):
        return True


def test_progress_in_a_log_file_is_one_line_per_tenth():
    stream = io.StringIO()
    bar = ProgressBar("download", stream, format_count=lambda n: f"{n} B")
    for done in range(0, 101, 5):
        bar(done, 100)
    lines = stream.getvalue().splitlines()
    assert lines[0] == "download: 0 B/100 B (0 %)" and lines[-1] == "download: 100 B/100 B (100 %)"
    assert len(lines) == 11 and "\r" not in stream.getvalue()


def test_progress_on_a_terminal_rewrites_one_line_and_ends_it():
    stream = _Terminal()
    bar = ProgressBar("segment", stream, width=10)
    bar(0, 4)
    bar(4, 4)
    text = stream.getvalue()
    assert text.startswith("\rsegment [          ] 0/4") and "\rsegment [##########] 4/4" in text
    assert text.endswith("\n") and text.count("\n") == 1
    bar.finish()  # already ended: no second newline
    assert stream.getvalue().count("\n") == 1


def test_interrupted_progress_is_ended_by_finish():
    stream = _Terminal()
    bar = ProgressBar("weights", stream)
    bar(1, 0)  # unknown total
    bar.finish()
    assert stream.getvalue().endswith("\n")


def test_preset_choices_come_from_the_preset_table():
    import argparse

    parser = argparse.ArgumentParser()
    add_model_options(parser)
    preset = next(action for action in parser._actions if action.dest == "preset")
    assert sorted(preset.choices) == sorted(PRESETS)
