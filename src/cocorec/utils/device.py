"""The one device policy: ``auto`` is CUDA where there is one, else the CPU; CUDA asked for where
there is none is a one-line :class:`~cocorec.config.ConfigError` naming the setting.

Example:
    >>> resolve_device("cpu")
    device(type='cpu')
    >>> resolve_device("auto").type in ("cpu", "cuda")
    True
"""

from __future__ import annotations

import platform

import torch

__all__ = ["cpu_model", "native_bf16", "resolve_device"]


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


def native_bf16(device: torch.device) -> bool:
    """Whether ``device`` computes in bf16 natively: CUDA, or a CPU with AVX512-BF16/AMX (oneDNN)."""
    if device.type == "cuda":
        return True
    if device.type != "cpu":
        return False
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except Exception:
        return False


def cpu_model() -> str:
    """The CPU's model name (``/proc/cpuinfo`` on Linux, else the platform's word for it): two boxes
    with the same core count can differ several-fold in speed and in which dtypes they run natively."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()
