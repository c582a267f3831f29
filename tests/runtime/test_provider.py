"""Execution provider choice: auto needs both the GPU build and a GPU; cuda refuses to guess."""

from __future__ import annotations

import pytest

from gruserve.errors import ProviderUnavailable
from gruserve.runtime.provider import CPU, CUDA, choose_providers, short_name

BOTH = [CUDA, CPU]


@pytest.mark.parametrize(
    ("choice", "available", "gpu", "expected"),
    [
        ("auto", BOTH, True, [CUDA, CPU]),
        ("auto", BOTH, False, [CPU]),
        ("auto", [CPU], True, [CPU]),
        ("cpu", BOTH, True, [CPU]),
        ("cuda", BOTH, True, [CUDA, CPU]),
    ],
)
def test_choose(choice: str, available: list[str], gpu: bool, expected: list[str]) -> None:
    assert choose_providers(choice, available, gpu) == expected


@pytest.mark.parametrize(("available", "gpu"), [([CPU], True), (BOTH, False)])
def test_cuda_without_gpu_or_build_is_an_error(available: list[str], gpu: bool) -> None:
    with pytest.raises(ProviderUnavailable, match="onnxruntime-gpu"):
        choose_providers("cuda", available, gpu)


def test_this_machine_and_names() -> None:
    assert choose_providers("auto")[-1] == CPU
    assert short_name(CUDA) == "cuda" and short_name(CPU) == "cpu"


@pytest.mark.cuda
def test_cuda_is_used_when_present() -> None:
    if CUDA not in choose_providers("auto"):
        pytest.skip("no onnxruntime-gpu build or no GPU on this machine")
    assert choose_providers("cuda")[0] == CUDA
