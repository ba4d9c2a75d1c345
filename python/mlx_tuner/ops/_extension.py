"""Loading the compiled extension, and choosing per call between a kernel and a reference.

The extension is loaded lazily, once. It is not used (every op then runs its pure-MLX
reference) when it is missing, when it was built against another mlx than the one
installed (MLX's C++ ABI is not stable), or when MLX_TUNER_DISABLE_KERNELS=1.
"""

from __future__ import annotations

import importlib
import os
import warnings
from functools import lru_cache
from types import ModuleType

import mlx.core as mx

_DISABLE_ENV = "MLX_TUNER_DISABLE_KERNELS"


class ExtensionStatus:
    """What was found when the extension was loaded (see ``backend_info``)."""

    def __init__(self, module: ModuleType | None, reason: str, built_against: str | None):
        self.module = module
        self.reason = reason
        self.built_against = built_against

    @property
    def loaded(self) -> bool:
        return self.module is not None


def _load(installed: str) -> ExtensionStatus:
    if os.environ.get(_DISABLE_ENV, "") not in ("", "0"):
        return ExtensionStatus(None, f"disabled by {_DISABLE_ENV}", None)
    try:
        _ext = importlib.import_module("mlx_tuner._ext")
    except ImportError as e:
        return ExtensionStatus(None, f"the compiled extension is not available ({e})", None)
    built = _ext.built_mlx_version
    if built != installed:
        reason = (
            f"mlx-tuner's extension was built against mlx {built} but mlx {installed} is "
            "installed; MLX's C++ ABI is not stable, so the fused kernels are off and every "
            "op runs its pure-MLX reference. Fix: pip install mlx=="
            f"{built}, or rebuild mlx-tuner (pip install --no-cache-dir --force-reinstall "
            "mlx-tuner)."
        )
        warnings.warn(reason, RuntimeWarning, stacklevel=3)
        return ExtensionStatus(None, reason, built)
    return ExtensionStatus(_ext, "loaded", built)


@lru_cache(maxsize=1)
def status() -> ExtensionStatus:
    """Loads the extension on first call; warns once if it cannot be used."""
    return _load(mx.__version__)


def reset() -> None:
    """Forgets the loaded state (tests use it to load again under other conditions)."""
    status.cache_clear()
    kernel_devices.cache_clear()


def extension() -> ModuleType | None:
    return status().module


@lru_cache(maxsize=None)  # asked on every op call: parsed once (reset() forgets it)
def kernel_devices(family: str) -> frozenset[str]:
    """The devices ("cpu", "gpu") with a compiled kernel for `family` in this build."""
    ext = extension()
    if ext is None:
        return frozenset()
    for entry in ext.kernel_files.split("|"):
        name, _, devices = entry.partition(":")
        if name == family:
            return frozenset(d for d in devices.split(",") if d)
    return frozenset()


def device_of(stream) -> mx.Device:
    """The device a call runs on, from an ops-style `stream` argument."""
    if stream is None:
        return mx.default_device()
    if isinstance(stream, mx.Stream):
        return stream.device
    if isinstance(stream, mx.Device):
        return stream
    if isinstance(stream, mx.DeviceType):  # mx.cpu / mx.gpu, as mlx's own ops accept
        return mx.Device(stream)
    raise ValueError(f"stream must be None, an mx.Stream or an mx.Device but got {stream!r}")


def kernel_for(family: str, stream=None) -> ModuleType | None:
    """The extension if `family` has a kernel for the device of this call, else None."""
    devices = kernel_devices(family)
    if not devices:
        return None
    dev = "gpu" if device_of(stream) == mx.gpu else "cpu"
    return extension() if dev in devices else None
