"""What planning is doing now, on one line of stderr (``actcompile(..., progress=True)``).

Planning a large model takes seconds to minutes (Dynamo's trace, one real forward that
calibrates every candidate codec on every saved tensor, the knapsack). With ``progress=True``
(the ``actcompile`` command sets it) each phase is shown as it runs, with a bar over the saved
tensors being calibrated; on a terminal the line is redrawn in place, elsewhere (a log file,
a notebook's captured stderr) each phase is one line and the bar is left out.

>>> import io
>>> out = io.StringIO()
>>> p = Progress(out)
>>> p.phase("graph 0/0: calibrating 2 saved tensors")
>>> p.step(1, 2); p.step(2, 2)
>>> p.done("planned in 1.2 s")
>>> print(out.getvalue().strip())
actcompile: graph 0/0: calibrating 2 saved tensors
actcompile: planned in 1.2 s
"""

from __future__ import annotations

import sys
from typing import TextIO

BAR = 24   # characters of the bar


class Progress:
    """One status line: :meth:`phase` starts a phase, :meth:`step` moves its bar, :meth:`done` ends."""

    def __init__(self, stream: TextIO | None = None):
        self.stream = stream if stream is not None else sys.stderr
        self.live = bool(getattr(self.stream, "isatty", lambda: False)())
        self.text = ""

    def _write(self, line: str, final: bool = False) -> None:
        if self.live:
            self.stream.write("\r\x1b[2K" + line + ("\n" if final else ""))
        else:
            self.stream.write(line + "\n")
        self.stream.flush()

    def phase(self, text: str) -> None:
        self.text = text
        self._write(f"actcompile: {text}")

    def step(self, done: int, total: int) -> None:
        if not self.live or total <= 0:   # a pipe or file gets the phases only
            return
        filled = BAR * done // total
        self._write(f"actcompile: {self.text} [{'#' * filled}{'.' * (BAR - filled)}] {done}/{total}")

    def done(self, text: str) -> None:
        self._write(f"actcompile: {text}", final=True)
