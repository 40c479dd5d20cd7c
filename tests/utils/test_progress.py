"""progress_bar: a redrawn bar in a terminal, whole lines with an ETA in a log, nothing when off."""

from __future__ import annotations

import io

from cocorec.utils.progress import LogLines, progress_bar


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_a_log_gets_whole_lines_with_an_eta():
    out = io.StringIO()
    with progress_bar(total=2000, desc="user-text KV (9 users)", unit="tok", file=out, interval=0) as bar:
        for _ in range(4):
            bar.update(500)
    text = out.getvalue()
    assert "\r" not in text and text.endswith("\n")
    lines = text.splitlines()
    assert lines[0].startswith("user-text KV (9 users):   0% 0/2.00k tok [00:00<?]")
    assert lines[1].startswith("user-text KV (9 users):  25% 500/2.00k tok [00:00<00:00]")
    assert lines[-1].startswith("user-text KV (9 users): 100% 2.00k/2.00k tok [")
    assert len(lines) == 5   # the start and each update; close() does not repeat the last count


def test_a_log_line_waits_for_the_interval_but_the_last_count_is_always_written():
    out = io.StringIO()
    bar = progress_bar(total=100, desc="generate user", unit="text", file=out, interval=3600)
    for _ in range(100):
        bar.update(1)
    assert out.getvalue().splitlines() == [out.getvalue().splitlines()[0]]   # only the start so far
    bar.close()
    lines = out.getvalue().splitlines()
    assert len(lines) == 2 and lines[1].startswith("generate user: 100% 100/100 text [")


def test_fractional_counts_read_as_texts_done():
    out = io.StringIO()
    with progress_bar(total=943, desc="generate user", unit="text", file=out, interval=0) as bar:
        bar.update(12.34)
    assert "  1% 12.3/943 text [" in out.getvalue()


def test_a_terminal_gets_tqdms_bar_and_off_means_nothing(capsys):
    tty = Terminal()
    with progress_bar(total=3, desc="epoch 1/2", unit="batch", file=tty) as bar:
        bar.update(3)
    assert not isinstance(bar, LogLines) and "\r" in tty.getvalue() and "3/3" in tty.getvalue()
    with progress_bar(total=3, desc="epoch 1/2", unit="batch", enabled=False) as bar:
        bar.update(3)
    assert capsys.readouterr().err == ""
