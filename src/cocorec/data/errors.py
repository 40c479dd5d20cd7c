"""The one error type for bad input data: a clear one-line message naming file, row or column."""

from __future__ import annotations

from cocorec.errors import InputError


class DataError(InputError):
    """Bad input data. The message names the file and the row or column at fault.

    The CLI prints it as one line and exits non-zero; it never surfaces as a
    traceback from deep inside pandas.
    """

    def __init__(self, message: str, *, file: str | None = None, row: int | None = None,
                 column: str | None = None) -> None:
        where = []
        if file:
            where.append(str(file))
        if row is not None:
            where.append(f"row {row}")
        if column:
            where.append(f"column '{column}'")
        super().__init__(f"{': '.join([', '.join(where), message]) if where else message}")
        self.file, self.row, self.column = file, row, column
