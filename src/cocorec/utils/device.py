"""The one device policy: ``auto`` is CUDA where there is one, else the CPU; CUDA asked for where
there is none is a one-line :class:`~cocorec.config.ConfigError` naming the setting.

Example:
    >>> resolve_device("cpu")
    device(type='cpu')
    >>> resolve_device("auto").type in ("cpu", "cuda")
    True
"""

from __future__ import annotations

import torch

__all__ = ["resolve_device"]


def resolve_device(name: str | torch.device = "auto", setting: str = "device") -> torch.device:
    """``name`` (``auto``, ``cpu``, ``cuda``, ``cuda:N`` or a device) as a device; ``setting`` names
    the option in the error (``train.device``, ``method.lm_device``)."""
    from cocorec.config import ConfigError

    if isinstance(name, torch.device):
        return name
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(name)
    except (RuntimeError, ValueError):
        raise ConfigError(f"{setting} must be auto, cpu, cuda or cuda:N, got {name!r}") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"{setting}={name} but no CUDA device is available here (use auto or cpu)")
    return dev
