"""Choosing onnxruntime execution providers.

``auto`` means CUDA only when both halves are there: the onnxruntime-gpu
build (it lists ``CUDAExecutionProvider``) *and* a visible NVIDIA GPU. The
GPU build lists CUDA even on a machine without one, and a session asked for
CUDA there silently falls back to the CPU, so the provider a model really
runs on is read back from its session (:func:`active_provider`), never assumed.
"""

from __future__ import annotations

import os
from pathlib import Path

import onnxruntime as ort

from gruserve.errors import ProviderUnavailable

CPU = "CPUExecutionProvider"
CUDA = "CUDAExecutionProvider"
GPU_HINT = "install onnxruntime-gpu (pip install 'gruserve[gpu]') on a machine with an NVIDIA GPU"


def gpu_present() -> bool:
    """Whether the NVIDIA driver exposes at least one GPU to this process."""
    if os.environ.get("CUDA_VISIBLE_DEVICES", None) in ("", "-1"):
        return False
    gpus = Path("/proc/driver/nvidia/gpus")
    return (gpus.is_dir() and any(gpus.iterdir())) or Path("/dev/nvidia0").exists()


def choose_providers(
    choice: str, available: list[str] | None = None, has_gpu: bool | None = None
) -> list[str]:
    """The provider list to create sessions with, most preferred first.

    Args:
        choice: ``auto``, ``cuda`` or ``cpu`` (the ``provider`` setting).
        available: defaults to ``onnxruntime.get_available_providers()``.
        has_gpu: defaults to :func:`gpu_present`.

    Raises:
        ProviderUnavailable: ``cuda`` was asked for and cannot run here.
    """
    available = list(ort.get_available_providers() if available is None else available)
    cuda_ok = CUDA in available and (gpu_present() if has_gpu is None else has_gpu)
    if choice == "cpu":
        return [CPU]
    if choice == "cuda":
        if not cuda_ok:
            raise ProviderUnavailable("cuda", available, GPU_HINT)
        return [CUDA, CPU]
    if choice == "auto":
        return [CUDA, CPU] if cuda_ok else [CPU]
    raise ProviderUnavailable(choice, available, "use one of auto, cuda, cpu")


def short_name(provider: str) -> str:
    """``CUDAExecutionProvider`` -> ``cuda``."""
    return provider.removesuffix("ExecutionProvider").lower()
