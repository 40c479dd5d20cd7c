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

__all__ = ["InputError"]


class InputError(ValueError):
    """Bad input; the message names the file, row, field or setting at fault."""
