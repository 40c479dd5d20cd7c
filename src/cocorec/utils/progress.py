"""Progress with an ETA in a terminal and in a log.

A tqdm bar redraws one line with carriage returns, so a job whose stderr goes to a file (a cluster
job, ``make demo > log``) shows either nothing (a bar disabled off a terminal) or one line
overwritten thousands of times. :func:`progress_bar` gives a tqdm bar in a terminal and, elsewhere,
a plain line every ``interval`` seconds (and one at the end) with the count, the elapsed time and
the ETA.

Example:
    >>> import io
    >>> out = io.StringIO()
    >>> with progress_bar(total=4, desc="texts", unit="text", file=out, interval=0) as bar:
    ...     _ = bar.update(3)
    ...     _ = bar.update(1)
    >>> lines = out.getvalue().splitlines()
    >>> lines[0].startswith("texts:   0% 0/4 text ["), lines[-1].startswith("texts: 100% 4/4 text [")
    (True, True)
"""

from __future__ import annotations

import sys
from typing import Any, TextIO

from tqdm.auto import tqdm

#: seconds between two lines in a log (a terminal's bar redraws as tqdm decides)
LOG_INTERVAL = 30.0


class LogLines(tqdm):  # type: ignore[type-arg]
    """tqdm that writes a whole line (share, count, elapsed, ETA at the mean rate so far) instead of
    redrawing one."""

    _shown: float | None = None

    def display(self, msg: str | None = None, pos: int | None = None) -> bool:
        if self.n == self._shown:   # close() redraws the last count: once is enough in a log
            return False
        self._shown = self.n
        elapsed = float(self.format_dict["elapsed"])
        total = self.total or 0
        eta = ((total - self.n) * elapsed / self.n) if self.n and total else None
        share = f"{100 * self.n / total:3.0f}% " if total else ""
        self.fp.write(f"{self.desc}: {share}{_count(self.n)}/{_count(total)} {self.unit} "
                      f"[{self.format_interval(elapsed)}<{'?' if eta is None else self.format_interval(eta)}]\n")
        self.fp.flush()
        return True

    def close(self) -> None:
        if not self.disable:
            self.display()   # the last count, if the interval kept it back
        super().close()      # with leave=False: no trailing empty line


def _count(x: float) -> str:
    """237k, 943, 12.3 (a fractional count: texts done inside a batch)."""
    if x >= 1000:
        return str(tqdm.format_sizeof(x))
    return f"{x:.0f}" if abs(x - round(x)) < 0.05 else f"{x:.1f}"


def progress_bar(total: float, desc: str, unit: str = "it", enabled: bool | None = None,
                 file: TextIO | None = None, interval: float = LOG_INTERVAL, **kw: Any) -> tqdm:  # type: ignore[type-arg]
    """A tqdm bar on a terminal, a line every ``interval`` s otherwise, nothing when ``enabled`` is False.

    Constructor Args:
        total: the amount of work (texts, tokens, users).
        desc, unit: what is counted.
        enabled: ``False`` silences it; ``None``/``True`` show it (a bar or log lines by ``file``).
        file: where it goes (default stderr); a bar where it is a terminal, lines elsewhere.
        interval: seconds between log lines.
        kw: more tqdm options for the terminal's bar (``bar_format``, ``leave``, ``unit_scale``...).

    Returns:
        a tqdm object: ``update(n)``, ``close()``, a context manager.
    """
    fp = sys.stderr if file is None else file
    if enabled is False:
        return tqdm(total=total, disable=True)
    if getattr(fp, "isatty", lambda: False)():
        return tqdm(total=total, desc=desc, unit=unit, file=fp, dynamic_ncols=True, **kw)
    return LogLines(total=total, desc=desc, unit=unit, file=fp, mininterval=interval, miniters=0, leave=False)
