"""Progress bars only on a terminal: a log file or CI gets the epoch lines, not bar updates."""

from __future__ import annotations

import io
import sys
from types import SimpleNamespace

from hrm_vision.distill.callbacks import ProgressBar


def test_bar_is_off_when_stderr_is_not_a_terminal(monkeypatch) -> None:
    log = io.StringIO()  # a file, as under nohup or CI
    monkeypatch.setattr(sys, "stderr", log)
    bar = ProgressBar()
    bar.on_epoch_begin(None, SimpleNamespace(name="distill", epochs=2), 0, 10)
    for step in range(10):
        bar.on_batch_end(None, None, step, {"total": 1.0})
    assert bar.bar is not None and bar.bar.disable
    assert "it/s" not in log.getvalue()


def test_bar_is_on_for_a_terminal(monkeypatch) -> None:
    class Terminal(io.StringIO):
        def isatty(self) -> bool:
            return True

    term = Terminal()
    monkeypatch.setattr(sys, "stderr", term)
    bar = ProgressBar()
    bar.on_epoch_begin(None, SimpleNamespace(name="distill", epochs=2), 0, 10)
    bar.on_batch_end(None, None, 0, {"total": 1.0})
    assert not bar.bar.disable
    bar.bar.close()
    assert "distill 1/2" in term.getvalue()
