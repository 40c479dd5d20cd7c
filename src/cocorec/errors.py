"""The base of every error a user can fix by changing their input.

Every one of them - bad data (:class:`~cocorec.data.errors.DataError`), a bad setting
(:class:`~cocorec.config.ConfigError`), a run that cannot start or be written
(:class:`~cocorec.config.RunError`), an LM or encoder that cannot be loaded
(:class:`~cocorec.knowledge.lm.LMError`), an unusable cache (:class:`~cocorec.knowledge.cache.CacheError`) -
is an :class:`InputError`: the CLI prints its message as one ``error:`` line and exits 2.

Example:
    >>> from cocorec.config import ConfigError
    >>> issubclass(ConfigError, InputError) and issubclass(InputError, ValueError)
    True
"""

from __future__ import annotations

__all__ = ["InputError", "one_line"]


class InputError(ValueError):
    """Bad input; the message names the file, row, field or setting at fault."""


def one_line(e: BaseException, limit: int | None = None) -> str:
    """``e``'s message on one line (whitespace collapsed), cut to ``limit`` characters; the exception's
    type name when it has no message.

    Example:
        >>> one_line(ValueError("bad\\n  row 3")), one_line(KeyError()), one_line(OSError("x" * 9), limit=4)
        ('bad row 3', 'KeyError', 'xxxx')
    """
    return " ".join(str(e).split())[:limit] or type(e).__name__
